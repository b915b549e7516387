import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_bench.methods.visionzip import attention_received, class_attention, compress, split_budget


def column(*values):
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1)


def keys(*rows):
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)


def test_budget_split_follows_upstreams_settings():
    assert split_budget(64) == (54, 10) and split_budget(128) == (108, 20) and split_budget(192) == (162, 30)
    assert split_budget(196) == (165, 31) and split_budget(1) == (1, 0)
    with pytest.raises(ValueError):
        split_budget(0)


def test_hand_example_without_cls():
    # Dominant: tokens 1 and 3 (most attention). Remaining 0, 2, 4, 5 -> stride 2 -> targets 0 and 4;
    # token 2 (key near token 0's) joins 0, token 5 (near 4's) joins 4.
    hidden = column(1, 2, 3, 4, 5, 6)
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.0, 0.3]])
    k = keys([1, 0], [0, 0], [1, 0.1], [0, 0], [0, 1], [0.1, 1])
    out = compress(hidden, importance, k, dominant=2, contextual=2)
    assert out.dominant.tolist() == [[1, 3]] and out.contextual.tolist() == [[0, 4]]
    assert out.tokens.flatten().tolist() == [2, 4, 1 + 3, 5 + 6]       # contextual = target + mean(joined)


def test_a_target_nobody_joins_stays_itself_and_groups_average():
    hidden = column(1, 2, 3, 4, 5, 6)
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.4, 0.0, 0.3]])
    k = keys([1, 0], [0, 0], [1, 0.1], [0, 0], [0, 1], [1, 0.2])     # tokens 2 and 5 both join target 0
    out = compress(hidden, importance, k, dominant=2, contextual=2)
    assert out.tokens.flatten().tolist() == [2, 4, 1 + (3 + 6) / 2, 5]


def test_hand_example_with_cls_attention():
    attention = torch.zeros(1, 2, 5, 5)
    attention[0, 0, 0] = torch.tensor([0.0, 0.1, 0.4, 0.3, 0.2])
    attention[0, 1, 0] = torch.tensor([0.0, 0.3, 0.1, 0.2, 0.4])
    importance = class_attention(attention)                          # patch sums 0.4, 0.5, 0.5, 0.6
    assert torch.allclose(importance[0, 1:], torch.tensor([0.4, 0.5, 0.5, 0.6]))
    hidden = column(100, 1, 2, 3, 4)
    out = compress(hidden, importance, torch.randn(1, 5, 3), dominant=2, contextual=1, class_token=True)
    assert out.dominant.tolist() == [[0, 4]] and out.contextual.tolist() == [[1]]
    assert out.tokens.flatten().tolist() == [100, 4, 1 + (2 + 3) / 2]


def test_attention_received_averages_heads_and_queries():
    attention = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]]])   # (1, 2, 2, 2)
    assert attention_received(attention).tolist() == [[0.5, 0.5]]


def test_ties_go_to_the_lower_index():
    hidden = column(1, 2, 3, 4)
    out = compress(hidden, torch.tensor([[0.2, 0.5, 0.2, 0.5]]), torch.ones(1, 4, 2), dominant=1, contextual=1)
    assert out.dominant.tolist() == [[1]]                             # 1 and 3 tie: the lower wins
    assert out.contextual.tolist() == [[0]] and out.tokens.flatten().tolist() == [2, 1 + (3 + 4) / 2]


def test_cls_needs_a_dominant_slot_and_the_budget_must_fit():
    with pytest.raises(ValueError, match="CLS"):
        compress(torch.randn(1, 4, 2), torch.rand(1, 4), torch.randn(1, 4, 2), 0, 2, class_token=True)
    with pytest.raises(ValueError):
        compress(torch.randn(1, 4, 2), torch.rand(1, 4), torch.randn(1, 4, 2), 3, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype):
    hidden = torch.randn(3, 20, 8).to(dtype)
    out = compress(hidden, torch.rand(3, 20), torch.randn(3, 20, 4).to(dtype), 6, 2)
    assert out.tokens.dtype == dtype and out.tokens.device == hidden.device and out.tokens.shape == (3, 8, 8)
    assert torch.equal(out.tokens[:, :6], hidden.gather(1, out.dominant.unsqueeze(-1).expand(-1, -1, 8)))


@settings(deadline=None, max_examples=60)
@given(tokens=st.integers(2, 80), share=st.floats(0, 1), cls=st.booleans(), seed=st.integers(0, 999))
def test_dominant_plus_contextual_is_the_budget(tokens, share, cls, seed):
    g = torch.Generator().manual_seed(seed)
    budget = max(1, round(share * tokens))
    dominant, contextual = split_budget(budget)
    hidden = torch.randn(2, tokens, 5, generator=g)
    attention = torch.rand(2, 3, tokens, tokens, generator=g).softmax(dim=-1)
    importance = class_attention(attention) if cls else attention_received(attention)
    out = compress(hidden, importance, torch.randn(2, tokens, 4, generator=g), dominant, contextual, cls)
    assert dominant + contextual == budget and out.tokens.shape == (2, budget, 5)
    assert out.dominant.shape == (2, dominant) and out.contextual.shape == (2, contextual)
    for chosen, targets in zip(out.dominant.tolist(), out.contextual.tolist()):
        assert chosen == sorted(set(chosen)) and targets == sorted(set(targets)) and not set(chosen) & set(targets)
        assert not cls or chosen[0] == 0
