import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stc
from stc import PrunerConfig, STCPruner
from stc.pruner.scoring import low_variance_channels

pytestmark = pytest.mark.tier1


def features(frames=4, tokens=12, channels=8, seed=0):
    return torch.randn(frames, tokens, channels, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["gaussian", "dual_anchor"])
def test_shapes_sorted_indices_and_gathered_tokens(strategy):
    x = features()
    out = STCPruner(PrunerConfig(tokens_per_frame=5, strategy=strategy)).compress(x)
    assert out.tokens.shape == (4, 5, 8) and out.indices.shape == (4, 5)
    assert torch.equal(out.indices, out.indices.sort(dim=-1).values)
    assert torch.equal(out.tokens, torch.stack([x[t, out.indices[t]] for t in range(4)]))


@settings(deadline=None, max_examples=40)
@given(frames=st.integers(1, 4), tokens=st.integers(1, 30), budget=st.integers(1, 40), seed=st.integers(0, 999),
       strategy=st.sampled_from(["gaussian", "dual_anchor"]))
def test_keeps_exactly_the_budget_in_spatial_order(frames, tokens, budget, seed, strategy):
    out = STCPruner(PrunerConfig(tokens_per_frame=budget, strategy=strategy)).compress(features(frames, tokens, 6, seed))
    kept = min(budget, tokens)
    assert out.tokens.shape == (frames, kept, 6)
    for row in out.indices.tolist():
        assert row == sorted(set(row)) and all(0 <= i < tokens for i in row)


def test_full_budget_is_the_identity():
    x = features()
    out = STCPruner(PrunerConfig(tokens_per_frame=12)).compress(x)
    assert torch.equal(out.tokens, x)
    assert out.indices.tolist() == [list(range(12))] * 4
    assert torch.equal(STCPruner(PrunerConfig(tokens_per_frame=100)).compress(x).tokens, x)


def test_deterministic_and_reset_restores_the_first_call():
    pruner = STCPruner(PrunerConfig(tokens_per_frame=4))
    first = pruner.compress(features(seed=1)).indices
    pruner.compress(features(seed=2))
    assert pruner.calls == 2
    pruner.reset()
    assert torch.equal(pruner.compress(features(seed=1)).indices, first)
    assert torch.equal(STCPruner(PrunerConfig(tokens_per_frame=4)).compress(features(seed=1)).indices, first)


def test_frames_per_call_equals_separate_calls():
    x = features(frames=6)
    split = STCPruner(PrunerConfig(tokens_per_frame=3)).compress(x, frames_per_call=1)
    pruner = STCPruner(PrunerConfig(tokens_per_frame=3))
    one_by_one = [pruner.compress(x[i : i + 1]).indices for i in range(6)]
    assert torch.equal(split.indices, torch.cat(one_by_one))
    assert pruner.calls == 6


def test_history_changes_the_temporal_anchor():
    warm = STCPruner(PrunerConfig(tokens_per_frame=3, strategy="dual_anchor", alpha=1.0))
    warm.compress(features(seed=5) + 3.0)
    cold = STCPruner(PrunerConfig(tokens_per_frame=3, strategy="dual_anchor", alpha=1.0))
    x = features(seed=6)
    assert not torch.equal(warm.compress(x).indices, cold.compress(x).indices)


def _gaussian(x, c, scales):
    d = sum((a - b) ** 2 for a, b in zip(x, c))
    return sum(math.exp(-d / (2 * s)) for s in scales)


