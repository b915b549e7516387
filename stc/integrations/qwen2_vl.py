"""STC-Cacher for the Qwen2-VL vision tower (``Qwen2VisionTransformerPretrainedModel``).

Differences from CLIP/SigLIP (frameworks.md section C), and how they are handled:

- The unit of reuse is a **temporal group** (two frames fused by the Conv3d patch embedding),
  not a frame. Blocks see one flat ``(groups * h * w, C)`` sequence; all groups of one call share
  (h, w), so the sequence is viewed as a batch ``(groups, h * w, C)`` and the shared streaming
  forward runs on it unchanged. State persists across calls (LiveCC feeds one group per step);
  a stream whose frames change (h, w) starts afresh. Several streams may share a call (one
  ``video_grid_thw`` row per video) when their grids match.
- Attention is restricted to each group, which is exactly per-batch-row attention here.
- The fused ``qkv`` projection is cut into its query, key and value rows, so a selective group
  computes keys for all tokens and queries and values only for the selected ones.
- 2-D rotary embeddings: keys of all tokens use the full cos/sin tables of the group; selected
  queries use the rows of their own positions. Tokens are compared on rotated keys: rotation
  preserves cosine similarity and L2 distance between the same position's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stc.cacher.block import plain_forward
from stc.cacher.state import CacherState
from stc.cacher.stream import cached_layer_forward
from stc.errors import STCError

BLOCK_CLASS = "Qwen2VLVisionBlock"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotary embedding of x (B, m, H*hd) with per-token cos/sin (B or 1, m, hd), in float32 as
    transformers' ``apply_rotary_pos_emb_vision`` does."""
    batch, m, width = x.shape
    xh = x.view(batch, m, heads, width // heads).float()                       # (B, m, H, hd)
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()           # (B, m, 1, hd)
    return (xh * cos + _rotate_half(xh) * sin).to(x.dtype).view(batch, m, width)


class Qwen2VLBlockOps:
    """``LayerOps`` of one ``Qwen2VLVisionBlock`` for one call: its norms, MLP, the slices of its
    fused qkv projection, and the call's rotary tables for one group, cos/sin (n, head_dim)."""

    prefix_tokens = 0

    def __init__(self, block: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
        attn = block.attn
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        width = attn.qkv.in_features
        w, b = attn.qkv.weight, attn.qkv.bias                                  # (3C, C), (3C,)
        self._wq, self._wk, self._wv = w[:width], w[width : 2 * width], w[2 * width :]
        self._bq, self._bk, self._bv = b[:width], b[width : 2 * width], b[2 * width :]
        self._proj = attn.proj
        self._heads = attn.num_heads
        # ``scaling`` exists from transformers 4.53; before, the attention used head_dim ** -0.5.
        self._scale = getattr(attn, "scaling", (width // attn.num_heads) ** -0.5)
        self._cos, self._sin = cos, sin

    def query(self, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Rotated queries of the given tokens; ``index`` (B, r) names their positions."""
        q = F.linear(h, self._wq, self._bq)
        if index is None:
            return _rotate(q, self._cos[None], self._sin[None], self._heads)
        return _rotate(q, self._cos[index], self._sin[index], self._heads)

    def key(self, h: torch.Tensor) -> torch.Tensor:
        """Rotated keys of all tokens of each group."""
        return _rotate(F.linear(h, self._wk, self._bk), self._cos[None], self._sin[None], self._heads)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """Values of the given tokens (position-free)."""
        return F.linear(h, self._wv, self._bv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, m, C) over the group's k, v (B, n, C), then the output projection."""
        batch, m, width = q.shape
        head_dim = width // self._heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self._heads, head_dim).transpose(1, 2)  # (B, H, len, hd)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=self._scale)
        return self._proj(out.transpose(1, 2).reshape(batch, m, width))


class CallShape:
    """(groups, tokens per group) of the tower call in progress, set by the tower's patched
    forward for its blocks, which see one flat sequence. ``CacherState`` plays this role for
    the cacher."""

    call_shape: tuple[int, int] | None = None


def make_tower_forward(original, shape: CallShape | CacherState):
    """Wrap the tower's forward to record the call's (groups, tokens per group) before the blocks run.

    The grid is read on the host: callers that time the tower keep ``grid_thw`` on the CPU (as
    transformers' processors return it), so reading it costs no device sync.
    """

    def forward(hidden_states: torch.Tensor, grid_thw: torch.Tensor, *args, **kwargs):
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        if len({(h, w) for _, h, w in grid}) != 1:
            raise STCError(
                f"STC-Cacher runs the temporal groups of a call as one batch, so they must share one (h, w); this call "
                f"mixes grids {grid}: call the tower once per resolution (or detach the cacher for mixed batches)"
            )
        shape.call_shape = (sum(t for t, _, _ in grid), grid[0][1] * grid[0][2])
        return original(hidden_states, grid_thw, *args, **kwargs)

    forward.__doc__ = "STC: records the (groups, tokens per group) of the call, then runs the tower."
    return forward


def _block_ops(block: nn.Module, shape: CallShape | CacherState, hidden_states: torch.Tensor, rotary_pos_emb,
               position_embeddings) -> tuple[Qwen2VLBlockOps, torch.Tensor]:
    """The block's ops for this call and its flat input viewed as (groups, n, C)."""
    if position_embeddings is None:
        if rotary_pos_emb is None:
            raise STCError("Qwen2-VL block called without rotary embeddings: this transformers version is not "
                           "supported; install transformers>=4.46,<5.25")
        emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)  # older 4.x pass the angles; the block made cos/sin
        position_embeddings = (emb.cos(), emb.sin())
    groups, tokens = shape.call_shape
    cos, sin = position_embeddings                                              # (groups*n, hd)
    ops = Qwen2VLBlockOps(block, cos[:tokens], sin[:tokens])                  # every group has the same positions
    return ops, hidden_states.view(groups, tokens, hidden_states.shape[-1])     # (groups, n, C)


def make_block_forward(block: nn.Module, layer_index: int, state: CacherState, graphs):
    """The streaming forward of one vision block (transformers 4.46 to 5.24 signatures)."""

    def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb=None,
                position_embeddings=None, **kwargs):
        ops, x = _block_ops(block, state, hidden_states, rotary_pos_emb, position_embeddings)
        return cached_layer_forward(ops, x, layer_index, state, graphs).reshape(hidden_states.shape)

    forward.__doc__ = f"""STC-Cacher forward of Qwen2-VL vision block {layer_index}, mirroring
    ``Qwen2VLVisionBlock.forward`` (transformers 4.46 to 5.24).

    Modifications:
    - temporal groups are streamed like frames: refresh groups run the full forward and store
      references; selective groups recompute only their most-changed tokens;
    - q/k/v come from slices of the fused qkv weight; rotary tables are gathered per token;
    - attention runs per group through ``F.scaled_dot_product_attention``.
    """
    return forward


def make_batched_block_forward(block: nn.Module, shape: CallShape):
    """The unmodified block, computed as STC-Cacher computes a refresh frame: all temporal groups
    of the call in one batch (one SDPA, no host sync), and nothing stored."""

    def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, rotary_pos_emb=None,
                position_embeddings=None, **kwargs):
        ops, x = _block_ops(block, shape, hidden_states, rotary_pos_emb, position_embeddings)
        y = plain_forward(ops, x)                                               # (groups, n, C)
        return y.reshape(hidden_states.shape)

    forward.__doc__ = """Batched forward of a Qwen2-VL vision block, mirroring ``Qwen2VLVisionBlock.forward``
    (transformers 4.46 to 5.24): the same math, with q/k/v from slices of the fused qkv weight and
    one ``F.scaled_dot_product_attention`` over all temporal groups of the call."""
    return forward
