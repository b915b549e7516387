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

pytestmark = pytest.mark.tier1

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

    from stc_bench.frameworks.transformers_compat import llava_onevision_parts
    from tests.conftest import TINY_VIT

    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VIT).to_dict(),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64).to_dict(),
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    vision = llava_onevision_parts(model)[0]
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
        assert all(r is None for r in handle._state.stream().references)
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
    from stc.cacher.graph import CUDAGraphBackend

    _FakeCuda(monkeypatch)
    backend = CUDAGraphBackend()
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    first = backend.capture_stream(gpu0)
    assert backend.capture_stream(gpu0) is first and first.device == gpu0
    assert backend.capture_stream(gpu1) is not first and backend.capture_stream(gpu1).device == gpu1


@pytest.mark.parametrize("fail_capture_end", [False, True])
def test_capture_names_its_stream_and_puts_the_callers_stream_back(monkeypatch, fail_capture_end):
    from stc.cacher.graph import CUDAGraphBackend, SelectiveGraphs

    ops, inputs = _one_layer_inputs()
    cuda = _FakeCuda(monkeypatch, fail_capture_end)
    backend = CUDAGraphBackend()
    graphs = SelectiveGraphs(backend)
    if fail_capture_end:
        with pytest.raises(RuntimeError, match="capture_end failed"):
            graphs._capture(ops, inputs, [False] * len(inputs), 56, "cosine")
    else:
        captured = graphs._capture(ops, inputs, [False] * len(inputs), 56, "cosine")
        assert captured.outputs[0].shape == inputs[0].shape and captured.outputs[1].shape == (1, 56)
    assert cuda.graph_streams == [backend.capture_stream(inputs[0].device)]
    assert cuda.set_streams == [cuda.caller]  # restored even when capture_end raised


def test_replay_from_no_grad_of_buffers_made_in_inference_mode():
    """stc-bench captures under inference_mode, so the static buffers are inference tensors; a
    later call under no_grad must still be able to fill them, and gets the graph's buffers back."""
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
    captured = _Captured(replay=DoublingGraph(static, outputs).replay, copies=static, outputs=outputs)
    x, index = torch.randn(1, 4, 8), torch.tensor([[3, 1]])
    with torch.no_grad():
        y, chosen = graphs._replay(captured, [x, index])
    assert torch.equal(y, 2 * x) and torch.equal(chosen, index)
    assert y is outputs[0] and chosen is outputs[1]  # handed out without a copy
    with torch.inference_mode():
        y, _ = graphs._replay(captured, [x + 1, index])
    assert torch.equal(y, 2 * (x + 1)) and graphs.stats.replays == 2


class _Fault(Exception):
    pass


def _raise_fault(*args, **kwargs):
    raise _Fault("injected")


def _stream(tower, clip, calls, fail=None):
    """Feed ``clip`` in the given (start, end) calls; ``fail`` = (call number, module) makes that
    module raise during that call, which is then retried. Returns the outputs of the calls that
    succeeded, and the handle's frame index right after the failure."""
    outputs, after_failure = [], None
    for number, (start, end) in enumerate(calls):
        if fail is not None and number == fail[0]:
            module = fail[1]
            module.forward = _raise_fault
            try:
                with pytest.raises(_Fault):
                    encode(tower, clip[start:end])
            finally:
                del module.forward
            after_failure = tower_handle(tower).frame_index, len(tower_handle(tower).stats.calls)
        outputs.append(encode(tower, clip[start:end]))
    return torch.cat(outputs), after_failure


def tower_handle(tower):
    return stc.integrations.find_vision_layers(tower)[0]._stc_handle


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("where", ["layer 0", "layer 3", "layer 5", "post-norm"])
def test_a_call_that_raises_part_way_is_rolled_back(kind, where):
    """An error in layer 3 of 6 leaves layers 0-2 with the new refresh frame's references and
    the frame counter advanced; the stream must forget the call, so a retry continues it
    exactly as a stream that never failed."""
    tower = build_tiny_tower(kind, num_hidden_layers=6)
    layers = stc.integrations.find_vision_layers(tower)[1]
    post_norm = next(m for name, m in tower.named_modules() if name.endswith("post_layernorm"))
    module = post_norm if where == "post-norm" else layers[int(where[-1])].mlp
    clip = noisy_clip(8, seed=3)
    calls = [(0, 3), (3, 5), (5, 8)]  # the failing call holds a selective frame (3) and a refresh frame (4)
    config = CacherConfig(update_ratio=0.25, cache_interval=2)
    with stc.cacher_attached(tower, config):
        clean, _ = _stream(tower, clip, calls)
    with stc.cacher_attached(tower, config) as handle:
        recovered, after_failure = _stream(tower, clip, calls, fail=(1, module))
        assert after_failure == (3, 1)  # frame counter and statistics as before the failed call
        assert [c.first_frame for c in handle.stats.calls] == [0, 3, 5]
    assert torch.equal(recovered, clean)