def _unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def test_gaussian_scores_against_a_hand_computed_example():
    # One frame of four 3-channel tokens; channel 2 has the largest variance, so with keep
    # ratio 2/3 the scoring uses channels 0 and 1.
    tokens = [[1.0, 0.0, 5.0], [0.0, 1.0, -5.0], [1.0, 1.0, 0.0], [0.9, 0.1, 2.0]]
    scales = (0.5, 1.0)
    x = torch.tensor([tokens])
    assert low_variance_channels(x, 2 / 3).tolist() == [0, 1]
    sub = [_unit(t[:2]) for t in tokens]
    frame_mean = [sum(t[i] for t in sub) / 4 for i in range(2)]
    anchor = _unit([sum(t[i] for t in tokens) / 4 for i in range(2)])  # history = this call only
    scores = [_gaussian(t, frame_mean, scales) + _gaussian(t, anchor, scales) for t in sub]
    expected = sorted(sorted(range(4), key=lambda i: scores[i])[:2])
    out = STCPruner(PrunerConfig(tokens_per_frame=2, channel_keep_ratio=2 / 3, gaussian_scales=scales)).compress(x)
    assert out.indices.tolist() == [expected]
    assert expected == [0, 1]  # the two tokens furthest from both anchors


def test_dual_anchor_scores_against_a_hand_computed_example():
    """Two calls, so the temporal anchor (the mean of every call's mean so far) differs from the
    frame mean; the example is chosen so that swapping alpha and 1 - alpha changes the choice."""
    first = [[1.0, 0.0], [1.0, 0.2], [0.9, 0.1], [1.0, -0.1]]
    second = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 2.0]]

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))

    def mean(tokens):
        return [sum(t[i] for t in tokens) / len(tokens) for i in range(2)]

    anchor = [(a + b) / 2 for a, b in zip(mean(first), mean(second))]   # running mean of the two call means
    chosen = {}
    for alpha in (0.2, 0.8):
        scores = [alpha * (1 - cos(t, anchor)) + (1 - alpha) * (1 - cos(t, mean(second))) for t in second]
        expected = [max(range(4), key=lambda i: scores[i])]
        pruner = STCPruner(PrunerConfig(tokens_per_frame=1, strategy="dual_anchor", alpha=alpha, channel_keep_ratio=1.0))
        pruner.compress(torch.tensor([first]))
        chosen[alpha] = pruner.compress(torch.tensor([second])).indices.tolist()
        assert chosen[alpha] == [expected]
    assert chosen == {0.2: [[0]], 0.8: [[1]]}  # alpha weighs the temporal anchor, 1 - alpha the frame mean


SHAPE = "features must be (frames, tokens, channels) with at least one frame, token and channel, got shape {}"


