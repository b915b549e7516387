import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stc.core import dynamic_token_count, select_changed_tokens, token_similarity


@settings(deadline=None, max_examples=50)
@given(n=st.integers(1, 300), ratio=st.floats(1e-3, 1.0), prefix=st.integers(0, 2), frames=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_selected_indices_are_unique_sorted_in_range_and_counted(n, ratio, prefix, frames, seed):
    similarity = torch.randn(frames, prefix + n, generator=torch.Generator().manual_seed(seed))
    count = dynamic_token_count(n, ratio)
    index = select_changed_tokens(similarity, count, prefix)
    assert count == max(1, math.floor(ratio * n))
    assert index.shape == (frames, prefix + count)
    for row in index.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < prefix + n
        assert row[:prefix] == list(range(prefix))


def test_selection_takes_the_least_similar_tokens_ties_to_lower_index():
    similarity = torch.tensor([[0.9, 0.1, 0.5, 0.1, 0.2]])
    assert select_changed_tokens(similarity, 2).tolist() == [[1, 3]]
    assert select_changed_tokens(similarity, 3).tolist() == [[1, 3, 4]]
    tied = torch.zeros(1, 5)
    assert select_changed_tokens(tied, 2).tolist() == [[0, 1]]


def test_cls_prefix_is_excluded_from_ranking_and_always_kept():
    similarity = torch.tensor([[-1.0, 0.9, 0.1, 0.5]])  # the CLS column is the least similar
    assert select_changed_tokens(similarity, 1, prefix_tokens=1).tolist() == [[0, 2]]


def test_similarity_metrics():
    keys = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    ref = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert torch.allclose(token_similarity(keys, ref, "cosine"), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(token_similarity(keys, ref, "l1"), torch.tensor([[0.0, -3.0]]))
    assert torch.allclose(token_similarity(keys, ref, "l2"), torch.tensor([[0.0, -(5**0.5)]]))
