import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_bench.methods.tome import (
    bipartite_soft_matching,
    fewest_tokens,
    layer_token_counts,
    max_merges,
    merge_schedule,
    merge_weighted_average,
    proportional_attention_bias,
)


def column(*values):
    """(1, n, 1) tokens with the given scalar values."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1)


def keys(*rows):
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_hand_example_merges_the_most_similar_pair():
    # A = tokens 0, 2; B = tokens 1, 3. Token 0 equals token 1 (cosine 1); token 2 is nearest 3 (0.707).
    metric = keys([1, 0], [1, 0], [0, 1], [1, 1])
    plan = bipartite_soft_matching(metric, 1)
    assert plan.kept.tolist() == [[1]] and plan.merged.tolist() == [[0]] and plan.partner.tolist() == [[0]]
    tokens, size = merge_weighted_average(column(0, 2, 10, 20), plan)
    assert tokens.flatten().tolist() == [10, 1, 20]            # [kept A (token 2), B0 = mean(0, 2), B1]
    assert size.tolist() == [[1, 2, 1]]


def test_class_token_is_never_merged_even_when_it_is_the_best_match():
    # CLS (token 0) equals token 1; token 2 equals token 3; token 4 is equally near 1 and 3.
    metric = keys([1, 0], [1, 0], [0, 1], [0, 1], [1, 1])
    x = column(100, 1, 2, 4, 8)
    one, _ = merge_weighted_average(x, bipartite_soft_matching(metric, 1, class_token=True))
    assert one.flatten().tolist() == [100, 8, 1, 3]             # token 2 joins 3; CLS stays first
    two, size = merge_weighted_average(x, bipartite_soft_matching(metric, 2, class_token=True))
    assert two.flatten().tolist() == [100, 4.5, 3]              # token 4 joins token 1 (tie: first partner)
    assert size.tolist() == [[1, 2, 2]]
    capped = bipartite_soft_matching(metric, 3, class_token=True)
    assert capped.merges == 2 == max_merges(5, class_token=True)


def test_ties_go_to_the_lower_index():
    plan = bipartite_soft_matching(torch.ones(1, 6, 3), 2)     # every pair equally similar
    assert plan.merged.tolist() == [[0, 1]] and plan.partner.tolist() == [[0, 0]] and plan.kept.tolist() == [[2]]
    tokens, size = merge_weighted_average(column(0, 3, 6, 9, 12, 15), plan)
    assert tokens.flatten().tolist() == [12, 3, 9, 15] and size.tolist() == [[1, 3, 1, 1]]


def test_existing_sizes_weight_the_average():
    plan = bipartite_soft_matching(keys([1, 0], [1, 0]), 1)
    tokens, size = merge_weighted_average(column(0, 4), plan, torch.tensor([[3.0, 1.0]]))
    assert tokens.flatten().tolist() == [1.0] and size.tolist() == [[4.0]]


def test_zero_merges_is_the_identity():
    x = torch.randn(2, 5, 3)
    tokens, size = merge_weighted_average(x, bipartite_soft_matching(x, 0))
    assert torch.equal(tokens.sort(dim=1).values, x.sort(dim=1).values) and torch.equal(size, torch.ones(2, 5))
    tokens, size = merge_weighted_average(x[:, :1], bipartite_soft_matching(x[:, :1], 4))
    assert torch.equal(tokens, x[:, :1])


def test_proportional_attention_bias():
    bias = proportional_attention_bias(torch.tensor([[1.0, 2.0, 4.0]]), torch.float16)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == torch.float16
    assert torch.allclose(bias.float().flatten(), torch.tensor([0.0, math.log(2), math.log(4)]), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_are_kept_and_sizes_are_float32(dtype):
    x = torch.randn(2, 9, 4).to(dtype)
    tokens, size = merge_weighted_average(x, bipartite_soft_matching(x, 3))
    assert tokens.dtype == dtype and tokens.device == x.device and tokens.shape == (2, 6, 4)
    assert size.dtype == torch.float32 and size.sum(dim=1).tolist() == [9.0, 9.0]


def test_schedule_hand_examples():
    assert merge_schedule(10, 3, 4) == [2, 2, 2]
    assert merge_schedule(10, 3, 5) == [2, 2, 1]                # remainder to the earliest layers
    assert merge_schedule(16, 2, 4) == [8, 4]                   # the cap forces the first layer to take more
    assert merge_schedule(729, 26, 64) == [26] * 15 + [25] * 11
    assert merge_schedule(7, 4, 7) == [0, 0, 0, 0]
    assert layer_token_counts(8, [3, 3, 3]) == [8, 5, 3, 2]     # ToMe's constant r, capped at half per layer
    assert fewest_tokens(16, 2) == 4 and fewest_tokens(17, 2, class_token=True) == 5
    with pytest.raises(ValueError, match=r"\[4, 16\]"):
        merge_schedule(16, 2, 3)
    with pytest.raises(ValueError):
        merge_schedule(16, 0, 8)


@settings(deadline=None, max_examples=60)
@given(tokens=st.integers(1, 800), layers=st.integers(1, 30), share=st.floats(0, 1), cls=st.booleans())
def test_schedule_meets_the_budget_within_the_cap(tokens, layers, share, cls):
    fewest = fewest_tokens(tokens, layers, cls)
    target = fewest + round(share * (tokens - fewest))
    schedule = merge_schedule(tokens, layers, target, cls)
    counts = layer_token_counts(tokens, schedule, cls)
    assert len(schedule) == layers and counts[-1] == target and sum(schedule) == tokens - target
    assert all(0 <= r <= max_merges(n, cls) for r, n in zip(schedule, counts))
    assert max(schedule) - min(schedule) <= 1 or any(r == max_merges(n, cls) for r, n in zip(schedule, counts))


@settings(deadline=None, max_examples=40)
@given(tokens=st.integers(2, 60), layers=st.integers(1, 6), share=st.floats(0, 1), cls=st.booleans(),
       seed=st.integers(0, 999))
def test_tower_token_counts_and_size_conservation(tokens, layers, share, cls, seed):
    """Merging layer by layer with the schedule: each layer leaves the scheduled count, sizes sum
    to the original count, and the size-weighted mean token is unchanged."""
    g = torch.Generator().manual_seed(seed)
    fewest = fewest_tokens(tokens, layers, cls)
    schedule = merge_schedule(tokens, layers, fewest + round(share * (tokens - fewest)), cls)
    x = torch.randn(3, tokens, 5, generator=g, dtype=torch.float64)
    mean = x.mean(dim=1)
    size = None
    for r, expected in zip(schedule, layer_token_counts(tokens, schedule, cls)[1:]):
        metric = torch.randn(3, x.shape[1], 4, generator=g)         # stands in for the layer's keys
        plan = bipartite_soft_matching(metric, r, cls)
        if cls:
            cls_before = x[:, 0].clone()
        x, size = merge_weighted_average(x, plan, size)
        assert x.shape == (3, expected, 5) and size.shape == (3, expected)
        if cls:
            assert torch.equal(x[:, 0], cls_before) and torch.all(size[:, 0] == 1)
    if size is not None:
        assert torch.all(size.sum(dim=1) == tokens)
        assert torch.allclose((x * size.double().unsqueeze(-1)).sum(dim=1) / tokens, mean)