def test_layers_called_one_by_one_roll_back_a_call_that_stopped_part_way():
    """Without the tower's guard (a caller running the encoder layers itself), the next call's
    first layer finds the unfinished call and undoes it."""
    tower = build_tiny_tower("siglip", num_hidden_layers=6)
    layers = stc.integrations.find_vision_layers(tower)[1]
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(2, 225, 32, generator=g) for _ in range(3)]

    def run(x, stop_at=None):
        for i, layer in enumerate(layers):
            if i == stop_at:
                raise _Fault("stopped")
            x = layer(x)
            x = x[0] if isinstance(x, tuple) else x  # transformers 4.x layers return a tuple
        return x

    with torch.inference_mode():
        with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25)):
            clean = [run(x) for x in hidden]
        with stc.cacher_attached(tower, CacherConfig(update_ratio=0.25)) as handle:
            first = run(hidden[0])
            with pytest.raises(_Fault):
                run(hidden[1], stop_at=3)
            recovered = [first, run(hidden[1]), run(hidden[2])]
            assert handle.frame_index == 6 and len(handle.stats.calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(recovered, clean))


def test_a_layer_called_without_layer_0_says_what_to_do():
    tower = build_tiny_tower("siglip")
    layer = stc.integrations.find_vision_layers(tower)[1][1]
    with stc.cacher_attached(tower, CacherConfig()), pytest.raises(stc.StreamStateError) as err:
        layer(torch.randn(1, 225, 32))
    assert str(err.value) == ("layer 1 of a patched tower ran outside a call that started at layer 0: "
                              "call the tower, or its layers in order from layer 0")


@pytest.mark.parametrize("model", [None, "tower", 3])
@pytest.mark.parametrize("call", ["attach_cacher", "detach_cacher", "cacher_attached", "find_vision_layers"])
def test_a_model_that_is_not_a_module_is_a_type_error_naming_what_to_pass(model, call):
    got = "None" if model is None else type(model).__name__
    with pytest.raises(TypeError) as err:
        if call == "cacher_attached":
            with stc.cacher_attached(model):
                pass
        else:
            getattr(stc.integrations, call)(model)
    assert isinstance(err.value, stc.UnsupportedModelError)
    name = "attach_cacher" if call == "cacher_attached" else call
    assert str(err.value) == (
        f"{name} needs the torch.nn.Module that holds the vision tower (a CLIPVisionModel, a SiglipVisionModel, "
        "a Qwen2-VL vision tower, or a model holding one, such as LlavaOnevisionForConditionalGeneration); "
        f"got {got}"
    )


@pytest.mark.parametrize("config, got", [({"update_ratio": 0.5}, "dict"), (0.25, "float"), (stc.PrunerConfig(), "PrunerConfig")])
def test_a_config_of_the_wrong_type_is_refused(tower, config, got):
    with pytest.raises(TypeError) as err:
        stc.attach_cacher(tower, config)
    assert str(err.value) == f"config must be a stc.CacherConfig (or None for the defaults), got {got}"
    assert not hasattr(tower, "_stc_handle")


def test_an_attach_that_fails_part_way_leaves_nothing_patched(monkeypatch):
    from stc.integrations import hf_vit

    tower = build_tiny_tower("siglip")
    before = {name: dict(m.__dict__) for name, m in tower.named_modules()}
    built = []

    class FailingOps(hf_vit.HFViTLayerOps):  # the second layer lacks what the cacher needs
        def __init__(self, layer, prefix_tokens):
            built.append(layer)
            if len(built) == 2:
                raise AttributeError("'SiglipAttention' object has no attribute 'scale'")
            super().__init__(layer, prefix_tokens)

    monkeypatch.setattr(hf_vit, "HFViTLayerOps", FailingOps)
    with pytest.raises(AttributeError, match="no attribute 'scale'"):
        stc.attach_cacher(tower)
    assert {name: dict(m.__dict__) for name, m in tower.named_modules()} == before
