"""What every compression method (arm) provides, and the hook points a framework offers it.

A *method* is one module of ``stc_bench.methods`` (baseline, stc, tome, visionzip, vidcom2)
defining ``METHOD``: its knobs, the hook points it needs, and how to start one stream. An
*arm* is a method plus the values of its knobs; it is part of the identity of every
measurement. A framework says which hook points it offers and where (``HookSite``); for each
streamed video it asks the arm for a ``MethodStream`` and calls only the hooks it offers:

- ``tower()``: a context manager around every call of the vision tower of this stream
  (STC-Cacher, ToMe, VisionZip's attention capture);
- ``compress(tokens)``: a stateful compressor of the visual tokens of each streaming step
  between projector/pooling and the LLM, (t, n, C) -> (t, k, C) (STC-Pruner, VisionZip, VidCom²).

Served concurrently (``--streams S``), a step carries one chunk of each of S videos: the tower
sees their frames stream-major in one call, inside ``serving(ids)`` (one stream id per frame),
and ``compress_streams`` takes the step's tokens per stream, (S, t, n, C) -> (S, K, C), each
stream compressed against its own history.

Token counts are read from the tensors, never from grid constants (ToMe changes the tower's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stc_bench.errors import BenchUsageError

if TYPE_CHECKING:  # this module stays importable without torch: results files name arms
    import torch
    from torch import nn

    from stc.cacher import CacherStats, GraphStats
    from stc.flops import ViTShape

TOWER, COMPRESS = "tower", "compress"
"""The hook points: around the vision tower, and between projector/pooling and the LLM."""


class MethodError(BenchUsageError):
    """An arm cannot run as asked (unknown knob, bad value, hook point missing); the message names the fix."""


def at_least_one(value: Any) -> str | None:
    """A knob check: a whole number >= 1 (booleans refused)."""
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be a whole number >= 1"


@dataclass(frozen=True)
class Knob:
    """One setting of a method: its name, type, default, help, and an optional check that
    returns what is wrong with a value (None when it is fine)."""

    name: str
    kind: type
    default: Any
    help: str
    short: str = ""
    """Prefix in an arm's label (``r`` -> ``r0.25``); empty: left out of the label."""
    check: Callable[[Any], str | None] | None = None

    def parse(self, text: str, method: str) -> Any:
        """The value of ``--arm METHOD:NAME=TEXT``, checked."""
        try:
            if self.kind is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value: Any = text.lower() in ("true", "1", "yes")
            else:
                value = self.kind(text)
        except ValueError:
            raise MethodError(f"--arm {method}:{self.name}={text}: not a {self.kind.__name__}; e.g. "
                              f"--arm {method}:{self.name}={self.default}") from None
        self.validate(value, method)
        return value

    def validate(self, value: Any, method: str) -> None:
        """Raise ``MethodError`` when ``value`` is not allowed."""
        problem = self.check(value) if self.check else None
        if problem:
            raise MethodError(f"{method}:{self.name}={value}: {problem}")


