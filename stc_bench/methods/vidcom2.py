"""VidCom² (Liu et al., EMNLP 2025) as pure tensor functions: keep, in every frame, the tokens
least like the video and the frame, and give more tokens to the frames least like the video.

Follows xuyang-liu16/VidCom2 ``token_compressor/vidcom2/vidcom2.py`` (``vidcom2_compression``),
on projected visual tokens (T, n, C) (LLaVA-OV: after 2x2 pooling, n = 196):

1. score on the 50 % of channels with the lowest variance over all tokens
   (``select_low_var_channels``, upstream default ratio 0.5), L2-normalised;
2. video centre = mean of all normalised tokens, frame centre = mean of the frame's;
   ``g(x, c) = sum over alpha in {1/8, 1/4, 1/2, 1, 2} of exp(-|x - c|^2 / (2 alpha))``
   (upstream ``alphas = 2**k for k in -3..1``);
3. frame uniqueness ``u_t = -mean_i g(x_ti, video centre)``; ``p = softmax((u - max u) / 0.01)``
   (upstream ``compute_scales``, temperature 0.01); frame t's share of the tokens is
   ``base * (1 + p_t - mean p)``, at most all of them;
4. keep in frame t the ``k_t`` tokens with the lowest ``g(x, video centre) + g(x, frame centre)``,
   in position order, at full channel width.

Differences from upstream, each for like-for-like budgets:

- the knob is ``tokens_per_frame`` (STC's pruner budget); ``base = tokens_per_frame / n``
  (upstream ``base_scale``, default 0.25);
- per-frame budgets are apportioned by largest remainder so they sum to exactly
  ``T * tokens_per_frame`` with each in [1, n]; upstream rounds each frame on its own
  (``round(scale * n)``, at least 1) after capping the share at 1, so its total drifts;
- ties go to the lower index; scoring runs in float32.

Streaming (``compress_stream_call``, causal, one call per chunk of frames): see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stc.pruner.scoring import gaussian_similarity, low_variance_channels
from stc_bench.methods.method import COMPRESS, Arm, HookSite, Knob, MethodSpec, MethodStream, at_least_one

GAUSSIAN_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)
"""Bandwidths alpha of the multi-scale Gaussian similarity (upstream default)."""
CHANNEL_KEEP_RATIO = 0.5
"""Share of lowest-variance channels used for scoring (upstream default)."""
TEMPERATURE = 0.01
"""Softmax temperature of the frame-uniqueness budget (upstream default)."""


@dataclass(frozen=True)
class VidCom2Tokens:
    """The kept tokens of a call, flat and frame by frame: ``tokens`` (K, C), ``frames`` (K,)
    and ``indices`` (K,) (frame and position of each, positions ascending within a frame), and
    ``budgets`` (T,), the tokens kept per frame (K = budgets.sum())."""

    tokens: torch.Tensor
    frames: torch.Tensor
    indices: torch.Tensor
    budgets: torch.Tensor


@dataclass(frozen=True)
class VidCom2StreamState:
    """What a stream remembers between calls: the scoring ``channels`` (c,), fixed by the first
    call, and the float32 sum (c,) and count of every normalised token seen so far."""

    channels: torch.Tensor
    unit_sum: torch.Tensor
    token_count: int


def frame_budgets(uniqueness: torch.Tensor, tokens_per_frame: int, num_tokens: int,
                  temperature: float = TEMPERATURE) -> torch.Tensor:
    """Tokens to keep per frame from frame uniqueness (T,): each in [1, num_tokens], summing to
    exactly ``T * min(tokens_per_frame, num_tokens)``.

    Quotas ``n * min(1, base * (1 + p_t - mean p))`` with ``p = softmax((u - max u) / temperature)``
    and ``base = tokens_per_frame / n``; each frame gets its quota rounded down (at least 1),
    then single tokens go to the largest remainders (or come from the smallest) until the total
    is exact; ties go to the lower frame index. Returns int64 (T,) on uniqueness's device.
    """
    if tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame} must be >= 1")
    frames, per_frame = uniqueness.shape[0], min(tokens_per_frame, num_tokens)
    u = uniqueness.detach().double().cpu()                                       # (T,) a handful of scalars
    p = torch.softmax((u - u.max()) / temperature, dim=0)
    quota = (per_frame / num_tokens * (1 + p - p.mean())).clamp(max=1.0) * num_tokens
    budgets = quota.floor().clamp(1, num_tokens)
    missing = frames * per_frame - int(budgets.sum())
    while missing != 0:                                                          # each pass moves >= 1 token
        room = budgets < num_tokens if missing > 0 else budgets > 1
        remainder = torch.where(room, quota - budgets, torch.inf if missing < 0 else -torch.inf)
        order = torch.sort(remainder, descending=missing > 0, stable=True).indices[: min(abs(missing), int(room.sum()))]
        budgets[order] += 1 if missing > 0 else -1
        missing -= len(order) if missing > 0 else -len(order)
    return budgets.long().to(uniqueness.device)


def keep_lowest(scores: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame t, the ``budgets[t]`` tokens of lowest score, ties to the lower index: scores
    (T, n), budgets (T,) -> (frames, positions), each (K,), frame by frame, positions ascending."""
    frames, num_tokens = scores.shape
    order = torch.sort(scores, dim=-1, stable=True).indices                      # (T, n) lowest first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_tokens, device=scores.device).expand(frames, -1))
    return (rank < budgets.unsqueeze(-1)).nonzero(as_tuple=True)                 # row-major: frame, then position


