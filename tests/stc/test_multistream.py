"""STC-Cacher serving several streams through one tower: S streams interleaved in calls give
what S separate one-stream runs give, for CLIP, SigLIP and Qwen2-VL towers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stc
from stc import CacherConfig
from stc.core import dynamic_token_count
from stc.integrations.hf_vit import find_vision_layers
from stc_bench.frameworks.livecc import patchify
from stc_bench.frameworks.transformers_compat import qwen2_vision_forward
from tests.conftest import build_tiny_tower, noisy_clip

pytestmark = pytest.mark.tier1

TOL = 1e-5
"""Frames batched with other streams' frames may take other kernel paths than alone: float
rounding differs, nothing else (noisy clips: no two tokens tie on similarity)."""
FRAMES = 8
"""Frames per stream clip (a stream that leaves and rejoins replays its clip from frame 0)."""


def _qwen_tower():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=2,
                                 temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return Qwen2VisionTransformerPretrainedModel(config).eval()


class ViT:
    """A CLIP or SigLIP tower: a frame is an image."""

    def __init__(self, kind: str):
        self.tower = build_tiny_tower(kind)

    def clip(self, seed: int) -> list[torch.Tensor]:
        return list(noisy_clip(FRAMES, seed=seed).unbind(0))                          # (3, 30, 30) each

    def encode(self, frames: list[torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self.tower(pixel_values=torch.stack(frames)).last_hidden_state     # (t, n, d)


class QwenViT:
    """A Qwen2-VL tower: a frame of the stream is a temporal group of two images, one
    ``grid_thw`` row per group, so a call may carry groups of several streams."""

    tower = None

    def __init__(self):
        if QwenViT.tower is None:
            QwenViT.tower = _qwen_tower()

    def clip(self, seed: int) -> list[torch.Tensor]:
        images = noisy_clip(2 * FRAMES, size=16, seed=seed)
        return [images[2 * i : 2 * i + 2] for i in range(FRAMES)]                   # (2, 3, 16, 16) each

    def encode(self, frames: list[torch.Tensor]) -> torch.Tensor:
        parts = [patchify(group, patch=2) for group in frames]
        patches, grid = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
        with torch.inference_mode():
            out = qwen2_vision_forward(self.tower, patches, grid)[1]                    # (t * n, C)
        return out.view(len(frames), -1, out.shape[-1])                                # (t, n, C)


MODELS = {"clip": lambda: ViT("clip"), "siglip": lambda: ViT("siglip"), "qwen2_vl": QwenViT}
_built = {}


def model(kind: str):
    if kind not in _built:
        _built[kind] = MODELS[kind]()
    return _built[kind]


# A schedule: calls (each a list of stream ids, one per frame, a stream's frames in its order)
# and "leave" events (the stream is reset; a later frame with its id starts it afresh).
schedules = st.lists(
    st.one_of(st.lists(st.integers(0, 2), min_size=1, max_size=5).map(lambda ids: ("call", ids)),
              st.integers(0, 2).map(lambda sid: ("leave", sid))),
    min_size=1, max_size=8,
)


def run_together(m, config, clips, schedule):
    """Every stream's output per (stream, episode, frame), fed as the schedule says."""
    outputs, cursor, episode = {}, {sid: 0 for sid in clips}, {sid: 0 for sid in clips}
    with stc.cacher_attached(m.tower, config) as handle:
        for event, arg in schedule:
            if event == "leave":
                handle.reset(arg)
                cursor[arg], episode[arg] = 0, episode[arg] + 1
                continue
            ids = [sid for i, sid in enumerate(arg) if cursor[sid] + arg[:i].count(sid) < FRAMES]
            if not ids:
                continue
            frames, keys = [], []
            for sid in ids:
                frames.append(clips[sid][cursor[sid]])
                keys.append((sid, episode[sid], cursor[sid]))
                cursor[sid] += 1
            with handle.streams(ids):
                out = m.encode(frames)
            outputs.update({key: out[i] for i, key in enumerate(keys)})
        stats = {sid: handle.stats_of(sid) for sid in handle.stream_ids}
        frame_index = {sid: handle.frame_index_of(sid) for sid in clips}
    return outputs, stats, frame_index


def run_alone(m, config, clips, outputs_together):
    """Each stream's frames, one per call through a one-stream attach, episode by episode."""
    outputs = {}
    episodes = sorted({(sid, ep) for sid, ep, _ in outputs_together})
    for sid, ep in episodes:
        count = 1 + max(i for s, e, i in outputs_together if (s, e) == (sid, ep))
        with stc.cacher_attached(m.tower, config):
            for i in range(count):
                outputs[(sid, ep, i)] = m.encode([clips[sid][i]])[0]
    return outputs


@settings(deadline=None, max_examples=30, derandomize=True)
@given(
    schedule=schedules,
    interval=st.integers(1, 4),
    ratio=st.sampled_from([0.1, 0.25, 0.5]),
    selection=st.sampled_from(["shared", "per_layer"]),
    kind=st.sampled_from(sorted(MODELS)),
)
def test_interleaved_streams_equal_separate_streams(schedule, interval, ratio, selection, kind):
    m = model(kind)
    config = CacherConfig(update_ratio=ratio, cache_interval=interval, selection=selection)
    clips = {sid: m.clip(seed=10 + sid) for sid in range(3)}
    together, stats, frame_index = run_together(m, config, clips, schedule)
    alone = run_alone(m, config, clips, together)
    assert together.keys() == alone.keys()
    for key in together:
        assert (together[key] - alone[key]).abs().max() <= TOL, key
    for sid, s in stats.items():  # each stream's last episode keeps its own refresh schedule
        frames = sorted(i for c in s.calls for i in (*c.refresh_frames, *c.selective_frames))
        assert frames == list(range(frame_index[sid]))
        assert {i for c in s.calls for i in c.refresh_frames} == {i for i in frames if i % interval == 0}


