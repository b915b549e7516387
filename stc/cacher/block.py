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

    def frame(self, i: int, view: bool = False) -> LayerReference:
        """The reference of frame ``i`` alone, (1, n, d) per tensor.

        A one-frame batch is returned as it is: its tensors are the forward's own outputs, which
        nothing writes into later (the common one-frame refresh step then copies nothing). A
        frame of a larger batch is copied out, so the stored reference does not keep the batch,
        unless ``view`` (the caller keeps every frame of the batch: views copy nothing)."""
        if self.keys.shape[0] == 1:
            return self
        return LayerReference(*(t[i : i + 1] if view else t[i : i + 1].clone()
                                for t in (self.keys, self.values, self.attn, self.mlp)))

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


def flat_rows(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """(S, r) token indices of S frames of ``tokens`` tokens -> (S * r,) row numbers in the frames'
    (S * tokens, d) flattened view, so one ``index_select``/``index_copy_`` moves whole rows (a
    gather/scatter with an expanded (S, r, d) index reads an index per element instead)."""
    frames = index.shape[0]
    if frames == 1:
        return index.view(-1)                                          # the one-frame step: no kernel
    offsets = torch.arange(0, frames * tokens, tokens, device=index.device)    # (S,)
    return (index + offsets.unsqueeze(1)).view(-1)                     # (S * r,)


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (S * r,) of t (S, n, d), as a new contiguous (S, r, d) tensor."""
    frames, tokens, width = t.shape
    return t.reshape(frames * tokens, width).index_select(0, rows).view(frames, -1, width)


def with_rows(base: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new contiguous copy of base (S, n, d) (which may be a broadcast one-frame reference)
    whose rows ``rows`` (S * r,) are replaced by values (S, r, d), in ``dtype`` (default: base's);
    ``base`` is left untouched."""
    out = base.to(dtype or base.dtype, memory_format=torch.contiguous_format, copy=True)  # (S, n, d), never base
    out.view(-1, out.shape[-1]).index_copy_(0, rows, values.reshape(-1, values.shape[-1]).to(out.dtype))
    return out


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

    Bit for bit the layer forward with the reference's values, attention and MLP outputs in
    place of the unselected tokens' own. Rows move with ``index_select``/``index_copy_``, and
    both residual adds write into tensors this forward owns: ``x`` itself is never written (a
    tower that returns hidden states still holds it).
    """
    h = ops.norm1(x)                                  # (S, n, d)
    k = ops.key(h)                                    # (S, n, d): keys of every token stay fresh
    if index is None:
        similarity = token_similarity(k, reference.keys, metric)               # (S, n)
        index = select_changed_tokens(similarity, count, ops.prefix_tokens)    # (S, r)
    rows = flat_rows(index, x.shape[1])               # (S * r,)
    h_sel = take_rows(h, rows)                        # (S, r, d)
    v = with_rows(reference.values, rows, ops.value(h_sel))                    # (S, n, d)
    a_sel = ops.attend(ops.query(h_sel, index), k, v)                          # (S, r, d)
    # x + a, with a the reference's attention output and fresh rows; a + x == x + a bit for bit.
    # The sum is made in the type x + a would have (under autocast a may be narrower than x).
    x = with_rows(reference.attn, rows, a_sel, torch.result_type(x, a_sel)).add_(x)   # (S, n, d)
    x_sel = take_rows(x, rows)                        # (S, r, d); LN is per token, so take rows first
    m_sel = ops.mlp(ops.norm2(x_sel))                 # (S, r, d)
    # x + m: unselected rows add the reference's MLP output, selected rows their fresh one
    y = x.add_(reference.mlp)                         # (S, n, d); selected rows are overwritten next
    y.view(-1, y.shape[-1]).index_copy_(0, rows, x_sel.add_(m_sel).view(-1, y.shape[-1]))
    return y, index
