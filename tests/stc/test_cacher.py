"""STC-Cacher on tiny CLIP and SigLIP towers: equivalences, exact counts, attach/detach."""

import math
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stc
from stc import CacherConfig
from tests.conftest import build_tiny_tower, moving_clip, noisy_clip

TOL = 1e-5


def encode(tower, frames):
    with torch.inference_mode():
        return tower(pixel_values=frames).last_hidden_state


def prefix_tokens(tower):
    return 1 if "CLIP" in type(tower).__name__ else 0


@pytest.mark.parametrize("config", [CacherConfig(update_ratio=1.0), CacherConfig(cache_interval=1, update_ratio=0.1)])
def test_full_ratio_or_interval_one_reproduce_the_unpatched_tower(tower, frames, config):
    baseline = encode(tower, frames)
    with stc.cacher_attached(tower, config):
        patched = encode(tower, frames)
    assert (patched - baseline).abs().max() <= TOL


@pytest.mark.parametrize("selection", ["shared", "per_layer"])
@pytest.mark.parametrize("metric", ["cosine", "l1", "l2"])
def test_identical_frames_reproduce_the_unpatched_tower_at_low_ratio(tower, selection, metric):
    still = moving_clip(1).expand(6, -1, -1, -1)
    baseline = encode(tower, still)
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.1, cache_interval=4, selection=selection, metric=metric)):
        patched = encode(tower, still)
    assert (patched - baseline).abs().max() <= TOL


def test_selective_frames_do_differ_on_a_moving_clip(tower, frames):
    """Guards the equivalence tests: at ratio 0.1 a changing clip is not reproduced exactly."""
    baseline = encode(tower, frames)
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.1)):
        patched = encode(tower, frames)
    assert torch.equal(patched[0], baseline[0])  # frame 0 is a refresh frame
    assert (patched[1] - baseline[1]).abs().max() > 1e-3


def test_refresh_frames_match_the_unpatched_tower_exactly(tower, frames):
    baseline = encode(tower, frames)
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.1, cache_interval=3)):
        patched = encode(tower, frames)
    for i in (0, 3, 6):
        assert (patched[i] - baseline[i]).abs().max() <= TOL


@settings(deadline=None, max_examples=25, derandomize=True)
@given(
    splits=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    interval=st.integers(1, 4),
    ratio=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]),
    selection=st.sampled_from(["shared", "per_layer"]),
    kind=st.sampled_from(["clip", "siglip"]),
)
def test_batched_calls_equal_one_frame_calls(splits, interval, ratio, selection, kind):
    tower = _towers[kind]
    clip = noisy_clip(sum(splits), seed=len(splits))
    config = CacherConfig(update_ratio=ratio, cache_interval=interval, selection=selection)
    with stc.cacher_attached(tower, config) as handle:
        chunks, start = [], 0
        for size in splits:
            chunks.append(encode(tower, clip[start : start + size]))
            start += size
        batched = torch.cat(chunks)
        handle.reset()
        streamed = torch.cat([encode(tower, clip[i : i + 1]) for i in range(len(clip))])
    assert (batched - streamed).abs().max() <= TOL


_towers = {"clip": build_tiny_tower("clip"), "siglip": build_tiny_tower("siglip")}


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.25, 0.5, 0.99])
def test_recompute_counts_are_exact(tower, frames, ratio):
    tokens = encode(tower, frames[:1]).shape[1]
    prefix = prefix_tokens(tower)
    dynamic = max(1, math.floor(ratio * (tokens - prefix))) + prefix
    with stc.cacher_attached(tower, CacherConfig(update_ratio=ratio, cache_interval=3)) as handle:
        encode(tower, frames[:5])   # frames 0..4: refresh 0, 3
        encode(tower, frames[5:])   # frames 5..7: refresh 6
        calls = handle.stats.calls
    assert [c.refresh_frames for c in calls] == [(0, 3), (6,)]
    assert [c.selective_frames for c in calls] == [(1, 2, 4), (5, 7)]
    assert calls[0].recomputed_tokens == (2 * tokens + 3 * dynamic,) * 2
    assert calls[1].recomputed_tokens == (tokens + 2 * dynamic,) * 2
    assert handle.stats.recomputed_tokens == (3 * tokens + 5 * dynamic,) * 2
    assert handle.stats.recompute_fraction == pytest.approx((3 * tokens + 5 * dynamic) / (8 * tokens))


