"""Per-stream state of STC-Cacher: the frame counter, each layer's reference, and statistics.

One ``CacherState`` is shared by reference by every patched layer of a tower and owned by its
handle; nothing here is global. A call to the tower is planned once, by the first layer: which
frames refresh, which are selective, and which reference each selective frame reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from stc.cacher.block import LayerReference
from stc.config import CacherConfig
from stc.core import dynamic_token_count
from stc.errors import StreamStateError

PATTERN_CACHE_SIZE = 1024
"""Call patterns whose index tensors are kept per process (a stream repeats a handful)."""


@functools.lru_cache(maxsize=PATTERN_CACHE_SIZE)
def pattern_indices(device: torch.device, *positions: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Each tuple of batch positions as a (len,) int64 tensor on ``device``, made once per process.

    A host-to-device copy of pageable memory synchronises the stream, so a timed call must not
    make one: the cache outlives streams and attaches, and the first (untimed) pass of a stream
    shape fills it. The tensors are shared: never write into them.
    """
    return tuple(torch.tensor(p, dtype=torch.long).to(device) for p in positions)


@dataclass(frozen=True)
class CallRecord:
    """What one call to the tower did (exact counts, no timing)."""

    first_frame: int
    """Stream index of the call's first frame."""
    refresh_frames: tuple[int, ...]
    """Stream indices of the frames that ran the full forward and became references."""
    selective_frames: tuple[int, ...]
    """Stream indices of the frames that recomputed only their dynamic tokens."""
    tokens_per_frame: int
    """Tokens per frame in the tower (CLS included)."""
    recomputed_tokens: tuple[int, ...]
    """Per layer: tokens recomputed over all frames of the call (a full frame counts all)."""


@dataclass(frozen=True)
class CacherStats:
    """Statistics of every call since the last reset, and their totals."""

    calls: tuple[CallRecord, ...]

    @property
    def refresh_frames(self) -> int:
        """Frames that ran the full forward."""
        return sum(len(c.refresh_frames) for c in self.calls)

    @property
    def selective_frames(self) -> int:
        """Frames that ran the selective forward."""
        return sum(len(c.selective_frames) for c in self.calls)

    @property
    def recomputed_tokens(self) -> tuple[int, ...]:
        """Per layer: tokens recomputed over all calls."""
        if not self.calls:
            return ()
        return tuple(sum(layer) for layer in zip(*(c.recomputed_tokens for c in self.calls)))

    @property
    def recompute_fraction(self) -> float:
        """Recomputed tokens over all layers and frames, as a fraction of a full forward."""
        full = sum(len(c.refresh_frames) + len(c.selective_frames) for c in self.calls)
        if not self.calls or full == 0:
            return 1.0
        layers = len(self.calls[0].recomputed_tokens)
        total = sum(self.recomputed_tokens)
        return total / (full * layers * self.calls[0].tokens_per_frame)


@dataclass
class CallPlan:
    """How the frames of one call are processed, fixed by the first layer for all layers."""

    refresh: torch.Tensor
    """(R,) positions in the batch of the refresh frames."""
    selective: torch.Tensor
    """(S,) positions in the batch of the selective frames."""
    source: torch.Tensor
    """(S,) for each selective frame, its reference in [stored reference, *refresh frames]."""
    uses_stored: bool
    """Whether any selective frame reads the reference stored by an earlier call."""
    keeps_references: bool
    """Whether layers store references: False when no frame of the stream can be selective
    (``cache_interval == 1``, or every patch token is dynamic), so a null setting runs exactly
    the unpatched layer's work and nothing else."""
    first_frame: int
    refresh_frames: tuple[int, ...]
    selective_frames: tuple[int, ...]
    tokens_per_frame: int
    index: torch.Tensor | None = None
    """(S, r) dynamic tokens chosen by the first layer, reused by later layers when shared."""
    recomputed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StreamCheckpoint:
    """The stream as it was before a call, so that a call that raises part-way can be undone.

    Holds the references by pointer, and the record list with its length (a call appends to it,
    a reset replaces it). Eager, a refresh frame replaces a layer's reference and never writes
    into it. Under CUDA graphs references live in two slots per layer that refresh calls write in
    turn: one refresh call since the checkpoint leaves the checkpoint's slot intact, a second one
    overwrites it, so ``slot_writes`` tells ``restore`` whether the pointers still hold what they
    held."""

    frame_index: int
    tokens_per_frame: int | None
    references: tuple[LayerReference | None, ...]
    records: list[CallRecord]
    record_count: int
    slot_writes: int = 0


