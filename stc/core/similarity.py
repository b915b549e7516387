"""Per-token similarity between a frame's keys and its reference keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_similarity(keys: torch.Tensor, reference: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Similarity of each token with the same token of the reference; higher = more alike.

    keys, reference: (..., n, d) -> (..., n). ``metric`` is "cosine" (cosine similarity),
    "l1" or "l2" (negated distances, so that the lowest value is always the most changed).
    Computed in float32 whatever the input dtype: fp16 norms of wide keys overflow.
    """
    keys = keys.float()
    reference = reference.float()
    if metric == "cosine":
        return F.cosine_similarity(keys, reference, dim=-1)
    if metric == "l1":
        return -(keys - reference).abs().sum(dim=-1)
    if metric == "l2":
        return -torch.linalg.vector_norm(keys - reference, dim=-1)
    raise ValueError(f"metric={metric!r} is not supported: use 'cosine', 'l1' or 'l2'")
