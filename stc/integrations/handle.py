"""Attach/detach bookkeeping: what was replaced on which object, and how to undo it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from stc.cacher.graph import GraphStats, SelectiveGraphs
from stc.cacher.state import CacherState, CacherStats
from stc.config import CacherConfig

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
    """An attached STC-Cacher: reset it per video, read its stats, detach it to undo the patch."""

    def __init__(self, tower: nn.Module, config: CacherConfig, state: CacherState, graphs: SelectiveGraphs | None = None):
        super().__init__(tower)
        self.config = config
        self._state = state
        self._graphs = graphs

    @property
    def stats(self) -> CacherStats:
        """Per-call refresh/selective frames and per-layer recomputed tokens since the last reset."""
        return self._state.stats

    @property
    def graph_stats(self) -> GraphStats | None:
        """Captures, replays and eager fallbacks of the tower's CUDA graphs (None without
        ``cuda_graph``). The graphs outlive this handle: counts include earlier attaches."""
        return self._graphs.stats if self._graphs is not None else None

    @property
    def frame_index(self) -> int:
        """Stream index of the next frame."""
        return self._state.frame_index

    def reset(self) -> None:
        """Start a new stream (a new video): the next frame is a refresh frame; stats are cleared."""
        self._state.reset()

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