class CacherState:
    """Mutable state of one stream (one video) through one patched tower.

    A call either finishes or leaves no trace: a call that raised part-way (an error in layer 3
    of 6 leaves layers 0 to 2 with new references and the frame counter advanced) is rolled
    back, by the tower's guard as the error passes (``checkpoint``/``restore``), or, where layers
    are called one by one without the tower, by the next call's first layer.
    """

    def __init__(self, config: CacherConfig, num_layers: int, reset_on_resize: bool = False):
        self.config = config
        self.num_layers = num_layers
        self.reset_on_resize = reset_on_resize
        """True: frames of a new token count start a new stream; False: they are an error."""
        self.call_shape: tuple[int, int] | None = None
        """(frames, tokens per frame) of the current call, for towers that see a flat sequence."""
        self.slot_writes = 0
        """Refresh calls whose references went into graph slots (written in place), ever."""
        self.passthrough = False
        """True while the tower serves a call outside the stream (an image through a whole model):
        the patched forwards then run the original ones and leave the stream untouched."""
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next frame is frame 0, a refresh frame."""
        self.frame_index = 0
        self.references: list[LayerReference | None] = [None] * self.num_layers
        self.plan: CallPlan | None = None
        self.records: list[CallRecord] = []
        self.tokens_per_frame: int | None = None
        self._call_start: StreamCheckpoint | None = None

    def drop_references(self) -> None:
        """Free the cached references (after detach); the next frame will refresh."""
        self.references = [None] * self.num_layers
        self.plan = None
        self._call_start = None

    def checkpoint(self) -> StreamCheckpoint:
        """The stream as it is now (no tensor is copied), for ``restore``."""
        return StreamCheckpoint(self.frame_index, self.tokens_per_frame, tuple(self.references), self.records,
                                len(self.records), self.slot_writes)

    def restore(self, checkpoint: StreamCheckpoint) -> None:
        """Put the stream back as it was at ``checkpoint``: frame counter, references, statistics.
        A call in progress is abandoned."""
        self.frame_index = checkpoint.frame_index
        self.tokens_per_frame = checkpoint.tokens_per_frame
        self.references = list(checkpoint.references)
        if self.slot_writes - checkpoint.slot_writes > 1:  # both slots rewritten since: the pointers hold later frames
            self.references = [None] * self.num_layers  # so the next frame refreshes instead of reading them
        self.records = checkpoint.records
        del self.records[checkpoint.record_count :]
        self.plan = None
        self._call_start = None

    def begin_call(self, frames: int, tokens: int, device: torch.device, prefix_tokens: int = 0) -> CallPlan:
        """Plan a call of ``frames`` frames of ``tokens`` tokens and advance the frame counter.

        Frame i is a refresh frame when ``i % cache_interval == 0`` or when no reference exists
        (detach dropped them); a selective frame reads the latest refresh frame at or before it:
        one of this call's, or the stored one. A previous call that never reached the last layer
        raised part-way: it is rolled back first.
        """
        if self.plan is not None:
            self.restore(self._call_start)
        start = self.checkpoint()
        if self.tokens_per_frame is not None and tokens != self.tokens_per_frame:
            if not self.reset_on_resize:
                raise StreamStateError(
                    f"frames now have {tokens} tokens but this stream started with {self.tokens_per_frame}: "
                    "call handle.reset() before feeding a video of another resolution"
                )
            self.reset()
        interval = self.config.cache_interval
        patch_tokens = tokens - prefix_tokens
        keeps_references = interval > 1 and dynamic_token_count(patch_tokens, self.config.update_ratio) < patch_tokens
        has_reference = self.references[0] is not None or not keeps_references
        refresh, selective, source = [], [], []
        for position in range(frames):
            i = self.frame_index + position
            if i % interval == 0 or (not has_reference and not refresh):
                refresh.append(position)
            else:
                selective.append(position)
                source.append(len(refresh))  # 0 = stored reference, j = j-th refresh frame of the call
        first = self.frame_index
        self.frame_index += frames
        self.tokens_per_frame = tokens

        refresh_index, selective_index, source_index = pattern_indices(device, tuple(refresh), tuple(selective), tuple(source))
        self.plan = CallPlan(
            refresh=refresh_index,
            selective=selective_index,
            source=source_index,
            uses_stored=0 in source,
            keeps_references=keeps_references,
            first_frame=first,
            refresh_frames=tuple(first + p for p in refresh),
            selective_frames=tuple(first + p for p in selective),
            tokens_per_frame=tokens,
        )
        self._call_start = start
        return self.plan

    def end_call(self) -> None:
        """Record the finished call's statistics."""
        plan = self.plan
        assert plan is not None and len(plan.recomputed) == self.num_layers
        self.records.append(
            CallRecord(
                first_frame=plan.first_frame,
                refresh_frames=plan.refresh_frames,
                selective_frames=plan.selective_frames,
                tokens_per_frame=plan.tokens_per_frame,
                recomputed_tokens=tuple(plan.recomputed),
            )
        )
        self.plan = None
        self._call_start = None  # frees the references this call replaced

    @property
    def stats(self) -> CacherStats:
        """Statistics of every finished call since the last reset."""
        return CacherStats(calls=tuple(self.records))
