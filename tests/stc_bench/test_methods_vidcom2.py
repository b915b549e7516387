import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stc_bench.methods.vidcom2 import compress_stream_call, compress_video, frame_budgets, keep_lowest


def video(*frames):
    """(T, n, 4) tokens: the given 2-d vectors in channels 0-1 (low variance, the scored ones)
    and +-100 noise in channels 2-3 (high variance, left out of scoring)."""
    scored = torch.tensor(frames, dtype=torch.float32)                            # (T, n, 2)
    noise = 100 * torch.randn(*scored.shape[:2], 2, generator=torch.Generator().manual_seed(0))
    return torch.cat([scored, noise], dim=-1)


def test_frame_budgets_hand_examples():
    # p ~ (1, 0, 0, 0): shares base * (1.75, 0.75, ...) with base 4/8 -> quotas 7, 3, 3, 3.
    assert frame_budgets(torch.tensor([1.0, 0, 0, 0]), 4, 8).tolist() == [7, 3, 3, 3]
    # Frame 0's share is capped at all 4 tokens; its excess goes to frame 1 (upstream would drop it).
    assert frame_budgets(torch.tensor([1.0, 0.0]), 3, 4).tolist() == [4, 2]
    assert frame_budgets(torch.zeros(5), 64, 196).tolist() == [64] * 5           # equal frames: the plain budget
    assert frame_budgets(torch.tensor([0.3]), 64, 196).tolist() == [64]          # one frame per call
    assert frame_budgets(torch.tensor([0.0, 1.0]), 500, 196).tolist() == [196, 196]
    with pytest.raises(ValueError):
        frame_budgets(torch.zeros(2), 0, 10)


@settings(deadline=None, max_examples=100)
@given(uniqueness=st.lists(st.floats(-3, 3), min_size=1, max_size=12), tokens=st.integers(1, 50),
       per_frame=st.integers(1, 60))
def test_frame_budgets_sum_to_the_total_within_bounds(uniqueness, tokens, per_frame):
    budgets = frame_budgets(torch.tensor(uniqueness), per_frame, tokens)
    assert budgets.dtype == torch.int64 and int(budgets.sum()) == len(uniqueness) * min(per_frame, tokens)
    assert all(1 <= b <= tokens for b in budgets.tolist())


@settings(deadline=None, max_examples=100)
@given(uniqueness=st.lists(st.floats(-0.05, 0.05), min_size=1, max_size=8), tokens=st.integers(4, 200),
       per_frame=st.integers(1, 200))
def test_frame_budgets_equal_upstreams_rounding_when_its_total_is_exact(uniqueness, tokens, per_frame):
    u = torch.tensor(uniqueness, dtype=torch.float64)
    p = torch.softmax((u - u.max()) / 0.01, dim=0)
    quota = per_frame / tokens * (1 + p - p.mean()) * tokens
    upstream = quota.round().clamp(min=1)
    assume(per_frame <= tokens and bool((quota <= tokens).all()) and bool((quota >= 1).all()))
    assume(int(upstream.sum()) == len(uniqueness) * per_frame and bool(((quota % 1 - 0.5).abs() > 1e-6).all()))
    assert frame_budgets(u, per_frame, tokens).tolist() == upstream.long().tolist()


def test_keep_lowest_per_frame_in_position_order_ties_to_lower_index():
    frames, positions = keep_lowest(torch.tensor([[3.0, 1, 2, 1], [0, 5, 0, 0]]), torch.tensor([1, 3]))
    assert frames.tolist() == [0, 1, 1, 1] and positions.tolist() == [1, 0, 2, 3]
    _, positions = keep_lowest(torch.tensor([[3.0, 1, 2, 1]]), torch.tensor([2]))
    assert positions.tolist() == [1, 3]


def test_hand_example_keeps_the_odd_token_out():
    x = video([[1, 0], [1, 0], [0, 1]])
    out = compress_video(x, 1)
    assert out.budgets.tolist() == [1] and out.indices.tolist() == [2] and torch.equal(out.tokens, x[0, [2]])


def test_hand_example_gives_the_unusual_frame_more_tokens():
    # Frame 0 is three copies of (1, 0); frame 1 has an outlier (0, 1): it is less like the video
    # centre (5/6, 1/6), so it gets 3 of the 4 tokens and frame 0 keeps one (ties: token 0).
    x = video([[1, 0], [1, 0], [1, 0]], [[1, 0], [1, 0], [0, 1]])
    out = compress_video(x, 2)
    assert out.budgets.tolist() == [1, 3]
    assert out.frames.tolist() == [0, 1, 1, 1] and out.indices.tolist() == [0, 0, 1, 2]
    assert torch.equal(out.tokens, x[out.frames, out.indices])


def test_streaming_is_causal_with_a_running_video_centre():
    x = video([[1, 0], [1, 0], [1, 0]], [[1, 0], [1, 0], [0, 1]])
    first, state = compress_stream_call(x[:1], 2)
    second, state = compress_stream_call(x[1:], 2, state)
    assert first.budgets.tolist() == [2] and second.budgets.tolist() == [2]   # one frame per call: the plain budget
    assert second.indices.tolist() == [0, 2]                                    # the outlier, then a tie to the lower index
    assert state.channels.tolist() == [0, 1] and state.token_count == 6
    unit = F.normalize(x[..., :2], dim=-1)
    assert torch.allclose(state.unit_sum / state.token_count, unit.mean(dim=(0, 1)))   # mean of all tokens so far


def test_one_call_over_the_whole_video_equals_the_offline_method_and_later_frames_do_not_change_earlier_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20, 8, generator=g)
    whole, _ = compress_stream_call(x, 5)
    offline = compress_video(x, 5)
    assert all(torch.equal(a, b) for a, b in zip(vars(whole).values(), vars(offline).values()))
    state = None
    outputs = []
    for t in range(6):
        out, state = compress_stream_call(x[t : t + 1], 5, state)
        outputs.append(out.indices)
    changed_future = x.clone()
    changed_future[3:] = torch.randn(3, 20, 8, generator=g)
    state = None
    for t in range(3):
        out, state = compress_stream_call(changed_future[t : t + 1], 5, state)
        assert torch.equal(out.indices, outputs[t])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype):
    x = torch.randn(4, 12, 6).to(dtype)
    out = compress_video(x, 3)
    assert out.tokens.dtype == dtype and out.tokens.device == x.device and out.tokens.shape == (12, 6)
    assert out.budgets.device == x.device


@settings(deadline=None, max_examples=40)
@given(frames=st.integers(1, 6), tokens=st.integers(1, 30), per_frame=st.integers(1, 40), seed=st.integers(0, 999))
def test_per_frame_budgets_sum_to_the_total(frames, tokens, per_frame, seed):
    x = torch.randn(frames, tokens, 6, generator=torch.Generator().manual_seed(seed))
    out = compress_video(x, per_frame)
    kept = min(per_frame, tokens)
    assert int(out.budgets.sum()) == frames * kept == out.tokens.shape[0]
    assert all(1 <= b <= tokens for b in out.budgets.tolist())
    for t in range(frames):
        row = out.indices[out.frames == t].tolist()
        assert row == sorted(set(row)) and len(row) == out.budgets[t]
