"""The two forwards of a pre-LN ViT layer under STC-Cacher, as pure tensor code.

Both are written against ``LayerOps``: the layer's own sub-modules (norms, projections,
attention kernel, MLP), supplied by an integration. Nothing here knows a transformers name.

    h = LN1(x);  q, k, v = Wq h, Wk h, Wv h
    a = Wo Attention(q, k, v);  x' = x + a;  m = MLP(LN2(x'));  y = x' + m
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from stc.core import select_changed_tokens, token_similarity


class LayerOps(Protocol):
    """The sub-modules of one pre-LN encoder layer, as the cacher calls them.

    Tensors are (frames, tokens, width). ``index`` holds the positions of the given tokens
    on the frame's token axis (None = all tokens, in order); an integration that applies
    position-dependent transforms to queries (rotary) needs it.
    """

    prefix_tokens: int
    """Leading tokens that are always recomputed (1 for a CLS token, else 0)."""

    def norm1(self, x: torch.Tensor) -> torch.Tensor: ...
    def query(self, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor: ...
    def key(self, h: torch.Tensor) -> torch.Tensor: ...
    def value(self, h: torch.Tensor) -> torch.Tensor: ...
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of q (B, m, d) over k, v (B, n, d), output projection included."""
        ...
    def norm2(self, x: torch.Tensor) -> torch.Tensor: ...
    def mlp(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayerReference:
    """What a refresh frame leaves for later frames: keys, values, attention-branch output and
    MLP-branch output, each (frames, n, d) (one frame once stored in the stream state)."""

    keys: torch.Tensor
    values: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor

    def frame(self, i: int) -> LayerReference:
        """The reference of frame ``i`` alone, as an owned (1, n, d) copy (drops the batch)."""
        return LayerReference(*(t[i : i + 1].clone() for t in (self.keys, self.values, self.attn, self.mlp)))

    def gather(self, frames: torch.Tensor) -> LayerReference:
        """Frames ``frames`` (S,) of this batch of references -> (S, n, d) each."""
        return LayerReference(*(t.index_select(0, frames) for t in (self.keys, self.values, self.attn, self.mlp)))

    def expand(self, frames: int) -> LayerReference:
        """A one-frame reference broadcast to ``frames`` frames, without copying."""
        return LayerReference(*(t.expand(frames, -1, -1) for t in (self.keys, self.values, self.attn, self.mlp)))

    @staticmethod
    def concat(parts: list[LayerReference]) -> LayerReference:
        """Stack references of several sources along the frame axis."""
        return LayerReference(*(torch.cat(ts, dim=0) for ts in zip(*((p.keys, p.values, p.attn, p.mlp) for p in parts))))


def full_forward(ops: LayerOps, x: torch.Tensor) -> tuple[torch.Tensor, LayerReference]:
    """The unmodified layer forward on refresh frames x (R, n, d), keeping its intermediates."""
    h = ops.norm1(x)                                  # (R, n, d)
    k, v = ops.key(h), ops.value(h)                   # (R, n, d)
    a = ops.attend(ops.query(h, None), k, v)          # (R, n, d)
    x = x + a
    m = ops.mlp(ops.norm2(x))                         # (R, n, d)
    return x + m, LayerReference(keys=k, values=v, attn=a, mlp=m)


def plain_forward(ops: LayerOps, x: torch.Tensor) -> torch.Tensor:
    """The unmodified layer forward on frames x (R, n, d), keeping nothing: each intermediate is
    released as soon as the layer itself would release it, so a forward that stores no reference
    (a null setting, a baseline's batched attention) allocates like the unpatched layer."""
    h = ops.norm1(x)                                  # (R, n, d)
    k, v = ops.key(h), ops.value(h)                   # (R, n, d)
    q = ops.query(h, None)                            # (R, n, d)
    del h
    a = ops.attend(q, k, v)                           # (R, n, d)
    del q, k, v
    x = x + a
    del a
    return x + ops.mlp(ops.norm2(x))


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """(S, r) token indices -> (S, r, width) indices for gather/scatter along the token axis."""
    return index.unsqueeze(-1).expand(-1, -1, width)


def selective_forward(
    ops: LayerOps,
    x: torch.Tensor,
    reference: LayerReference,
    count: int,
    metric: str,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute only the most-changed tokens of selective frames x (S, n, d).

    ``reference`` holds each frame's reference, (S, n, d) per tensor. When ``index`` is None
    this layer scores its fresh keys against the reference keys and picks the ``count`` least
    similar patch tokens (plus the prefix tokens); otherwise it reuses ``index`` (S, r), chosen by
    an earlier layer. Returns the layer output (S, n, d) and the index used (S, r).
    """
    h = ops.norm1(x)                                  # (S, n, d)
    k = ops.key(h)                                    # (S, n, d): keys of every token stay fresh
    if index is None:
        similarity = token_similarity(k, reference.keys, metric)               # (S, n)
        index = select_changed_tokens(similarity, count, ops.prefix_tokens)    # (S, r)
    rows = _rows(index, h.shape[-1])
    h_sel = h.gather(1, rows)                         # (S, r, d)
    v_sel = ops.value(h_sel)                          # (S, r, d)
    v = reference.values.scatter(1, _rows(index, v_sel.shape[-1]), v_sel)      # (S, n, d)
    a_sel = ops.attend(ops.query(h_sel, index), k, v)                          # (S, r, d)
    x = x + reference.attn.scatter(1, rows, a_sel)    # residual: the frame's own x for all tokens
    m_sel = ops.mlp(ops.norm2(x.gather(1, rows)))     # (S, r, d); LN is per token, so gather first
    return x + reference.mlp.scatter(1, rows, m_sel), index
