"""STC-Pruner: keep the most salient visual tokens of each frame before LLM pre-fill."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stc.config import PrunerConfig
from stc.errors import StreamStateError
from stc.pruner.scoring import dual_anchor_scores, gaussian_scores, keep_indices, low_variance_channels
from stc.streams import DEFAULT_STREAM, StreamId, check_stream_ids


@dataclass(frozen=True)
class PrunedTokens:
    """The kept tokens (T, k, C), in spatial order, and their indices (T, k) into the input."""

    tokens: torch.Tensor
    indices: torch.Tensor


@dataclass
class _History:
    """One stream's temporal memory: the float32 sum of its call means (C,), and its call count."""

    mean_sum: torch.Tensor
    calls: int


class STCPruner:
    """Per-stream STC-Pruner. ``compress`` once per call, ``reset`` when a new video starts.

    The temporal anchor is the mean of the per-call mean tokens seen since the last reset,
    kept at full channel width and indexed by each call's own scoring channels (the released
    code stored each call's mean on that call's channel subset, mixing channels across calls).
    Several streams may share one pruner and one call (``streams``): each keeps its own anchor.
    """

    def __init__(self, config: PrunerConfig | None = None):
        self.config = PrunerConfig() if config is None else config
        if not isinstance(self.config, PrunerConfig):
            raise TypeError(f"config must be a stc.PrunerConfig, got {type(self.config).__name__}")
        self.reset()

    def reset(self, stream_id: StreamId | None = None) -> None:
        """Forget one stream's history (the temporal anchor), or, with None, every stream's."""
        if stream_id is None:
            self._history: dict[StreamId, _History] = {}
        else:
            self._history.pop(stream_id, None)

    @property
    def calls(self) -> int:
        """Calls of the default stream since its last reset."""
        history = self._history.get(DEFAULT_STREAM)
        return history.calls if history is not None else 0

    def compress(self, features: torch.Tensor, frames_per_call: int | None = None,
                 streams: Sequence[StreamId] | None = None) -> PrunedTokens:
        """Keep ``min(tokens_per_frame, n)`` tokens of each frame of features (T, n, C).

        ``frames_per_call`` splits the T frames into consecutive calls of that many frames, each
        scored and added to the history as if it came alone (ReKV + STC stream one frame per
        call); by default all T frames are one call. ``streams`` names the stream of each frame
        (one int or string per frame): each stream's frames of each such call are scored as a
        call of that stream alone, against its own history; the output keeps the input's order.
        (``frames_per_call`` cuts the interleaved sequence, so with several streams it equals
        each stream's own calls only when it is None or 1.)
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor of shape (frames, tokens, channels), got {type(features).__name__}")
        if features.dim() != 3 or 0 in features.shape:
            raise ValueError(
                f"features must be (frames, tokens, channels) with at least one frame, token and channel, "
                f"got shape {tuple(features.shape)}"
            )
        frames, _, channels = features.shape
        # bool is an int: frames_per_call=True must not pass as 1.
        if frames_per_call is not None and (not isinstance(frames_per_call, int) or isinstance(frames_per_call, bool)
                                            or frames_per_call < 1):
            raise ValueError(f"frames_per_call={frames_per_call!r} must be an integer >= 1 (or None: all frames are one call)")
        ids = check_stream_ids(streams) if streams is not None else (DEFAULT_STREAM,) * frames
        if len(ids) != frames:
            raise ValueError(f"streams names {len(ids)} stream ids for {frames} frames: give one id per frame")
        for sid in dict.fromkeys(ids):
            history = self._history.get(sid)
            if history is not None and channels != history.mean_sum.shape[0]:
                which = "this stream" if streams is None else f"stream {sid!r}"
                reset = "pruner.reset()" if streams is None else f"pruner.reset({sid!r})"
                raise StreamStateError(
                    f"features now have {channels} channels but {which} started with {history.mean_sum.shape[0]}: "
                    f"call {reset} before feeding another model's features"
                )
        step = frames if frames_per_call is None else frames_per_call
        calls = [range(start, min(start + step, frames)) for start in range(0, frames, step)]
        if streams is None:
            parts = [self._compress_call(features[c.start : c.stop], DEFAULT_STREAM) for c in calls]
            if len(parts) == 1:
                return parts[0]
            return PrunedTokens(torch.cat([p.tokens for p in parts]), torch.cat([p.indices for p in parts]))
        lockstep = self._lockstep(ids) if frames_per_call is None else None
        if lockstep is not None:
            return self._compress_lockstep(features.unflatten(0, (len(lockstep), -1)), lockstep)
        kept: list[torch.Tensor | None] = [None] * frames   # (k, C) per frame
        index: list[torch.Tensor | None] = [None] * frames  # (k,) per frame
        for call in calls:
            for sid in dict.fromkeys(ids[i] for i in call):
                positions = [i for i in call if ids[i] == sid]
                part = self._compress_call(features[positions], sid)                 # (t_s, k, C)
                for j, i in enumerate(positions):
                    kept[i], index[i] = part.tokens[j], part.indices[j]
        return PrunedTokens(torch.stack(kept), torch.stack(index))

    def _lockstep(self, ids: tuple[StreamId, ...]) -> tuple[StreamId, ...] | None:
        """The streams of a call that carries the same number of frames of each of several
        distinct streams, stream-major, all with as many calls behind them (the serving step):
        they can be scored as one batch. None for any other call."""
        streams = tuple(dict.fromkeys(ids))
        if len(streams) < 2 or len(ids) % len(streams):
            return None
        per_stream = len(ids) // len(streams)
        if ids != tuple(sid for sid in streams for _ in range(per_stream)):
            return None
        histories = [self._history.get(sid) for sid in streams]
        if len({0 if h is None else h.calls for h in histories}) != 1 or (None in histories and any(histories)):
            return None
        return streams

    def _compress_lockstep(self, features: torch.Tensor, streams: tuple[StreamId, ...]) -> PrunedTokens:
        """One call of each of S streams, features (S, t, n, C), scored as one batch, each stream
        against its own anchor: the same tokens as S calls of ``_compress_call`` with a constant
        number of launches, whatever S (up to float rounding of the batched reductions)."""
        count_streams, frames, tokens, channels = features.shape
        config = self.config
        call_mean = features.float().mean(dim=(1, 2))                                   # (S, C)
        histories = [self._history.get(sid) for sid in streams]
        sums = call_mean if histories[0] is None else torch.stack([h.mean_sum for h in histories]) + call_mean  # (S, C)
        calls = 1 if histories[0] is None else histories[0].calls + 1
        for s, sid in enumerate(streams):
            self._history[sid] = _History(sums[s], calls)
        count = min(config.tokens_per_frame, tokens)
        if count == tokens:
            index = torch.arange(tokens, device=features.device).expand(count_streams * frames, -1)
            return PrunedTokens(features.flatten(0, 1), index)
        subset = low_variance_channels(features, config.channel_keep_ratio)              # (S, c)
        picked = subset[:, None, None, :].expand(-1, frames, tokens, -1)                 # (S, t, n, c)
        scoring = features.float().gather(-1, picked)                                     # (S, t, n, c)
        anchor = (sums / calls).gather(1, subset)                                        # (S, c)
        if config.strategy == "gaussian":
            index = keep_indices(gaussian_scores(scoring, anchor, config.gaussian_scales), count, lowest=True)
        else:
            index = keep_indices(dual_anchor_scores(scoring, anchor, config.alpha), count, lowest=False)
        index = index.flatten(0, 1)                                                      # (S * t, k)
        kept = features.flatten(0, 1).gather(1, index.unsqueeze(-1).expand(-1, -1, channels))   # (S * t, k, C)
        return PrunedTokens(kept, index)

    def _compress_call(self, features: torch.Tensor, stream_id: StreamId) -> PrunedTokens:
        frames, tokens, channels = features.shape
        config = self.config
        call_mean = features.float().mean(dim=(0, 1))                                  # (C,)
        history = self._history.get(stream_id)
        if history is None:
            history = self._history[stream_id] = _History(call_mean, 1)
        else:
            history.mean_sum, history.calls = history.mean_sum + call_mean, history.calls + 1
        count = min(config.tokens_per_frame, tokens)
        if count == tokens:
            index = torch.arange(tokens, device=features.device).expand(frames, -1)
            return PrunedTokens(features, index)
        subset = low_variance_channels(features, config.channel_keep_ratio)            # (c,)
        scoring = features.float().index_select(-1, subset)                             # (T, n, c)
        anchor = (history.mean_sum / history.calls).index_select(0, subset)            # (c,)
        if config.strategy == "gaussian":
            index = keep_indices(gaussian_scores(scoring, anchor, config.gaussian_scales), count, lowest=True)
        else:
            index = keep_indices(dual_anchor_scores(scoring, anchor, config.alpha), count, lowest=False)
        kept = features.gather(1, index.unsqueeze(-1).expand(-1, -1, channels))         # (T, k, C)
        return PrunedTokens(kept, index)
