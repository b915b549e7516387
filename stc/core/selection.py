"""Which tokens a selective frame recomputes."""

from __future__ import annotations

import math

import torch


def dynamic_token_count(num_tokens: int, update_ratio: float) -> int:
    """``max(1, floor(update_ratio * num_tokens))``: the size r of the dynamic set (the spec's
    and the released code's rule, floating-point product included)."""
    return max(1, min(num_tokens, math.floor(update_ratio * num_tokens)))


def select_changed_tokens(similarity: torch.Tensor, count: int, prefix_tokens: int = 0) -> torch.Tensor:
    """Indices of the ``count`` least similar tokens of each frame, plus the prefix tokens.

    similarity: (S, n_prefix + n_patch), higher = more alike. Selection runs over the patch
    tokens only (columns ``prefix_tokens:``); ties go to the lower index (stable sort). The
    ``prefix_tokens`` leading tokens (a CLS token) are always included. Returns (S, prefix + count)
    int64 indices into the full token axis, sorted ascending so gathers stay in spatial order.
    """
    patch = similarity[:, prefix_tokens:]                                    # (S, n_patch)
    order = torch.sort(patch, dim=-1, stable=True).indices[:, :count]        # (S, count)
    chosen = torch.sort(order, dim=-1).values + prefix_tokens                # (S, count)
    if prefix_tokens == 0:
        return chosen
    prefix = torch.arange(prefix_tokens, device=similarity.device).expand(similarity.shape[0], -1)
    return torch.cat([prefix, chosen], dim=-1)                               # (S, prefix + count)