def test_reset_starts_a_new_stream(tower, frames):
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.1)) as handle:
        first = encode(tower, frames[:3])
        encode(tower, frames[3:])
        handle.reset()
        assert handle.stats.calls == () and handle.frame_index == 0
        again = encode(tower, frames[:3])
        assert handle.stats.calls[0].refresh_frames == (0, 2)
    assert torch.equal(first, again)


def test_detach_restores_bit_identical_outputs_and_attributes(tower, frames):
    layers = stc.integrations.find_vision_layers(tower)[1]
    before = [dict(layer.__dict__) for layer in layers]
    baseline = encode(tower, frames)
    handle = stc.attach_cacher(tower, CacherConfig(update_ratio=0.1))
    assert tower._stc_handle is handle
    assert all("forward" in layer.__dict__ for layer in layers)
    encode(tower, frames)
    handle.detach()
    assert not hasattr(tower, "_stc_handle")
    assert [dict(layer.__dict__) for layer in layers] == before
    assert torch.equal(encode(tower, frames), baseline)
    handle.detach()  # detaching twice is harmless


def test_attaching_twice_replaces_the_first_patch(tower, frames):
    baseline = encode(tower, frames)
    first = stc.attach_cacher(tower, CacherConfig(update_ratio=0.1))
    second = stc.attach_cacher(tower, CacherConfig(update_ratio=1.0))
    assert not first.attached and second.attached and tower._stc_handle is second
    assert (encode(tower, frames) - baseline).abs().max() <= TOL
    stc.detach_cacher(tower)
    assert not hasattr(tower, "_stc_handle")
    assert all("forward" not in layer.__dict__ for layer in stc.integrations.find_vision_layers(tower)[1])


def test_attach_finds_the_tower_inside_a_larger_model(frames):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    from tests.conftest import TINY_VIT

    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VIT).to_dict(),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64).to_dict(),
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    vision = model.model.vision_tower
    baseline = encode(vision, frames)
    with stc.cacher_attached(model, CacherConfig(update_ratio=1.0, cache_interval=1)) as handle:
        assert handle.tower is vision
        assert (encode(vision, frames) - baseline).abs().max() <= TOL
        assert handle.stats.refresh_frames == len(frames)


def test_accelerate_hooked_layers_get_old_forward_wrapped_and_restored(frames):
    tower = build_tiny_tower("siglip")
    layers = stc.integrations.find_vision_layers(tower)[1]
    baseline = encode(tower, frames)
    for layer in layers:  # what accelerate's add_hook_to_module leaves on a module
        layer._hf_hook = object()
        layer._old_forward = layer.forward
        layer.forward = types.MethodType(lambda self, *a, **k: self._old_forward(*a, **k), layer)
    originals = [layer._old_forward for layer in layers]
    with stc.cacher_attached(tower, CacherConfig(update_ratio=1.0, cache_interval=1)) as handle:
        assert all(layer._old_forward is not orig for layer, orig in zip(layers, originals))
        assert (encode(tower, frames) - baseline).abs().max() <= TOL
        assert handle.stats.refresh_frames == len(frames)
    assert all(layer._old_forward is orig for layer, orig in zip(layers, originals))


def test_transformers_4_layers_that_take_output_attentions_get_a_tuple_back():
    tower = build_tiny_tower("siglip")
    layer = stc.integrations.find_vision_layers(tower)[1][0]
    original = layer.forward
    layer.forward = lambda hidden_states, attention_mask=None, output_attentions=False: (original(hidden_states, attention_mask),)
    with stc.cacher_attached(tower, CacherConfig()):
        out = layer(torch.randn(1, 225, 32))
    assert isinstance(out, tuple) and out[0].shape == (1, 225, 32)


