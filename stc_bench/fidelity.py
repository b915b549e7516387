"""Fidelity of +STC against the baseline on the same frames: ViT features and LLM logits."""

from __future__ import annotations

import torch.nn.functional as F

from stc_bench.frameworks.framework import StreamOutput


def compare_streams(baseline: StreamOutput, stc: StreamOutput) -> dict[str, float]:
    """Fidelity of an arm's stream against the baseline's on the same frames.

    Per-frame cosine similarity of final ViT features (mean over tokens; then mean and min over
    frames), where the arm leaves the tower's token count unchanged (token by token is
    meaningless after ToMe merged them); and agreement of the logits of a fixed query
    pre-filled after each stream: the fraction of query positions with the same top-1 token,
    and the mean KL(baseline || arm) in nats.
    """
    out: dict[str, float] = {}
    if baseline.features is not None and stc.features is not None and baseline.features.shape == stc.features.shape:
        cos = F.cosine_similarity(baseline.features.float(), stc.features.float(), dim=-1).mean(dim=1)  # (T,)
        out["vit_cosine_mean"] = float(cos.mean())
        out["vit_cosine_min"] = float(cos.min())
    if baseline.logits is not None and stc.logits is not None:
        p_log = F.log_softmax(baseline.logits.float(), dim=-1)                                     # (positions, V)
        q_log = F.log_softmax(stc.logits.float(), dim=-1)
        out["logits_top1_agreement"] = float((p_log.argmax(-1) == q_log.argmax(-1)).float().mean())
        out["logits_kl_mean"] = float((p_log.exp() * (p_log - q_log)).sum(-1).mean())
    return out