def test_one_call_batches_the_refresh_and_the_selective_frames_of_all_streams():
    """Four streams, one frame each per call: the first call refreshes all four in one full
    forward, the second runs all four selective frames in one selective forward."""
    m = model("siglip")
    clips = {sid: m.clip(seed=sid) for sid in range(4)}
    calls = []
    with stc.cacher_attached(m.tower, CacherConfig(update_ratio=0.25)) as handle:
        layer = find_vision_layers(m.tower)[1][0]
        hook = layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
        try:
            for step in range(2):
                with handle.streams([0, 1, 2, 3]):
                    m.encode([clips[sid][step] for sid in range(4)])
        finally:
            hook.remove()
        assert [handle.stats_of(sid).calls[1].selective_frames for sid in range(4)] == [(1,)] * 4
        tokens = handle.stats.calls[0].tokens_per_frame
        # the whole batch through the MLP once per call: four refresh frames, then four selective frames' rows
        assert calls == [4, 4]
        assert sum(c.recomputed_tokens[0] for c in handle.stats.calls) == 4 * tokens + 4 * dynamic_token_count(tokens, 0.25)


def test_memory_per_stream_and_a_stream_leaving():
    m = model("clip")
    clips = {sid: m.clip(seed=i) for i, sid in enumerate(("a", "b"))}
    with stc.cacher_attached(m.tower, CacherConfig()) as handle:
        with handle.streams(["a", "b"]):
            m.encode([clips["a"][0], clips["b"][0]])
        memory = handle.memory_bytes()
        layers, tokens, width = 2, 226, 32  # 15x15 patches + CLS, width 32
        assert memory == {"a": layers * 4 * tokens * width * 4, "b": layers * 4 * tokens * width * 4}
        handle.reset("a")
        assert handle.stream_ids == ("b",) and handle.frame_index_of("a") == 0 and handle.frame_index_of("b") == 1
        assert list(handle.memory_bytes()) == ["b"]
        with handle.streams(["b", "a"]):                       # "a" rejoins: its frame 0 refreshes
            m.encode([clips["b"][1], clips["a"][0]])
        assert handle.stats_of("a").calls[0].refresh_frames == (0,)
        assert handle.stats_of("b").calls[-1].selective_frames == (1,)


def test_stream_ids_must_match_the_call_and_be_ints_or_strings():
    m = model("siglip")
    frames = [m.clip(seed=0)[0]] * 2
    with stc.cacher_attached(m.tower, CacherConfig()) as handle:
        with pytest.raises(stc.StreamStateError) as err, handle.streams([0, 1, 2]):
            m.encode(frames)
        assert str(err.value) == ("this call carries 2 frames but handle.streams() named 3 stream ids: "
                                  "give one id per frame of each tower call made inside it")
        assert handle.stream_ids == ()                         # the failed call left nothing
        with pytest.raises(TypeError, match=r"stream id 1.5 \(float\) must be an int or a string"):
            with handle.streams([0, 1.5]):
                pass
        with pytest.raises(ValueError, match="at least one stream"):
            with handle.streams([]):
                pass
        with pytest.raises(TypeError, match="one id per frame"):
            with handle.streams("ab"):
                pass


def test_a_stream_of_another_resolution_is_refused_by_name():
    m = model("siglip")
    small = noisy_clip(1, size=30)[0]
    large = noisy_clip(1, size=34)[0]
    with stc.cacher_attached(m.tower, CacherConfig()) as handle:
        with handle.streams([7]):
            m.encode([small])
        with pytest.raises(stc.StreamStateError) as err, handle.streams([7]), torch.inference_mode():
            m.tower(pixel_values=large[None], interpolate_pos_encoding=True)
    assert str(err.value) == ("frames now have 289 tokens but stream 7 started with 225: "
                              "call handle.reset(7) before feeding a video of another resolution")


def test_a_stream_leaving_after_a_failed_layer_call_undoes_that_call_in_the_others():
    """Layers driven one by one (no tower guard): a call that stopped part-way is rolled back
    before a stream leaves, so the streams that stay are as they were before it."""
    m = model("siglip")
    clips = {sid: m.clip(seed=sid) for sid in range(2)}
    layers = find_vision_layers(m.tower)[1]
    with stc.cacher_attached(m.tower, CacherConfig()) as handle, torch.inference_mode():
        with handle.streams([0, 1]):
            m.encode([clips[0][0], clips[1][0]])
            embeddings = getattr(m.tower, "vision_model", m.tower).embeddings  # transformers 4.x nests the tower
            hidden = embeddings(torch.stack([clips[0][1], clips[1][1]]))
            layers[0](hidden)                                # layer 0 of a call that never reaches layer 1
        handle.reset(1)
        assert handle.frame_index_of(0) == 1 and len(handle.stats_of(0).calls) == 1