def test_unsupported_models_raise_and_name_what_was_expected():
    with pytest.raises(stc.UnsupportedModelError, match="expected a vision tower with layers of class CLIPEncoderLayer, Qwen2VLVisionBlock, SiglipEncoderLayer"):
        stc.attach_cacher(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(stc.UnsupportedModelError, match="found layer classes .*CLIPEncoderLayer"):
        stc.attach_cacher(text)


def test_attention_masks_and_a_changed_resolution_are_refused(frames):
    tower = build_tiny_tower("siglip")
    layer = stc.integrations.find_vision_layers(tower)[1][0]
    with stc.cacher_attached(tower, CacherConfig()) as handle:
        with pytest.raises(stc.STCError, match="got an attention mask"):
            layer(torch.randn(1, 225, 32), torch.zeros(1, 1, 225, 225))
        handle.reset()
        encode(tower, frames[:2])
        with pytest.raises(stc.StreamStateError, match="call handle.reset\\(\\) before feeding a video of another resolution"):
            layer(torch.randn(1, 100, 32))


def test_cuda_graph_option_falls_back_to_eager_on_cpu_with_a_warning(frames, caplog):
    tower = build_tiny_tower("clip")
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25)):
        eager = encode(tower, frames)
    with caplog.at_level("WARNING", logger="stc.cacher.graph"):
        with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25, cuda_graph=True)):
            graphed = encode(tower, frames)
    assert torch.equal(eager, graphed)
    assert "CUDA-graph replay is off, running eager (tensors are on cpu" in caplog.text


def test_index_tensors_of_a_call_pattern_are_made_once_per_process(frames):
    """Per-call index tensors are cached across streams and attaches: once the first stream has
    run, no later call (in a timed pass) copies an index tensor to the device."""
    from stc.cacher.state import pattern_indices

    tower = build_tiny_tower("siglip")
    with stc.cacher_attached(tower, CacherConfig(cache_interval=2)):
        for i in range(6):
            encode(tower, frames[i : i + 1])
    misses = pattern_indices.cache_info().misses
    with stc.cacher_attached(tower, CacherConfig(cache_interval=2)) as handle:
        for i in range(6):
            encode(tower, frames[i : i + 1])
        handle.reset()
        encode(tower, frames[:1])
    assert pattern_indices.cache_info().misses == misses


@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1, update_ratio=0.25), CacherConfig(update_ratio=1.0)])
def test_null_settings_keep_no_references(tower, frames, config):
    """Where no frame can be selective, layers store nothing: the null arm does the baseline's
    work and no more (like-for-like timing)."""
    with stc.cacher_attached(tower, config) as handle:
        encode(tower, frames[:2])
        encode(tower, frames[2:5])
        assert all(r is None for r in handle._state.references)
    assert handle.stats.refresh_frames + handle.stats.selective_frames == 5


def test_graph_stats_report_the_eager_fallback(frames):
    tower = build_tiny_tower("siglip")
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25, cuda_graph=True)) as handle:
        encode(tower, frames[:4])
    stats = handle.graph_stats
    assert stats.replays == 0 and stats.captures == 0 and stats.eager_calls == len(stc.integrations.find_vision_layers(tower)[1])  # one batched selective forward per layer
    assert stats.disabled_reason.startswith("tensors are on cpu")
    with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25)) as plain:
        assert plain.graph_stats is None


def _one_layer_inputs():
    """A SigLIP layer's ops and the inputs of one selective forward (x, reference keys, values,
    attention and MLP branches), on CPU."""
    from stc.cacher.block import full_forward
    from stc.integrations.hf_vit import HFViTLayerOps

    tower = build_tiny_tower("siglip")
    ops = HFViTLayerOps(stc.integrations.find_vision_layers(tower)[1][0], prefix_tokens=0)
    with torch.inference_mode():
        _, reference = full_forward(ops, torch.randn(1, 225, 32))
    return ops, [torch.randn(1, 225, 32), reference.keys, reference.values, reference.attn, reference.mlp]


