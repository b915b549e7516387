"""What a benchmark run measures: a frozen, validated ``BenchConfig`` saved with its results.

Pure Python (no torch import): the CLI builds it before anything heavy is loaded, and
validation here touches no device, file or environment variable. Messages name the CLI option
to change.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from stc_bench.methods import METHOD_MODULES
from stc_bench.shard import Shard

SCALES = ("auto", "full", "small", "tiny", "72b")
PLACED_SCALES = ("72b",)
"""Scales larger than one GPU: built only with ``--device-map auto`` (never chosen by ``auto``)."""
DEVICE_MAPS = ("none", "auto")
DTYPES = ("auto", "float32", "float16", "bfloat16")
METRICS = ("cosine", "l1", "l2")
SELECTIONS = ("shared", "per_layer")


def _fail(option: str, value: object, allowed: str) -> None:
    raise ValueError(f"{option} {value}: must be {allowed}")


@dataclass(frozen=True)
class STCPoint:
    """One +STC setting: the cacher's ratio and interval, and the pruner's budget per frame."""

    ratio: float
    interval: int
    tokens_per_frame: int

    @property
    def label(self) -> str:
        """Short human label, e.g. ``r0.25 N2 k64``."""
        return f"r{self.ratio:g} N{self.interval} k{self.tokens_per_frame}"


def parse_arm_override(text: str) -> tuple[str, str, str]:
    """``METHOD:KNOB=VALUE`` -> (method, knob, value text); ValueError naming the form otherwise."""
    method, sep, assignment = text.partition(":")
    knob, eq, value = assignment.partition("=")
    if not (sep and eq and method.strip() and knob.strip() and value.strip()):
        raise ValueError(f"--arm {text}: write METHOD:KNOB=VALUE, e.g. --arm tome:tokens_per_frame=32")
    return method.strip(), knob.strip(), value.strip()


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark run: one framework x one scale x one device, several frame counts and arms
    (STC at every point of its knobs, and the peer methods asked for), each measured against a
    shared baseline, interleaved, over repeats."""

    framework: str = "rekv"
    scale: str = "auto"
    """auto = full on CUDA, small on CPU."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto = float16 on CUDA, float32 on CPU."""
    device_map: str = "none"
    """none = every module on the run's device; auto = the LLM across every visible GPU
    (``stc_bench.placement``), the vision tower and projector on the run's device."""
    frames: tuple[int, ...] = (16,)
    streams: tuple[int, ...] = (1,)
    """Videos served concurrently, in lockstep (one chunk of each per step); several values sweep."""
    repeats: int = 20
    warmup: int = 5
    ratios: tuple[float, ...] = (0.25,)
    intervals: tuple[int, ...] = (2,)
    tokens_per_frame: tuple[int, ...] = (64,)
    chunk_frames: int | None = None
    """Frames per streaming step; None = the framework's own protocol."""
    metric: str = "cosine"
    selection: str = "shared"
    cuda_graph: bool = False
    compile: bool = False
    """torch.compile the cacher's selective layers (not with cuda_graph)."""
    seed: int = 0
    video: str | None = None
    fps: float = 0.5
    checkpoint: str | None = None
    out: str = "reports"
    arms: tuple[str, ...] = ("baseline", "stc")
    """Methods to measure (the baseline is always measured: every reduction is against it)."""
    arm_overrides: tuple[str, ...] = ()
    """``METHOD:KNOB=VALUE`` knob settings of the peer methods (STC's knobs have their own options)."""
    shard: str | None = None
    """``K/N``: measure only shard K (from 0) of N slices of the points (``stc_bench.shard``); None = all."""

    def __post_init__(self) -> None:
        if isinstance(self.seed, int) and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed}: must fit in 64 bits, from {-(2**63)} to {2**63 - 1}; e.g. --seed 0")
        if isinstance(self.fps, (int, float)) and not math.isfinite(self.fps):
            _fail("--fps", self.fps, "a finite number of frames per second; e.g. --fps 0.5")
        if self.scale not in SCALES:
            _fail("--scale", self.scale, "one of " + ", ".join(SCALES))
        if self.dtype not in DTYPES:
            _fail("--dtype", self.dtype, "one of " + ", ".join(DTYPES))
        if self.device_map not in DEVICE_MAPS:
            _fail("--device-map", self.device_map, "one of " + ", ".join(DEVICE_MAPS))
        if self.device_map == "auto" and str(self.device).strip().lower() == "cpu":
            _fail("--device-map", "auto", "used on CUDA GPUs, not with --device cpu: pass --device auto or cuda:N, "
                  "or leave out --device-map")
        if self.scale in PLACED_SCALES and self.device_map != "auto":
            _fail("--scale", self.scale, "used with --device-map auto (its LLM is larger than one GPU)")
        if self.metric not in METRICS:
            _fail("--metric", self.metric, "one of " + ", ".join(METRICS))
        if self.selection not in SELECTIONS:
            _fail("--selection", self.selection, "one of " + ", ".join(SELECTIONS))
        for option, values in (("--frames", self.frames), ("--tokens-per-frame", self.tokens_per_frame),
                               ("--interval", self.intervals), ("--streams", self.streams)):
            if not values:
                _fail(option, "(none)", "given at least once")
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    _fail(option, v, "a whole number >= 1")
        if not self.ratios:
            _fail("--ratio", "(none)", "given at least once")
        for option, values in (("--frames", self.frames), ("--ratio", self.ratios), ("--interval", self.intervals),
                               ("--tokens-per-frame", self.tokens_per_frame), ("--streams", self.streams)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                _fail(option, ",".join(f"{v:g}" for v in repeated), "given once each (it is repeated)")
        if max(self.streams) > min(self.frames):
            # stream s starts at frame s * T // S (runner.serving_clip): with S > T two streams would share a start
            _fail("--streams", max(self.streams), f"at most the smallest frame count ({min(self.frames)}): each stream "
                  "starts the clip at a frame of its own; lower --streams or raise --frames")
        for r in self.ratios:
            if not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                _fail("--ratio", r, "in (0, 1], the fraction of tokens recomputed on selective frames")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            _fail("--repeats", self.repeats, "a whole number >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            _fail("--warmup", self.warmup, "a whole number >= 0")
        if self.chunk_frames is not None and (not isinstance(self.chunk_frames, int) or self.chunk_frames < 1):
            _fail("--chunk-frames", self.chunk_frames, "a whole number >= 1")
        if not self.fps > 0:
            _fail("--fps", self.fps, "> 0")
        if self.compile and self.cuda_graph:
            _fail("--compile", "with --cuda-graph", "used without --cuda-graph (on CUDA, compile replays graphs of its own)")
        if not self.arms:
            _fail("--arms", "(none)", "one or more of " + ", ".join(METHOD_MODULES))
        for method in self.arms:
            if method not in METHOD_MODULES:
                _fail("--arms", method, "one or more of " + ", ".join(METHOD_MODULES))
        repeated = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if repeated:
            _fail("--arms", ",".join(repeated), "given once each (it is repeated)")
        for override in self.arm_overrides:
            method, _, _ = parse_arm_override(override)
            if method not in self.arms:
                _fail("--arm", override, f"a setting of a measured method: add {method} to --arms")
            if method in ("baseline", "stc"):
                _fail("--arm", override, "a peer's knob: the baseline has none, and STC's are --ratio, --interval, "
                      "--tokens-per-frame, --metric, --selection, --cuda-graph, --compile")
        if self.checkpoint is not None and self.scale not in ("auto", "full"):
            _fail("--scale", self.scale, "auto or full with --checkpoint (the checkpoint fixes the architecture)")
        if self.shard is not None:
            # Stored as K/N exactly (" 1 / 4" -> "1/4"), so the shards of one run compare equal in merge.
            object.__setattr__(self, "shard", Shard.parse(self.shard).label)

    @property
    def points(self) -> list[STCPoint]:
        """Every +STC point: the cartesian product of ratios, intervals and budgets."""
        return [STCPoint(r, n, k) for r, n, k in itertools.product(self.ratios, self.intervals, self.tokens_per_frame)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        """Inverse of ``to_dict``; unknown keys (from a newer schema) are ignored."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)