@dataclass(frozen=True)
class Arm:
    """A method plus its knob values, in the method's knob order; hashable, JSON-safe."""

    method: str
    knobs: tuple[tuple[str, Any], ...] = ()

    def knob(self, name: str) -> Any:
        """The value of knob ``name`` (KeyError when the method has no such knob)."""
        for key, value in self.knobs:
            if key == name:
                return value
        raise KeyError(f"{self.method} has no knob {name!r}")

    @property
    def is_baseline(self) -> bool:
        """True for the arm every other arm is compared with."""
        return self.method == "baseline"

    @property
    def label(self) -> str:
        """Short human label: ``baseline``, ``stc r0.25 N2 k64``, ``tome k64``; a switch with a
        short name shows it when on (``stc r0.25 N2 k64 compiled``) and nothing when off."""
        from stc_bench.methods import get_method

        shorts = {k.name: k.short for k in get_method(self.method).knobs}
        parts = [shorts[name] if isinstance(value, bool) else f"{shorts[name]}{value:g}" if isinstance(value, float)
                 else f"{shorts[name]}{value}" for name, value in self.knobs if shorts.get(name) and value is not False]
        return " ".join([self.method, *parts])

    def to_dict(self) -> dict[str, Any]:
        """``{"method": ..., "knobs": {...}}``."""
        return {"method": self.method, "knobs": dict(self.knobs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arm:
        """Inverse of ``to_dict``. A knob the method gained after the file was written takes its
        default, which is what that run used, so old results resume and compare as they ran."""
        from stc_bench.methods import METHOD_MODULES, get_method

        knobs = dict(data.get("knobs", {}))
        if data["method"] in METHOD_MODULES:
            spec = get_method(data["method"])
            known = [(k.name, knobs.pop(k.name, k.default)) for k in spec.knobs]
            return cls(data["method"], (*known, *knobs.items()))
        return cls(data["method"], tuple(knobs.items()))


@dataclass
class HookSite:
    """Where a framework lets methods act, for one built pipeline.

    ``hooks`` names the hook points offered. For the tower hook: the tower, whether its frames
    carry a CLS token, its tokens per frame and layer count. For the compression hook: the
    framework's pooling of ViT-token maps onto the compressed tokens' grid (VisionZip pools its
    attention scores with it; identity where the framework does not pool).
    """

    framework: str
    hooks: frozenset[str]
    tower: nn.Module | None = None
    tower_kind: str = ""
    """The tower's layer class (``SiglipEncoderLayer``, ``CLIPEncoderLayer``, ``Qwen2VLVisionBlock``)."""
    class_token: bool = False
    tower_tokens: int = 0
    tower_layers: int = 0
    pool: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    """(T, n_vit, c) -> (T, n, c): what the framework does to ViT tokens before the compression hook."""


class MethodStream:
    """One stream of one arm: the hooks a framework calls while it streams one video.

    The base class does nothing (the baseline); methods override what they use.
    """

    patches_tower = False
    """True when ``tower()`` replaces the tower's layer forwards (a framework that must give the
    baseline the same kernels, LiveCC, patches the tower itself only when this is False)."""

    def tower(self) -> contextlib.AbstractContextManager:
        """A context around every tower call of the stream (entered once per stream)."""
        return contextlib.nullcontext()

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """The visual tokens of one streaming step, (t, n, C) -> (t, k, C)."""
        return tokens

    def serving(self, ids: tuple[int, ...]) -> contextlib.AbstractContextManager:
        """A context around a tower call whose frames belong to several streams, ``ids`` naming
        each frame's (entered inside ``tower()``). Methods that keep no state across frames need
        nothing."""
        return contextlib.nullcontext()

    def compress_streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step's visual tokens of S concurrent streams, (S, t, n, C) -> (S, K, C).

        The default suits methods that compress each frame on its own: all S * t frames in one
        call. A method with memory across frames (a running mean, a temporal anchor) overrides it
        so that each stream reads only its own."""
        streams = tokens.shape[0]
        kept = self.compress(tokens.flatten(0, 1))                                    # (S * t, k, C)
        return kept.reshape(streams, -1, kept.shape[-1])                              # (S, t * k, C)

    @property
    def cacher_stats(self) -> CacherStats | None:
        """What STC-Cacher did in this stream (None for methods without it)."""
        return None

    @property
    def graph_stats(self) -> GraphStats | None:
        """CUDA-graph captures, replays and fallbacks of the tower so far (None without graphs)."""
        return None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its knobs, the hook points it needs, and how to start a stream."""

    name: str
    summary: str
    knobs: tuple[Knob, ...]
    hooks: frozenset[str]
    """Hook points the method acts at; ``stream`` uses those the site offers (see ``unavailable``)."""
    stream: Callable[[Arm, HookSite], MethodStream]
    tower_macs: Callable[[Arm, ViTShape, int], int] = lambda arm, shape, frames: _full_tower_macs(shape, frames)
    """Multiply-adds of the tower on ``frames`` frames under this arm (default: the full tower).
    Pre-fill MACs follow from the tokens each step sends to the LLM, whatever the method."""
    unavailable: Callable[[HookSite], str | None] = lambda site: None
    """Why the method cannot run at this site (None when it can), e.g. a tower it cannot patch."""
    report_note: str = ""
    """What a reader of a report with this arm must know about how it was run (the report's caveats)."""

    def arm(self, **values: Any) -> Arm:
        """An arm of this method: defaults overridden by ``values``, every value checked."""
        unknown = set(values) - {k.name for k in self.knobs}
        if unknown:
            names = ", ".join(k.name for k in self.knobs) or "none"
            raise MethodError(f"{self.name} has no knob {', '.join(sorted(unknown))} (its knobs: {names})")
        knobs = []
        for knob in self.knobs:
            value = values.get(knob.name, knob.default)
            knob.validate(value, self.name)
            knobs.append((knob.name, value))
        return Arm(self.name, tuple(knobs))

    def why_not(self, site: HookSite) -> str | None:
        """Why this method cannot run on the framework of ``site`` (None when it can)."""
        if not self.hooks & site.hooks:
            needs = " or ".join(sorted(self.hooks))
            return f"{site.framework} offers no {needs} hook point"
        return self.unavailable(site)


def _full_tower_macs(shape: ViTShape, frames: int) -> int:
    from stc.flops import vit_tower_macs

    return vit_tower_macs(shape, frames)