class _FakeStream:
    """Stands in for ``torch.cuda.Stream`` on a machine without CUDA, remembering its device."""

    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


class _FakeCuda:
    """The ``torch.cuda`` calls ``SelectiveGraphs._capture`` makes, recorded; ``fail_capture_end``
    makes the graph context raise on exit as a failing ``capture_end`` does."""

    def __init__(self, monkeypatch, fail_capture_end=False):
        import contextlib

        self.caller = _FakeStream("caller")
        self.graph_streams = []
        self.set_streams = []
        fake = self

        class Graph:
            def replay(self):
                pass

        class GraphContext:
            def __init__(self, graph, pool=None, stream=None):
                fake.graph_streams.append(stream)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                if fail_capture_end:
                    raise RuntimeError("capture_end failed")

        for name, value in {
            "Stream": _FakeStream, "CUDAGraph": Graph, "graph": GraphContext,
            "device": lambda device: contextlib.nullcontext(), "stream": lambda s: contextlib.nullcontext(),
            "current_stream": lambda device=None: self.caller, "graph_pool_handle": lambda: "pool",
            "set_stream": self.set_streams.append,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_graphs_keep_one_capture_stream_per_device(monkeypatch):
    """torch.cuda.graph's own default stream belongs to the device current at the first capture;
    a capture for another GPU must get a stream of that GPU."""
    from stc.cacher.graph import SelectiveGraphs

    _FakeCuda(monkeypatch)
    graphs = SelectiveGraphs()
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    first = graphs._capture_stream(gpu0)
    assert graphs._capture_stream(gpu0) is first and first.device == gpu0
    assert graphs._capture_stream(gpu1) is not first and graphs._capture_stream(gpu1).device == gpu1


@pytest.mark.parametrize("fail_capture_end", [False, True])
def test_capture_names_its_stream_and_puts_the_callers_stream_back(monkeypatch, fail_capture_end):
    from stc.cacher.graph import SelectiveGraphs

    ops, inputs = _one_layer_inputs()
    cuda = _FakeCuda(monkeypatch, fail_capture_end)
    graphs = SelectiveGraphs()
    if fail_capture_end:
        with pytest.raises(RuntimeError, match="capture_end failed"):
            graphs._capture(ops, inputs, 56, "cosine")
    else:
        captured = graphs._capture(ops, inputs, 56, "cosine")
        assert captured.outputs[0].shape == inputs[0].shape and captured.outputs[1].shape == (1, 56)
    assert cuda.graph_streams == [graphs._capture_stream(inputs[0].device)]
    assert cuda.set_streams == [cuda.caller]  # restored even when capture_end raised


def test_replay_from_no_grad_of_buffers_made_in_inference_mode():
    """stc-bench captures under inference_mode, so the static buffers are inference tensors; a
    later call under no_grad must still be able to fill them, and gets normal tensors back."""
    from stc.cacher.graph import SelectiveGraphs, _Captured

    class DoublingGraph:  # what a captured graph does: read the static inputs, write the static outputs
        def __init__(self, inputs, outputs):
            self.inputs, self.outputs = inputs, outputs

        def replay(self):
            self.outputs[0].copy_(self.inputs[0] * 2)
            self.outputs[1].copy_(self.inputs[1])

    with torch.inference_mode():
        static = [torch.zeros(1, 4, 8), torch.zeros(1, 2, dtype=torch.long)]
        outputs = (torch.zeros(1, 4, 8), torch.zeros(1, 2, dtype=torch.long))
    graphs = SelectiveGraphs()
    captured = _Captured(graph=DoublingGraph(static, outputs), inputs=static, outputs=outputs)
    x, index = torch.randn(1, 4, 8), torch.tensor([[3, 1]])
    with torch.no_grad():
        y, chosen = graphs._replay(captured, [x, index])
    assert torch.equal(y, 2 * x) and torch.equal(chosen, index)
    assert not y.is_inference() and not chosen.is_inference()
    with torch.inference_mode():
        y, _ = graphs._replay(captured, [x + 1, index])
    assert torch.equal(y, 2 * (x + 1)) and graphs.stats.replays == 2
