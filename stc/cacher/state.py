"""Per-stream state of STC-Cacher: each stream's frame counter, per-layer references and statistics.

One ``CacherState`` is shared by reference by every patched layer of a tower and owned by its
handle; nothing here is global. It holds one stream, or several independent streams whose
frames may share a call. A call to the tower is planned once, by the first layer: which frames
refresh, which are selective, and which reference each selective frame reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from stc.cacher.block import LayerReference
from stc.config import CacherConfig
from stc.core import dynamic_token_count
from stc.errors import StreamStateError
from stc.streams import DEFAULT_STREAM, StreamId

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
    stream: StreamId = DEFAULT_STREAM
    """The stream these frames belong to (the default stream in one-stream use)."""


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
        # streams of other resolutions have other token counts: weigh each call by its own
        full = sum((len(c.refresh_frames) + len(c.selective_frames)) * c.tokens_per_frame for c in self.calls)
        if not self.calls or full == 0:
            return 1.0
        layers = len(self.calls[0].recomputed_tokens)
        total = sum(self.recomputed_tokens)
        return total / (full * layers)


@dataclass
class StreamState:
    """One stream's own state: its frame counter, each layer's reference, and its call records."""

    references: list[LayerReference | None]
    frame_index: int = 0
    """Stream index of the stream's next frame."""
    tokens_per_frame: int | None = None
    records: list[CallRecord] = field(default_factory=list)
    """What each call did to this stream (a call that carries several streams leaves a record in each)."""

    def memory_bytes(self) -> int:
        """Bytes of the references this stream holds (a view counts its own elements only)."""
        return sum(t.numel() * t.element_size() for ref in self.references if ref is not None
                   for t in (ref.keys, ref.values, ref.attn, ref.mlp))


@dataclass(frozen=True)
class _StreamSnapshot:
    frame_index: int
    tokens_per_frame: int | None
    references: tuple[LayerReference | None, ...]
    records: list[CallRecord]
    record_count: int


@dataclass
class _StreamCall:
    """One stream's share of a call, for its record."""

    first_frame: int
    refresh_frames: list[int] = field(default_factory=list)
    selective_frames: list[int] = field(default_factory=list)


@dataclass
class CallPlan:
    """How the frames of one call are processed, fixed by the first layer for all layers.

    Each selective frame reads one reference from a pool: first the stored references of the
    streams in ``stored`` (one frame each, in that order), then the call's refresh frames."""

    refresh: torch.Tensor
    """(R,) positions in the batch of the refresh frames."""
    selective: torch.Tensor
    """(S,) positions in the batch of the selective frames."""
    source: torch.Tensor
    """(S,) for each selective frame, its reference's position in the pool."""
    stored: tuple[StreamId, ...]
    """Streams whose reference stored by an earlier call some selective frame reads, in pool order."""
    source_is_pool: bool
    """The pool is already each selective frame's reference in order (every stream sends one
    selective frame and no refresh frame: the serving step), so no gather is needed."""
    kept: tuple[tuple[StreamId, int], ...]
    """(stream, position among the refresh frames) of the refresh frame each stream keeps as its
    new reference: its last one in the call."""
    keeps_references: bool
    """Whether layers store references: False when no frame of the stream can be selective
    (``cache_interval == 1``, or every patch token is dynamic), so a null setting runs exactly
    the unpatched layer's work and nothing else."""
    streams: dict[StreamId, _StreamCall]
    tokens_per_frame: int
    index: torch.Tensor | None = None
    """(S, r) dynamic tokens chosen by the first layer, reused by later layers when shared."""
    recomputed: list[int] = field(default_factory=list)
    """Per layer so far: tokens recomputed per selective frame."""

    @property
    def uses_stored(self) -> bool:
        """Whether any selective frame reads a reference stored by an earlier call."""
        return bool(self.stored)