@pytest.mark.parametrize(
    "features, frames_per_call, error, message",
    [
        (torch.zeros(4, 8), None, ValueError, SHAPE.format("(4, 8)")),
        (torch.zeros(0, 4, 8), None, ValueError, SHAPE.format("(0, 4, 8)")),
        (torch.zeros(0, 4, 8), 2, ValueError, SHAPE.format("(0, 4, 8)")),  # the frames, not frames_per_call
        (torch.zeros(2, 0, 8), None, ValueError, SHAPE.format("(2, 0, 8)")),
        (torch.zeros(2, 4, 0), None, ValueError, SHAPE.format("(2, 4, 0)")),
        ([[[0.0]]], None, TypeError, "features must be a torch.Tensor of shape (frames, tokens, channels), got list"),
        (torch.zeros(1, 4, 8), 0, ValueError, "frames_per_call=0 must be an integer >= 1 (or None: all frames are one call)"),
        (torch.zeros(1, 4, 8), True, ValueError, "frames_per_call=True must be an integer >= 1 (or None: all frames are one call)"),
        (torch.zeros(1, 4, 8), 1.0, ValueError, "frames_per_call=1.0 must be an integer >= 1 (or None: all frames are one call)"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(features, frames_per_call, error, message):
    pruner = STCPruner()
    with pytest.raises(error) as err:
        pruner.compress(features, frames_per_call)
    assert str(err.value) == message
    assert pruner.calls == 0


@pytest.mark.parametrize("config, got", [({"tokens_per_frame": 4}, "dict"), (64, "int")])
def test_a_config_of_the_wrong_type_is_refused(config, got):
    with pytest.raises(TypeError) as err:
        STCPruner(config)
    assert str(err.value) == f"config must be a stc.PrunerConfig, got {got}"


def test_features_of_another_width_mid_stream_ask_for_a_reset():
    pruner = STCPruner(PrunerConfig(tokens_per_frame=2))
    pruner.compress(features(channels=8))
    with pytest.raises(stc.StreamStateError) as err:
        pruner.compress(features(channels=6))
    assert str(err.value) == ("features now have 6 channels but this stream started with 8: "
                              "call pruner.reset() before feeding another model's features")
    pruner.reset()
    assert pruner.compress(features(channels=6)).tokens.shape == (4, 2, 6)


def test_streams_sharing_a_pruner_keep_their_own_temporal_anchor():
    """Frames of two streams in one call are scored exactly as each stream's own calls, against
    its own history; the output keeps the input's order; one stream can leave."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 2, 20, 16, generator=g).unbind(0)[:2]           # (2, 20, 16) each: 2 calls of 1 frame
    config = PrunerConfig(tokens_per_frame=5)
    alone = {}
    for name, video in (("a", a), ("b", b)):
        pruner = STCPruner(config)
        alone[name] = [pruner.compress(video[i : i + 1]) for i in range(2)]
    shared = STCPruner(config)
    for i in range(2):
        out = shared.compress(torch.stack([b[i], a[i]]), streams=["b", "a"])
        assert torch.equal(out.tokens[0], alone["b"][i].tokens[0]) and torch.equal(out.tokens[1], alone["a"][i].tokens[0])
        assert torch.equal(out.indices[1], alone["a"][i].indices[0])
    shared.reset("a")
    fresh = STCPruner(config).compress(a[1:2])
    assert torch.equal(shared.compress(a[1:2], streams=["a"]).tokens, fresh.tokens)
    with pytest.raises(ValueError, match="streams names 1 stream ids for 2 frames: give one id per frame"):
        shared.compress(a, streams=["a"])


@pytest.mark.parametrize("strategy", ["gaussian", "dual_anchor"])
def test_a_lockstep_step_of_several_streams_is_scored_as_each_streams_own_call(strategy):
    """The serving step (t frames of each of S streams, stream-major, equal histories) is scored
    as one batch; the tokens are each stream's own call's. A stream with another history length
    (it joined later) is scored on its own, with the same result."""
    g = torch.Generator().manual_seed(5)
    steps = torch.randn(3, 3, 2, 30, 24, generator=g)                   # (steps, S, t, n, C)
    config = PrunerConfig(tokens_per_frame=7, strategy=strategy)
    shared, alone = STCPruner(config), [STCPruner(config) for _ in range(3)]
    ids = [s for s in range(3) for _ in range(2)]
    for i, step in enumerate(steps):
        out = shared.compress(step.flatten(0, 1), streams=ids)
        for s in range(3):
            own = alone[s].compress(step[s])
            assert torch.equal(out.indices[2 * s : 2 * s + 2], own.indices)
            assert torch.allclose(out.tokens[2 * s : 2 * s + 2], own.tokens)
        if i == 0:
            shared.reset(2)
            alone[2].reset()


def test_a_lockstep_step_dispatches_as_many_operators_for_eight_streams_as_for_two():
    """Serving more streams must not multiply the pruner's launches (on a GPU each is a kernel)."""
    from stc_bench.launches import OperatorCounter

    def operators(streams: int) -> int:
        pruner = STCPruner(PrunerConfig(tokens_per_frame=5))
        features = torch.randn(streams, 40, 16)
        ids = list(range(streams))
        pruner.compress(features, streams=ids)                          # the first call has no history to add
        counter = OperatorCounter()
        with torch.no_grad(), counter:
            pruner.compress(features, streams=ids)
        return sum(counter.by_owner[None].values())

    assert operators(8) == operators(2)
