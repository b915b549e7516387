"""STC-Pruner: keep the most salient visual tokens of each frame before LLM pre-fill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stc.config import PrunerConfig
from stc.errors import StreamStateError
from stc.pruner.scoring import dual_anchor_scores, gaussian_scores, keep_indices, low_variance_channels


@dataclass(frozen=True)
class PrunedTokens:
    """The kept tokens (T, k, C), in spatial order, and their indices (T, k) into the input."""

    tokens: torch.Tensor
    indices: torch.Tensor


class STCPruner:
    """Per-stream STC-Pruner. ``compress`` once per call, ``reset`` when a new video starts.

    The temporal anchor is the mean of the per-call mean tokens seen since the last reset,
    kept at full channel width and indexed by each call's own scoring channels (the released
    code stored each call's mean on that call's channel subset, mixing channels across calls).
    """

    def __init__(self, config: PrunerConfig | None = None):
        self.config = PrunerConfig() if config is None else config
        if not isinstance(self.config, PrunerConfig):
            raise TypeError(f"config must be a stc.PrunerConfig, got {type(self.config).__name__}")
        self.reset()

    def reset(self) -> None:
        """Forget the stream's history (the temporal anchor)."""
        self._mean_sum: torch.Tensor | None = None   # (C,) float32 sum of call means
        self.calls = 0

    def compress(self, features: torch.Tensor, frames_per_call: int | None = None) -> PrunedTokens:
        """Keep ``min(tokens_per_frame, n)`` tokens of each frame of features (T, n, C).

        ``frames_per_call`` splits the T frames into consecutive calls of that many frames, each
        scored and added to the history as if it came alone (ReKV + STC stream one frame per
        call); by default all T frames are one call.
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor of shape (frames, tokens, channels), got {type(features).__name__}")
        if features.dim() != 3 or 0 in features.shape:
            raise ValueError(
                f"features must be (frames, tokens, channels) with at least one frame, token and channel, "
                f"got shape {tuple(features.shape)}"
            )
        frames, _, channels = features.shape
        if self._mean_sum is not None and channels != self._mean_sum.shape[0]:
            raise StreamStateError(
                f"features now have {channels} channels but this stream started with {self._mean_sum.shape[0]}: "
                "call pruner.reset() before feeding another model's features"
            )
        # bool is an int: frames_per_call=True must not pass as 1.
        if frames_per_call is not None and (not isinstance(frames_per_call, int) or isinstance(frames_per_call, bool)
                                            or frames_per_call < 1):
            raise ValueError(f"frames_per_call={frames_per_call!r} must be an integer >= 1 (or None: all frames are one call)")
        step = frames if frames_per_call is None else frames_per_call
        parts = [self._compress_call(features[i : i + step]) for i in range(0, frames, step)]
        if len(parts) == 1:
            return parts[0]
        return PrunedTokens(torch.cat([p.tokens for p in parts]), torch.cat([p.indices for p in parts]))

    def _compress_call(self, features: torch.Tensor) -> PrunedTokens:
        frames, tokens, channels = features.shape
        config = self.config
        call_mean = features.float().mean(dim=(0, 1))                                  # (C,)
        self._mean_sum = call_mean if self._mean_sum is None else self._mean_sum + call_mean
        self.calls += 1
        count = min(config.tokens_per_frame, tokens)
        if count == tokens:
            index = torch.arange(tokens, device=features.device).expand(frames, -1)
            return PrunedTokens(features, index)
        subset = low_variance_channels(features, config.channel_keep_ratio)            # (c,)
        scoring = features.float().index_select(-1, subset)                             # (T, n, c)
        anchor = (self._mean_sum / self.calls).index_select(0, subset)                 # (c,)
        if config.strategy == "gaussian":
            index = keep_indices(gaussian_scores(scoring, anchor, config.gaussian_scales), count, lowest=True)
        else:
            index = keep_indices(dual_anchor_scores(scoring, anchor, config.alpha), count, lowest=False)
        kept = features.gather(1, index.unsqueeze(-1).expand(-1, -1, channels))         # (T, k, C)
        return PrunedTokens(kept, index)