@dataclass(frozen=True)
class StreamCheckpoint:
    """Every stream as it was before a call, so that a call that raises part-way can be undone.

    Holds the references by pointer, and each record list with its length (a call appends to
    it, a reset replaces it); streams the call started are dropped by ``restore``. Eager, a
    refresh frame replaces a layer's reference and never writes into it. Under CUDA graphs
    references live in two slots per layer and stream that refresh calls write in turn: one
    refresh call since the checkpoint leaves the checkpoint's slot intact, a second one
    overwrites it, so ``slot_writes`` tells ``restore`` whether the pointers still hold what
    they held."""

    streams: dict[StreamId, _StreamSnapshot]
    slot_writes: int = 0


class CacherState:
    """Mutable state of the streams fed through one patched tower.

    A call carries frames of one stream (the default) or, under ``frame_streams``, of several
    independent streams: each has its own frame counter, refresh schedule and per-layer
    references, and all of a call's refresh frames (of every stream) still run as one batch,
    as do all its selective frames, each reading its own stream's reference.

    A call either finishes or leaves no trace: a call that raised part-way (an error in layer 3
    of 6 leaves layers 0 to 2 with new references and the frame counters advanced) is rolled
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
        self.frame_streams: tuple[StreamId, ...] | None = None
        """The stream of each frame of the calls made now (``CacherHandle.streams``, or a whole
        model's video entry); None: every frame is the default stream's."""
        self.reset()

    def reset(self, stream_id: StreamId | None = None) -> None:
        """Forget one stream (its next frame is frame 0, a refresh frame; its records go), or,
        with None, every stream."""
        if stream_id is None:
            self.streams: dict[StreamId, StreamState] = {}
        else:
            if self.plan is not None:  # a call raised part-way: undo it in every stream before one leaves
                self.restore(self._call_start)
            self.streams.pop(stream_id, None)
        self.plan: CallPlan | None = None
        self._call_start: StreamCheckpoint | None = None

    def stream(self, stream_id: StreamId = DEFAULT_STREAM) -> StreamState:
        """The state of stream ``stream_id``, made empty the first time it is named."""
        state = self.streams.get(stream_id)
        if state is None:
            state = self.streams[stream_id] = StreamState([None] * self.num_layers)
        return state

    def drop_references(self) -> None:
        """Free the cached references (after detach); the next frame of each stream will refresh."""
        for state in self.streams.values():
            state.references = [None] * self.num_layers
        self.plan = None
        self._call_start = None

    def checkpoint(self) -> StreamCheckpoint:
        """Every stream as it is now (no tensor is copied), for ``restore``."""
        return StreamCheckpoint(
            {sid: _StreamSnapshot(s.frame_index, s.tokens_per_frame, tuple(s.references), s.records, len(s.records))
             for sid, s in self.streams.items()},
            self.slot_writes)

    def restore(self, checkpoint: StreamCheckpoint) -> None:
        """Put every stream back as it was at ``checkpoint``: frame counters, references,
        statistics; streams started since are forgotten. A call in progress is abandoned."""
        stale = self.slot_writes - checkpoint.slot_writes > 1  # both slots rewritten since: the pointers hold later frames
        self.streams = {}
        for sid, snap in checkpoint.streams.items():
            # stale references are dropped, so the next frame refreshes instead of reading them
            references = [None] * self.num_layers if stale else list(snap.references)
            del snap.records[snap.record_count :]
            self.streams[sid] = StreamState(references, snap.frame_index, snap.tokens_per_frame, snap.records)
        self.plan = None
        self._call_start = None

    def _call_ids(self, frames: int) -> tuple[StreamId, ...]:
        if self.frame_streams is None:
            return (DEFAULT_STREAM,) * frames
        if len(self.frame_streams) != frames:
            raise StreamStateError(
                f"this call carries {frames} frames but handle.streams() named {len(self.frame_streams)} stream ids: "
                "give one id per frame of each tower call made inside it"
            )
        return self.frame_streams

    def _check_tokens(self, stream_id: StreamId, tokens: int, several: bool) -> None:
        state = self.streams.get(stream_id)
        if state is None or state.tokens_per_frame is None or tokens == state.tokens_per_frame:
            return
        if not self.reset_on_resize:
            which = f"stream {stream_id!r}" if several else "this stream"
            reset = f"handle.reset({stream_id!r})" if several else "handle.reset()"
            raise StreamStateError(
                f"frames now have {tokens} tokens but {which} started with {state.tokens_per_frame}: "
                f"call {reset} before feeding a video of another resolution"
            )
        self.reset(stream_id)

    def begin_call(self, frames: int, tokens: int, device: torch.device, prefix_tokens: int = 0) -> CallPlan:
        """Plan a call of ``frames`` frames of ``tokens`` tokens and advance the frame counters.

        Frame i of a stream is a refresh frame when ``i % cache_interval == 0`` or when the stream
        has no reference (a new stream, or detach dropped them); a selective frame reads the
        latest refresh frame of its stream at or before it: one of this call's, or the stored
        one. A previous call that never reached the last layer raised part-way: it is rolled
        back first.
        """
        if self.plan is not None:
            self.restore(self._call_start)
        start = self.checkpoint()
        ids = self._call_ids(frames)
        for sid in dict.fromkeys(ids):
            self._check_tokens(sid, tokens, self.frame_streams is not None)
        interval = self.config.cache_interval
        patch_tokens = tokens - prefix_tokens
        keeps_references = interval > 1 and dynamic_token_count(patch_tokens, self.config.update_ratio) < patch_tokens
        refresh, selective, source = [], [], []
        stored: dict[StreamId, int] = {}      # stream -> its stored reference's place in the pool
        latest: dict[StreamId, int] = {}      # stream -> its latest refresh frame so far in this call
        calls: dict[StreamId, _StreamCall] = {}
        for position, sid in enumerate(ids):
            state = self.stream(sid)
            call = calls.setdefault(sid, _StreamCall(state.frame_index))
            i = state.frame_index
            state.frame_index += 1
            state.tokens_per_frame = tokens
            has_reference = state.references[0] is not None or not keeps_references or sid in latest
            if i % interval == 0 or not has_reference:
                latest[sid] = len(refresh)
                refresh.append(position)
                call.refresh_frames.append(i)
            else:
                selective.append(position)
                call.selective_frames.append(i)
                if sid in latest:
                    source.append(-1 - latest[sid])  # a refresh frame of this call: placed after the stored ones below
                else:
                    source.append(stored.setdefault(sid, len(stored)))
        source = [s if s >= 0 else len(stored) - 1 - s for s in source]
        source_is_pool = not refresh and source == list(range(len(source)))

        refresh_index, selective_index, source_index = pattern_indices(device, tuple(refresh), tuple(selective), tuple(source))
        self.plan = CallPlan(
            refresh=refresh_index,
            selective=selective_index,
            source=source_index,
            stored=tuple(stored),
            source_is_pool=source_is_pool,
            kept=tuple(latest.items()),
            keeps_references=keeps_references,
            streams=calls,
            tokens_per_frame=tokens,
        )
        self._call_start = start
        return self.plan

    def end_call(self) -> None:
        """Record the finished call's statistics, in each stream it carried."""
        plan = self.plan
        assert plan is not None and len(plan.recomputed) == self.num_layers
        tokens = plan.tokens_per_frame
        for sid, call in plan.streams.items():
            refreshed, selected = len(call.refresh_frames), len(call.selective_frames)
            self.streams[sid].records.append(CallRecord(
                first_frame=call.first_frame,
                refresh_frames=tuple(call.refresh_frames),
                selective_frames=tuple(call.selective_frames),
                tokens_per_frame=tokens,
                recomputed_tokens=tuple(refreshed * tokens + selected * per_selective for per_selective in plan.recomputed),
                stream=sid,
            ))
        self.plan = None
        self._call_start = None  # frees the references this call replaced

    @property
    def stats(self) -> CacherStats:
        """Statistics of every finished call since the last reset, stream by stream."""
        return CacherStats(calls=tuple(record for state in self.streams.values() for record in state.records))

    def stats_of(self, stream_id: StreamId) -> CacherStats:
        """Statistics of one stream's calls since it was last reset (none for an unknown stream)."""
        state = self.streams.get(stream_id)
        return CacherStats(calls=tuple(state.records) if state is not None else ())
