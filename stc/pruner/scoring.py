"""STC-Pruner scoring as pure tensor functions (stc-algorithm.md, "STC-Pruner")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def low_variance_channels(features: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices (c,) of the ``max(1, floor(C * keep_ratio))`` channels of lowest variance.

    features: (T, n, C), or (S, T, n, C) for S streams' calls at once -> (S, c); the variance runs
    over all T*n tokens of the call. Ties go to the lower channel index. Returned sorted ascending.
    """
    channels = features.shape[-1]
    keep = max(1, math.floor(channels * keep_ratio))
    variance = features.float().flatten(-3, -2).var(dim=-2, unbiased=False)        # (..., C)
    order = torch.sort(variance, dim=-1, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def gaussian_similarity(x: torch.Tensor, center: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """``G(x, c) = sum over alpha of exp(-|x - c|^2 / (2 alpha))``: x (..., n, c), center
    broadcastable to it -> (..., n)."""
    distance = (x - center).pow(2).sum(dim=-1)                                      # (..., n)
    return sum(torch.exp(-distance / (2.0 * a)) for a in scales)


def gaussian_scores(tokens: torch.Tensor, anchor: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Released STC score (lower = keep): tokens (T, n, c), anchor (c,) -> (T, n); or, for S
    streams at once, tokens (S, T, n, c) and each stream's anchor (S, c) -> (S, T, n).

    Tokens are L2-normalised; the score adds their Gaussian similarity to the frame mean of the
    normalised tokens and to the normalised temporal anchor.
    """
    normed = F.normalize(tokens, dim=-1)                                            # (..., T, n, c)
    frame_mean = normed.mean(dim=-2, keepdim=True)                                  # (..., T, 1, c)
    anchor = F.normalize(anchor, dim=-1)[..., None, None, :]                        # (..., 1, 1, c)
    return gaussian_similarity(normed, frame_mean, scales) + gaussian_similarity(normed, anchor, scales)


def dual_anchor_scores(tokens: torch.Tensor, anchor: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's score (higher = keep): ``alpha (1 - cos(f, anchor)) + (1 - alpha)(1 - cos(f,
    frame mean))``; tokens (T, n, c), anchor (c,) -> (T, n); or (S, T, n, c) and (S, c) -> (S, T, n)."""
    frame_mean = tokens.mean(dim=-2, keepdim=True)                                  # (..., T, 1, c)
    temporal = 1.0 - F.cosine_similarity(tokens, anchor[..., None, None, :].expand_as(tokens), dim=-1)
    spatial = 1.0 - F.cosine_similarity(tokens, frame_mean.expand_as(tokens), dim=-1)
    return alpha * temporal + (1.0 - alpha) * spatial


def keep_indices(scores: torch.Tensor, count: int, lowest: bool) -> torch.Tensor:
    """Per frame, the ``count`` tokens with the lowest (or highest) score, ties to the lower
    index, sorted ascending: scores (..., T, n) -> (..., T, count)."""
    order = torch.sort(scores, dim=-1, descending=not lowest, stable=True).indices[..., :count]
    return torch.sort(order, dim=-1).values
