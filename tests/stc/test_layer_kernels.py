"""What one patched layer launches, pinned: a launch-count regression fails here, with no timing.

On a GPU at batch 1 a selective layer is launch-bound: every extra operator costs more than its
arithmetic. The counts below are the operators each layer dispatches under ``no_grad`` (composite
operators split into what runs; views left out) on a one-frame step, the common streaming call.
A change that adds an operator to a hot path must update them here, on purpose.
"""

import functools

import pytest
import torch

import stc
from stc import CacherConfig
from stc.cacher.block import LayerReference, full_forward, selective_forward
from stc.core import select_changed_tokens, token_similarity
from stc.integrations.hf_vit import HFViTLayerOps, find_vision_layers
from stc_bench.frameworks.livecc import patchify
from stc_bench.frameworks.transformers_compat import qwen2_vision_forward
from tests.conftest import build_tiny_tower, noisy_clip
from tests.dispatch import counted_per_layer
from tests.stc.test_qwen2_vl import TOWER as QWEN2_VL_TOWER
from tests.stc.test_qwen2_vl import clip as qwen2_vl_clip

STREAM = CacherConfig(update_ratio=0.25, cache_interval=2)

# Operators per layer on a one-frame step: the unpatched layer, a refresh frame, a selective frame
# at layer 0 (which scores and selects tokens) and at a later layer (which reuses the selection).
PINNED = {
    "siglip": dict(unpatched=12, refresh=12, selective_first=34, selective_later=20),
    "clip": dict(unpatched=14, refresh=14, selective_first=38, selective_later=22),
    # Qwen2-VL's baseline in stc-bench is the batched-attention forward (attach_batched_attention),
    # which is the cacher's refresh forward; transformers' own block differs (per-group attention).
    "qwen2_vl": dict(unpatched=24, refresh=24, selective_first=48, selective_later=34),
}


@functools.lru_cache(maxsize=None)
def _step_counts(kind: str):
    """Per-layer operator counts of: the unpatched tower, then a refresh and a selective step of a stream."""
    if kind == "qwen2_vl":
        tower, frames = QWEN2_VL_TOWER, [qwen2_vl_clip(2, seed=s) for s in range(4)]
        baseline_patch = stc.integrations.batched_attention

        def call(x):
            qwen2_vision_forward(tower, *patchify(x, patch=2))
    else:
        tower, clip = build_tiny_tower(kind), noisy_clip(4)
        frames = [clip[i : i + 1] for i in range(4)]
        baseline_patch = None

        def call(x):
            tower(pixel_values=x)

    _, layers, _ = find_vision_layers(tower)
    if baseline_patch is not None:
        with baseline_patch(tower), counted_per_layer(layers) as unpatched:
            call(frames[0])
    else:
        with counted_per_layer(layers) as unpatched:
            call(frames[0])
    with stc.cacher_attached(tower, STREAM):
        with torch.no_grad():
            call(frames[0])                                  # frame 0 refreshes, frame 1 is selective:
            call(frames[1])                                  # one-time index tensors are made here
        with counted_per_layer(layers) as refresh:
            call(frames[2])
        with counted_per_layer(layers) as selective:
            call(frames[3])
    return unpatched.by_owner, refresh.by_owner, selective.by_owner


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_operators_per_layer_are_pinned(kind):
    unpatched, refresh, selective = _step_counts(kind)
    got = dict(
        unpatched=sum(unpatched[1].values()),
        refresh=sum(refresh[1].values()),
        selective_first=sum(selective[0].values()),
        selective_later=sum(selective[1].values()),
    )
    detail = {"refresh": dict(refresh[1]), "selective layer 0": dict(selective[0]), "selective layer 1": dict(selective[1])}
    assert got == PINNED[kind], f"operator counts changed: {got} (pinned {PINNED[kind]}); per operator: {detail}"


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_a_refresh_layer_dispatches_exactly_the_baselines_operators(kind):
    unpatched, refresh, _ = _step_counts(kind)
    for layer in unpatched:
        if layer is not None:
            assert refresh[layer] == unpatched[layer]


def _spec_selective_forward(ops, x, reference, count, metric, index=None):
    """The selective layer as the method defines it: gather the chosen tokens, recompute them,
    scatter them into copies of the reference's values, attention output and MLP output."""
    h = ops.norm1(x)
    k = ops.key(h)
    if index is None:
        index = select_changed_tokens(token_similarity(k, reference.keys, metric), count, ops.prefix_tokens)
    rows = index.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    h_sel = h.gather(1, rows)
    v = reference.values.scatter(1, rows, ops.value(h_sel))
    x = x + reference.attn.scatter(1, rows, ops.attend(ops.query(h_sel, index), k, v))
    m_sel = ops.mlp(ops.norm2(x.gather(1, rows)))
    return x + reference.mlp.scatter(1, rows, m_sel), index


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_selective_forward_equals_the_methods_definition_bit_for_bit(kind, frames, dtype, metric):
    tower = build_tiny_tower(kind).to(dtype)
    _, layers, _ = find_vision_layers(tower)
    ops = HFViTLayerOps(layers[0], prefix_tokens=1 if kind == "clip" else 0)
    tokens = 225 + ops.prefix_tokens
    g = torch.Generator().manual_seed(frames)
    x = torch.randn(frames, tokens, 32, generator=g).to(dtype)
    with torch.no_grad():
        _, reference = full_forward(ops, torch.randn(1, tokens, 32, generator=g).to(dtype))
        reference = reference.expand(frames)                         # one stored reference read by every frame
        kept = LayerReference(*(t.clone() for t in (reference.keys, reference.values, reference.attn, reference.mlp)))
        y, index = selective_forward(ops, x, reference, 56, metric)
        want_y, want_index = _spec_selective_forward(ops, x, reference, 56, metric)
        y_shared, _ = selective_forward(ops, x, reference, 56, metric, want_index)
    assert torch.equal(index, want_index)
    assert torch.equal(y, want_y) and torch.equal(y_shared, want_y)
    assert all(torch.equal(a, b) for a, b in zip((reference.keys, reference.values, reference.attn, reference.mlp),
                                                 (kept.keys, kept.values, kept.attn, kept.mlp))), "the reference was written"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_under_autocast_the_selective_layer_keeps_the_residual_streams_type(kind):
    """Under autocast the projections give bfloat16 while the residual stream stays float32;
    the in-place adds must not narrow it (the unpatched layer returns float32)."""
    tower = build_tiny_tower(kind)
    _, layers, _ = find_vision_layers(tower)
    ops = HFViTLayerOps(layers[0], prefix_tokens=1 if kind == "clip" else 0)
    tokens = 225 + ops.prefix_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, tokens, 32, generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, reference = full_forward(ops, torch.randn(1, tokens, 32, generator=g))
        y, index = selective_forward(ops, x, reference.expand(2), 56, "cosine")
        want, _ = _spec_selective_forward(ops, x, reference.expand(2), 56, "cosine", index)
    assert y.dtype == want.dtype == torch.float32
    assert torch.equal(y, want)
