"""Analytic multiply-add (MAC) counts: the limit of what STC can save.

Counts cover the matrix products (patch embeddings, projections, attention, MLPs, mergers,
projectors), which dominate; norms, activations, biases, position-embedding adds and lookups,
pooling, token scoring and gathers are left out. One MAC = one multiply + one add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stc.config import CacherConfig
from stc.core.selection import dynamic_token_count


@dataclass(frozen=True)
class ViTShape:
    """A pre-LN ViT: tokens per frame (CLS included), width d, MLP width f, layer count."""

    tokens: int
    width: int
    mlp_width: int
    layers: int
    prefix_tokens: int = 0


@dataclass(frozen=True)
class LLMShape:
    """A decoder-only LLM with grouped-query attention and a gated (SwiGLU) MLP."""

    width: int
    mlp_width: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


def vit_layer_macs(tokens: int, width: int, mlp_width: int, recomputed: int | None = None) -> int:
    """MACs of one layer on one frame of n = ``tokens`` tokens.

    Full (``recomputed`` None): ``4 n d^2 + 2 n^2 d + 2 n d f``. Selective, r = ``recomputed``:
    ``n d^2`` (keys of all tokens) ``+ 2 r d^2`` (queries, values) ``+ 2 r n d`` (attention of
    r queries over n keys) ``+ r d^2`` (output projection) ``+ 2 r d f`` (MLP).
    """
    n, d, f = tokens, width, mlp_width
    if recomputed is None:
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * f
    r = recomputed
    return n * d * d + 2 * r * d * d + 2 * r * n * d + r * d * d + 2 * r * d * f


def patch_embedding_macs(patches: int, width: int, patch_size: int, channels: int = 3, temporal_patch: int = 1) -> int:
    """MACs of a ViT's patch embedding (a strided convolution, i.e. a matmul) on ``patches`` patches:
    ``patches * (channels * temporal_patch * patch_size^2) * width``. A class token (concatenated,
    not computed) and the position embeddings (a lookup and an add) cost no MACs."""
    return patches * channels * temporal_patch * patch_size * patch_size * width


def patch_merger_macs(tokens: int, width: int, out_width: int, merge: int = 2) -> int:
    """MACs of Qwen2-VL's PatchMerger on ``tokens`` ViT tokens: LayerNorm (left out), then each
    window of ``merge^2`` tokens, concatenated to h = ``merge^2 * width``, through Linear(h, h),
    GELU (left out), Linear(h, out_width): ``tokens / merge^2 * (h^2 + h * out_width)``."""
    hidden = merge * merge * width
    return tokens // (merge * merge) * (hidden * hidden + hidden * out_width)


def projector_macs(tokens: int, in_width: int, out_width: int) -> int:
    """MACs of a LLaVA-style projector, Linear(in, out), GELU (left out), Linear(out, out), on
    ``tokens`` tokens: ``tokens * (in * out + out^2)``."""
    return tokens * (in_width * out_width + out_width * out_width)


def refresh_frame_count(frames: int, cache_interval: int) -> int:
    """Frames i in [0, frames) with i % cache_interval == 0 (a fresh stream)."""
    return math.ceil(frames / cache_interval)


def vit_tower_macs(shape: ViTShape, frames: int, cacher: CacherConfig | None = None) -> int:
    """MACs of the tower on the first ``frames`` frames of a stream, without or with the cacher."""
    full = vit_layer_macs(shape.tokens, shape.width, shape.mlp_width)
    if cacher is None:
        return frames * shape.layers * full
    patch = shape.tokens - shape.prefix_tokens
    count = dynamic_token_count(patch, cacher.update_ratio)
    refresh = refresh_frame_count(frames, cacher.cache_interval)
    if count >= patch:
        selective = full
    else:
        selective = vit_layer_macs(shape.tokens, shape.width, shape.mlp_width, count + shape.prefix_tokens)
    return shape.layers * (refresh * full + (frames - refresh) * selective)


def prefill_macs(shape: LLMShape, new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1) -> int:
    """MACs of one causal pre-fill of m = ``new_tokens`` tokens over a KV cache of p tokens.

    Per layer: q and o projections ``2 m d^2``, k and v ``2 m d d_kv``, attention
    ``2 d (m p + m (m + 1) / 2)`` (each new token sees the cache and the new tokens up to
    itself), gated MLP ``3 m d f``; plus the LM head on ``logits_tokens`` positions.
    """
    m, p, d = new_tokens, past_tokens, shape.width
    kv_width = shape.kv_heads * (d // shape.heads)
    attention = 2 * d * (m * p + m * (m + 1) // 2)
    per_layer = 2 * m * d * d + 2 * m * d * kv_width + attention + 3 * m * d * shape.mlp_width
    return shape.layers * per_layer + logits_tokens * d * shape.vocab


def streamed_prefill_macs(shape: LLMShape, chunk_tokens: list[int], past_tokens: int = 0, logits_tokens: int = 1) -> int:
    """MACs of pre-filling chunks one after another into a growing KV cache, each with the LM
    head on ``logits_tokens`` positions (0 where the pre-fill computes no logits)."""
    total, past = 0, past_tokens
    for m in chunk_tokens:
        total += prefill_macs(shape, m, past, logits_tokens)
        past += m
    return total