def compress_stream_call(features: torch.Tensor, tokens_per_frame: int,
                         state: VidCom2StreamState | None = None) -> tuple[VidCom2Tokens, VidCom2StreamState]:
    """VidCom² on one call of a stream, features (T, n, C), using only this call and the past.

    The video centre is the running mean of every normalised token seen so far, this call's
    included: ``(sum of past tokens + sum of this call's) / (past count + T * n)``. The scoring
    channels are chosen by the first call (``state=None``) and kept, because a running mean of
    normalised tokens is only defined on a fixed channel subset. The call's ``T * tokens_per_frame``
    tokens are shared among its frames; with one frame per call each frame keeps exactly
    ``tokens_per_frame``. A single call over a whole video equals ``compress_video``.
    Returns the kept tokens and the state for the next call.
    """
    frames, num_tokens, channels = features.shape
    if state is None:
        subset = low_variance_channels(features, CHANNEL_KEEP_RATIO)             # (c,)
        state = VidCom2StreamState(subset, torch.zeros(subset.shape[0], device=features.device), 0)
    unit = F.normalize(features.float().index_select(-1, state.channels), dim=-1)   # (T, n, c)
    state = VidCom2StreamState(state.channels, state.unit_sum + unit.sum(dim=(0, 1)), state.token_count + frames * num_tokens)
    video_centre = state.unit_sum / state.token_count                            # (c,)
    frame_centre = unit.mean(dim=1, keepdim=True)                                # (T, 1, c)
    to_video = gaussian_similarity(unit, video_centre, GAUSSIAN_SCALES)          # (T, n)
    to_frame = gaussian_similarity(unit, frame_centre, GAUSSIAN_SCALES)          # (T, n)
    scores = to_video + to_frame                                                 # (T, n)
    if frames == 1:
        # One frame per call (ReKV's protocol): its budget is the whole call's, with no host
        # round trip; a stable sort keeps the lowest scores, ties to the lower index.
        per_frame = min(tokens_per_frame, num_tokens)
        position = torch.sort(torch.sort(scores[0], stable=True).indices[:per_frame]).values   # (k,)
        frame_of = torch.zeros_like(position)
        budgets = torch.full((1,), per_frame, dtype=torch.long, device=features.device)
        return VidCom2Tokens(features[0, position], frame_of, position, budgets), state
    budgets = frame_budgets(-to_video.mean(dim=-1), tokens_per_frame, num_tokens)    # per-frame budgets: one host sync
    frame_of, position = keep_lowest(scores, budgets)
    return VidCom2Tokens(features[frame_of, position], frame_of, position, budgets), state


def compress_video(features: torch.Tensor, tokens_per_frame: int) -> VidCom2Tokens:
    """VidCom² over a whole video, features (T, n, C), as upstream (offline: every frame's
    budget and scores see the whole video)."""
    return compress_stream_call(features, tokens_per_frame)[0]


# --- VidCom² as an arm of stc-bench --------------------------------------------------------------


class VidCom2Stream(MethodStream):
    """One video under VidCom², causal: each streaming step's tokens are scored against the
    running video centre of every token seen so far (``compress_stream_call``)."""

    def __init__(self, arm: Arm, site: HookSite):
        self._budget = arm.knob("tokens_per_frame")
        self._states: dict[int, VidCom2StreamState] = {}
        """Each concurrent stream's running centre (stream 0 alone in one-stream use)."""

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """(t, n, C) -> (1, K, C) with K = t * min(k, n) tokens, frame by frame (budgets may differ
        between the frames of a multi-frame step, so the step's tokens come as one sequence)."""
        return self._compress_stream(0, tokens).unsqueeze(0)                          # (1, K, C)

    def compress_streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """(S, t, n, C) -> (S, K, C): each stream against its own running centre (K is exact, so
        the streams' steps stack)."""
        return torch.stack([self._compress_stream(s, step) for s, step in enumerate(tokens)])

    def _compress_stream(self, stream: int, tokens: torch.Tensor) -> torch.Tensor:
        kept, self._states[stream] = compress_stream_call(tokens, self._budget, self._states.get(stream))
        return kept.tokens                                                           # (K, C)


METHOD = MethodSpec(
    name="vidcom2",
    summary="VidCom²: per-frame budgets from frame uniqueness, tokens least like the video and frame centres, "
            "before the LLM; causal (the video centre is the running mean of the stream so far)",
    knobs=(Knob("tokens_per_frame", int, 64, "tokens kept per frame on average (exactly, one frame per step)", "k",
                at_least_one),),
    hooks=frozenset({COMPRESS}),
    stream=VidCom2Stream,
    report_note="VidCom² runs causally, as a streaming system must: the video centre is the running mean of every token "
                "of the stream so far (this step's included), not the whole clip's. With one frame per step each frame "
                "keeps exactly the budget; frame-uniqueness budgets act only within multi-frame steps.",
)
