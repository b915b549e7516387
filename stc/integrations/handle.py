"""Attach/detach bookkeeping: what was replaced on which object, and how to undo it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from stc.cacher.graph import GraphStats, SelectiveGraphs
from stc.cacher.state import CacherState, CacherStats
from stc.config import CacherConfig
from stc.streams import DEFAULT_STREAM, StreamId, check_stream_ids

_ABSENT = object()
HANDLE_ATTRIBUTE = "_stc_handle"
"""The one attribute STC installs on a patched tower: its ``CacherHandle``."""


@dataclass
class _Replacement:
    owner: Any
    name: str
    previous: Any  # _ABSENT when the attribute was not in the instance's __dict__


def forward_attribute(module: nn.Module) -> str:
    """The attribute a patch replaces to change ``module``'s forward on the instance:
    ``_old_forward`` when accelerate hooked the module (its hook calls that), else ``forward``."""
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


class PatchHandle:
    """Instance attributes replaced on a tower and its layers, and how to restore them exactly."""

    def __init__(self, tower: nn.Module):
        self.tower = tower
        self._replacements: list[_Replacement] = []
        self.attached = False

    def _replace(self, owner: Any, name: str, value: Any) -> None:
        self._replacements.append(_Replacement(owner, name, owner.__dict__.get(name, _ABSENT)))
        setattr(owner, name, value)

    def _install(self) -> None:
        self._replace(self.tower, HANDLE_ATTRIBUTE, self)
        self.attached = True

    def detach(self) -> nn.Module:
        """Restore every replaced attribute exactly (deleting those that were absent); idempotent."""
        for r in reversed(self._replacements):
            if r.previous is _ABSENT:
                if r.name in r.owner.__dict__:
                    delattr(r.owner, r.name)
            else:
                setattr(r.owner, r.name, r.previous)
        self._replacements.clear()
        self.attached = False
        return self.tower

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"{type(self).__name__}({type(self.tower).__name__}, {state})"


class CacherHandle(PatchHandle):
    """An attached STC-Cacher: reset it per video, read its stats, detach it to undo the patch.

    One stream by default: every call continues it. To serve several streams through one tower,
    name each frame's stream (``with handle.streams(ids):``); each stream then has its own frame
    counter, refresh schedule and references, and ``reset(stream_id)`` lets one leave.
    """

    def __init__(self, tower: nn.Module, config: CacherConfig, state: CacherState, graphs: SelectiveGraphs | None = None):
        super().__init__(tower)
        self.config = config
        self._state = state
        self._graphs = graphs

    @property
    def stats(self) -> CacherStats:
        """Per-call refresh/selective frames and per-layer recomputed tokens since the last reset,
        of every stream (a call that carried several streams has one record per stream)."""
        return self._state.stats

    def stats_of(self, stream_id: StreamId) -> CacherStats:
        """Statistics of one stream since it joined or was last reset."""
        return self._state.stats_of(stream_id)

    @property
    def graph_stats(self) -> GraphStats | None:
        """Captures, replays and eager fallbacks of the tower's CUDA graphs (None without
        ``cuda_graph``). The graphs outlive this handle: counts include earlier attaches."""
        return self._graphs.stats if self._graphs is not None else None

    @property
    def frame_index(self) -> int:
        """Stream index of the next frame of the default stream (one-stream use)."""
        return self.frame_index_of(DEFAULT_STREAM)

    def frame_index_of(self, stream_id: StreamId) -> int:
        """Stream index of the next frame of stream ``stream_id`` (0 for a stream not seen yet)."""
        stream = self._state.streams.get(stream_id)
        return stream.frame_index if stream is not None else 0

    @property
    def stream_ids(self) -> tuple[StreamId, ...]:
        """The streams the cacher holds state for, in the order they joined."""
        return tuple(self._state.streams)

    @contextlib.contextmanager
    def streams(self, ids: Sequence[StreamId]) -> Iterator[CacherHandle]:
        """``with handle.streams([0, 1, 2, 3]): tower(frames)``: each tower call made inside carries
        one frame per id, frame i of the call belonging to stream ``ids[i]`` (an int or a string; a
        stream may have several frames in a call, in stream order). Refresh and selective frames
        of all streams still run as one batch each. A stream not seen before joins at frame 0.
        Around a whole model's ``get_video_features``, the ids name its videos instead, one each."""
        ids = check_stream_ids(ids)
        previous, self._state.frame_streams = self._state.frame_streams, ids
        try:
            yield self
        finally:
            self._state.frame_streams = previous

    def reset(self, stream_id: StreamId | None = None) -> None:
        """Start a new stream (a new video): the next frame is a refresh frame; its stats are
        cleared. With no id every stream is forgotten; with an id only that one (it leaves: its
        references are freed, and a later frame with that id starts it afresh)."""
        self._state.reset(stream_id)
        # A stream that leaves gives back its graph reference slots (and the graphs reading them);
        # a reset of all streams keeps them, so the next video replays the graphs already captured.
        if self._graphs is not None and stream_id is not None:
            self._graphs.release_slots(stream_id)

    def memory_bytes(self) -> dict[StreamId, int]:
        """Bytes of cached references each stream holds (with CUDA graphs, its two reference
        slots per layer, which the graphs keep until ``reset(stream_id)``)."""
        if self._graphs is not None:
            slots = self._graphs.slot_bytes()
            return {sid: slots.get(sid, stream.memory_bytes()) for sid, stream in self._state.streams.items()}
        return {sid: stream.memory_bytes() for sid, stream in self._state.streams.items()}

    def detach(self) -> nn.Module:
        """Restore every replaced attribute exactly (deleting those that were absent); idempotent.

        The cached references are freed; ``stats`` stay readable until ``reset``."""
        super().detach()
        self._state.drop_references()
        return self.tower

    def __enter__(self) -> CacherHandle:
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"CacherHandle({type(self.tower).__name__}, {self.config}, {state})"
