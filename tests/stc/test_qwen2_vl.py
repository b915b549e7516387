"""STC-Cacher on a tiny Qwen2-VL vision tower: temporal groups as frames, fused qkv, 2-D RoPE."""

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import stc
from stc import CacherConfig
from stc_bench.frameworks.livecc import patchify
from stc_bench.frameworks.transformers_compat import qwen2_vision_forward

pytestmark = pytest.mark.tier1

TOL = 1e-5
TOKENS = 64  # 16x16 px, patch 2 -> 8x8 tokens per temporal group


def build_tower():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    torch.manual_seed(0)
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=2,
                                 temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return Qwen2VisionTransformerPretrainedModel(config).eval()


TOWER = build_tower()


def clip(frames: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """A scene plus per-pixel noise of random amplitude: every token changes by a different amount."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(1, 3, size, size, generator=g)
    return scene + torch.rand(1, 1, size, size, generator=g) * torch.randn(frames, 3, size, size, generator=g)


def run(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged tokens, last block's output) of the tower on ``frames``, on any transformers version."""
    with torch.inference_mode():
        return qwen2_vision_forward(TOWER, *patchify(frames, patch=2))


def encode(frames: torch.Tensor) -> torch.Tensor:
    return run(frames)[1].view(-1, TOKENS, 32)                                          # (groups, n, C)


@pytest.mark.parametrize("config", [CacherConfig(update_ratio=1.0), CacherConfig(cache_interval=1, update_ratio=0.1)])
def test_full_ratio_or_interval_one_reproduce_the_tower(config):
    frames = clip(8)
    baseline = encode(frames)
    with stc.cacher_attached(TOWER, config) as handle:
        patched = encode(frames)
    assert (patched - baseline).abs().max() <= TOL
    assert handle.stats.calls[0].tokens_per_frame == TOKENS


def test_identical_groups_reproduce_the_tower_at_any_ratio():
    still = clip(1).expand(8, -1, -1, -1)
    baseline = encode(still)
    with stc.cacher_attached(TOWER, CacherConfig(update_ratio=0.1, cache_interval=4)) as handle:
        patched = encode(still)
    assert handle.stats.selective_frames == 3
    assert (patched - baseline).abs().max() <= TOL


def test_selective_groups_differ_and_merger_output_follows():
    frames = clip(8)
    base = run(frames)[0]
    with stc.cacher_attached(TOWER, CacherConfig(update_ratio=0.1)):
        new = run(frames)[0]
    per_group = (new - base).abs().view(4, -1).amax(dim=1)
    assert per_group[0] <= TOL and per_group[2] <= TOL and per_group[1] > 1e-3


@settings(deadline=None, max_examples=15, derandomize=True)
@given(splits=st.lists(st.integers(1, 3), min_size=1, max_size=4), interval=st.integers(1, 3),
       ratio=st.sampled_from([0.1, 0.25, 0.5]), selection=st.sampled_from(["shared", "per_layer"]))
def test_batched_groups_equal_one_group_per_call(splits, interval, ratio, selection):
    frames = clip(2 * sum(splits), seed=len(splits))
    with stc.cacher_attached(TOWER, CacherConfig(update_ratio=ratio, cache_interval=interval, selection=selection)) as h:
        parts, start = [], 0
        for groups in splits:
            parts.append(encode(frames[2 * start : 2 * (start + groups)]))
            start += groups
        h.reset()
        single = torch.cat([encode(frames[2 * i : 2 * i + 2]) for i in range(sum(splits))])
    assert (torch.cat(parts) - single).abs().max() <= TOL


def test_recompute_counts_per_group():
    with stc.cacher_attached(TOWER, CacherConfig(update_ratio=0.25, cache_interval=2)) as handle:
        encode(clip(6))                                    # groups 0, 1, 2
        encode(clip(2, seed=1))                            # group 3
    calls = handle.stats.calls
    assert [c.refresh_frames for c in calls] == [(0, 2), ()]
    assert [c.selective_frames for c in calls] == [(1,), (3,)]
    assert calls[0].recomputed_tokens == (2 * TOKENS + 16,) * 2 and calls[1].recomputed_tokens == (16,) * 2


def test_a_new_resolution_starts_a_new_stream_and_mixed_grids_are_refused():
    with stc.cacher_attached(TOWER, CacherConfig()) as handle:
        encode(clip(4))
        with torch.inference_mode():
            TOWER(*patchify(clip(2, size=24), patch=2))    # 12x12 tokens: a new stream
        assert handle.stats.calls[-1].refresh_frames == (0,) and handle.frame_index == 1
        a, grid_a = patchify(clip(2), patch=2)
        b, grid_b = patchify(clip(2, size=24), patch=2)
        with pytest.raises(stc.STCError, match="must share one \\(h, w\\)"):
            TOWER(torch.cat([a, b]), torch.cat([grid_a, grid_b]))


def test_detach_restores_the_tower_and_its_blocks():
    blocks = list(TOWER.blocks)
    before = encode(clip(4))
    handle = stc.attach_cacher(TOWER, CacherConfig(update_ratio=0.1))
    assert "forward" in TOWER.__dict__ and all("forward" in b.__dict__ for b in blocks)
    handle.detach()
    assert "forward" not in TOWER.__dict__ and all("forward" not in b.__dict__ for b in blocks)
    assert torch.equal(encode(clip(4)), before)


def test_older_rotary_pos_emb_signature_gives_the_same_output():
    """transformers 4.4x passed the rotary angles (rotary_pos_emb) instead of (cos, sin)."""
    block = TOWER.blocks[0]
    x = torch.randn(TOKENS, 32)
    angles = torch.randn(TOKENS, 4)                                         # head_dim 8 -> 4 angles
    emb = torch.cat([angles, angles], dim=-1)
    cu = torch.tensor([0, TOKENS])
    with stc.cacher_attached(TOWER, CacherConfig()) as handle, torch.inference_mode():
        handle._state.call_shape = (1, TOKENS)
        old = block(x, cu, rotary_pos_emb=angles)
        handle.reset()
        new = block(x, cu, position_embeddings=(emb.cos(), emb.sin()))
        # The block's own forward, in this transformers version's signature (rotary_pos_emb in older 4.x).
        takes_cos_sin = "position_embeddings" in inspect.signature(type(block).forward).parameters
        rotary = {"position_embeddings": (emb.cos(), emb.sin())} if takes_cos_sin else {"rotary_pos_emb": angles}
        reference = type(block).forward(block, x, cu, **rotary)
    assert torch.allclose(old, new) and (new - reference).abs().max() <= TOL


def test_cuda_graph_option_runs_eager_with_a_warning(caplog):
    frames = clip(4)
    with stc.cacher_attached(TOWER, CacherConfig()):
        eager = encode(frames)
    with caplog.at_level("WARNING", logger="stc.integrations.hf_vit"):
        with stc.cacher_attached(TOWER, CacherConfig(cuda_graph=True)):
            graphed = encode(frames)
    assert torch.equal(eager, graphed) and "not available for Qwen2-VL towers yet" in caplog.text


def test_batched_attention_reproduces_the_tower_and_detaches_exactly():
    """The baseline patch stc-bench uses for like-for-like kernels: same outputs, one SDPA per
    block for all groups of a call (transformers' sdpa path runs one per group)."""
    from stc.integrations import attach_batched_attention, batched_attention

    frames = clip(6)
    baseline = encode(frames)
    before = {name: dict(m.__dict__) for name, m in TOWER.named_modules()}
    with batched_attention(TOWER):
        with count_sdpa() as calls:
            patched = encode(frames)
    assert (patched - baseline).abs().max() <= TOL
    assert calls["n"] == len(TOWER.blocks)  # 3 groups, one attention call per block
    assert {name: dict(m.__dict__) for name, m in TOWER.named_modules()} == before
    handle = attach_batched_attention(TOWER)
    with stc.cacher_attached(TOWER, CacherConfig(cache_interval=1)):  # one patch at a time: the cacher replaces it
        assert TOWER._stc_handle is not handle and not handle.attached
    assert "_stc_handle" not in TOWER.__dict__


def test_batched_attention_refuses_towers_that_already_batch():
    from stc.integrations import attach_batched_attention
    from tests.conftest import build_tiny_tower

    with pytest.raises(stc.UnsupportedModelError, match="batched attention is for Qwen2-VL vision towers"):
        attach_batched_attention(build_tiny_tower("siglip"))


def count_sdpa():
    """Count calls of torch's SDPA op while the context is open."""
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {"n": 0}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func.overloadpacket):
                calls["n"] += 1
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting():
        with Counter():
            yield calls

    return counting()
