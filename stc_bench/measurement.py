"""Measurements with their raw samples, statistics computed on demand, and paired reductions.

``StageSpec`` is the identity of a measurement (what was measured); ``Measurement`` keeps
every raw sample (warm-up excluded) and computes statistics lazily, after
``torch.utils.benchmark.Measurement``. Nothing is rounded here: rounding is a rendering choice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np

from stc_bench.methods.method import Arm

BASELINE = Arm("baseline")
"""The arm every other arm is compared with."""

NOISY_CV = 0.10
"""A measurement whose coefficient of variation exceeds this is flagged as noisy."""


STAGE_ORDER = ("vit", "compress", "prefill")
"""Stages of a streaming VideoLLM that a benchmark times, in pipeline order."""


@dataclass(frozen=True)
class StageSpec:
    """What was measured: one stage of one arm at one frame count of one run."""

    framework: str
    scale: str
    device: str
    dtype: str
    frames: int
    stage: str
    arm: Arm
    shard: int | None = None
    """In a merged run (``stc-bench merge``): the shard K that measured it, with its own baseline; else None."""
    streams: int = 1
    """Videos served concurrently in each timed pass (``--streams``); its baseline served as many."""

    def baseline(self) -> StageSpec:
        """The spec of the baseline this measurement is compared with (same shard, same streams)."""
        return replace(self, arm=BASELINE)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (the arm as ``{"method", "knobs"}``; ``shard`` only in a merged run,
        ``streams`` only where more than one)."""
        d = {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "arm"}, "arm": self.arm.to_dict()}
        if d["shard"] is None:
            del d["shard"]  # files of unsharded runs stay as they were
        if d["streams"] == 1:
            del d["streams"]  # so do files of one-stream runs
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSpec:
        """Inverse of ``to_dict``."""
        return cls(**{**data, "arm": Arm.from_dict(data["arm"])})


@dataclass
class Measurement:
    """Raw samples of one stage and arm: ``times_ms[i]`` is repeat i's total over all chunks,
    ``chunk_ms[i]`` its per-chunk times. ``metadata`` holds exact, non-timing facts
    (token counts, recompute fraction, peak memory)."""

    spec: StageSpec
    times_ms: list[float]
    warmup: int = 0
    chunk_ms: list[list[float]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def _sorted(self) -> np.ndarray:
        return np.sort(np.asarray(self.times_ms, dtype=float))

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.times_ms)

    @property
    def min(self) -> float:
        """Smallest sample."""
        return float(self._sorted[0])

    @property
    def max(self) -> float:
        """Largest sample."""
        return float(self._sorted[-1])

    @property
    def median(self) -> float:
        """Median sample."""
        return float(np.median(self._sorted))

    @property
    def mean(self) -> float:
        """Mean of the samples."""
        return float(self._sorted.mean())

    @property
    def iqr(self) -> float:
        """Interquartile range (75th - 25th percentile, linear interpolation)."""
        q1, q3 = np.percentile(self._sorted, [25, 75])
        return float(q3 - q1)

    @property
    def cv(self) -> float:
        """Coefficient of variation: sample standard deviation over the mean (0 for one sample)."""
        if self.n < 2 or self.mean == 0:
            return 0.0
        return float(self._sorted.std(ddof=1) / self.mean)

    @property
    def noisy(self) -> bool:
        """True when the spread is too large to trust small differences."""
        return self.cv > NOISY_CV

    @property
    def warnings(self) -> list[str]:
        """Human-readable warnings about this measurement."""
        out = []
        if self.noisy:
            out.append(f"{self.spec.stage}/{self.spec.arm.label}: noisy (CV {self.cv:.1%} > {NOISY_CV:.0%})")
        if self.n < 5:
            out.append(f"{self.spec.stage}/{self.spec.arm.label}: only {self.n} samples")
        return out

    @staticmethod
    def merge(measurements: list[Measurement]) -> list[Measurement]:
        """Pool replicates that share a spec (samples concatenated, first metadata kept)."""
        pooled: dict[StageSpec, Measurement] = {}
        for m in measurements:
            if m.spec in pooled:
                p = pooled[m.spec]
                pooled[m.spec] = Measurement(p.spec, p.times_ms + m.times_ms, p.warmup, p.chunk_ms + m.chunk_ms, p.metadata)
            else:
                pooled[m.spec] = Measurement(m.spec, list(m.times_ms), m.warmup, list(m.chunk_ms), dict(m.metadata))
        return list(pooled.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict."""
        return {"spec": self.spec.to_dict(), "times_ms": list(self.times_ms), "warmup": self.warmup,
                "chunk_ms": [list(c) for c in self.chunk_ms], "metadata": copy.deepcopy(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of ``to_dict``."""
        return cls(StageSpec.from_dict(data["spec"]), list(data["times_ms"]), data.get("warmup", 0),
                   [list(c) for c in data.get("chunk_ms", [])], dict(data.get("metadata", {})))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Measurement):
            return NotImplemented
        return self.to_dict() == other.to_dict()


@dataclass(frozen=True)
class Reduction:
    """``1 - arm / baseline`` for one stage, on the minima and on the medians, with a paired
    bootstrap 95% interval on the median reduction. Positive = the arm is faster.

    ``round_iqr``: the interquartile range of the per-round reductions ``1 - arm[i] / baseline[i]``
    (round i's pair of streams): how much the reduction moved from round to round within the run,
    in the reduction's own units (0.02 = 2 percentage points). A change between two runs well
    inside it is noise. NaN with fewer than two rounds."""

    stage: str
    on_min: float
    on_median: float
    ci_low: float
    ci_high: float
    pairs: int
    round_iqr: float = math.nan

    @property
    def conclusive(self) -> bool:
        """True when the interval excludes zero (a real speed-up or slow-down)."""
        return self.ci_low > 0 or self.ci_high < 0


BOOTSTRAP_RESAMPLES = 2000


def round_reductions(baseline: Measurement, arm: Measurement) -> np.ndarray:
    """``1 - arm[i] / baseline[i]`` of every round i both measured (samples are stored in round
    order, so sample i of each arm is the same interleaved round); rounds whose baseline took no
    time are left out."""
    n = min(baseline.n, arm.n)
    base = np.asarray(baseline.times_ms[:n], dtype=float)
    new = np.asarray(arm.times_ms[:n], dtype=float)
    timed = base > 0
    return 1.0 - new[timed] / base[timed]


def paired_reduction(baseline: Measurement, arm: Measurement, seed: int = 0) -> Reduction:
    """Reduction of ``arm`` against ``baseline``, pairing sample i of each (same interleaved round).

    The interval resamples *pairs* of repeats with replacement, so drift shared by both arms
    of a round cancels; it is the 2.5th-97.5th percentile of the resampled median reductions.
    ``round_iqr`` is the interquartile range of the per-round reductions (``round_reductions``).
    """
    n = min(baseline.n, arm.n)
    base = np.asarray(baseline.times_ms[:n], dtype=float)
    new = np.asarray(arm.times_ms[:n], dtype=float)
    on_min = 1.0 - float(new.min()) / float(base.min())
    on_median = 1.0 - float(np.median(new)) / float(np.median(base))
    rounds = round_reductions(baseline, arm)
    if len(rounds) < 2:
        spread = math.nan
    else:
        q1, q3 = np.percentile(rounds, [25, 75])
        spread = float(q3 - q1)
    if n < 2:
        return Reduction(baseline.spec.stage, on_min, on_median, -math.inf, math.inf, n, spread)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))                     # (B, n)
    resampled = 1.0 - np.median(new[idx], axis=1) / np.median(base[idx], axis=1)  # (B,)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Reduction(baseline.spec.stage, on_min, on_median, float(low), float(high), n, spread)


LAUNCH_BOUND_EXCESS = 0.20
"""A stage whose spans take this much longer than the same work pre-queued behind a sleep kernel
keeps the GPU waiting for the host's launches."""


@dataclass(frozen=True)
class StageLaunches:
    """The launch figures of one stage of one arm, from untimed passes (``stc_bench.launches``)."""

    operators_per_frame: float | None
    """Operators dispatched inside the stage's spans, per frame of the stream (None: not counted,
    as for compiled arms)."""
    prequeued_ms: float | None = None
    """Span sum of the stage in a pass pre-queued behind a sleep kernel (CUDA only)."""
    span_ms: float | None = None
    """Span sum of the stage in a normal pass right before it (CUDA only)."""
    enqueue_ms: float | None = None
    """Host time to enqueue the whole pre-queued pass."""
    head_start_ms: float | None = None
    """Length of the sleep kernel the pass was queued behind."""

    @property
    def verdict(self) -> str | None:
        """"launch-bound (...)", "GPU-bound (...)", "no verdict: ...", or None on CPU."""
        if self.prequeued_ms is None or self.span_ms is None:
            return None
        return launch_verdict(self.span_ms, self.prequeued_ms, self.enqueue_ms, self.head_start_ms)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageLaunches:
        """Inverse of ``to_dict``; keys written by a newer stc-bench are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def launch_verdict(span_ms: float, prequeued_ms: float, enqueue_ms: float, head_start_ms: float) -> str:
    """Whether a pass (or a stage of it) is launch-bound, from its span sum and the span sum of
    the same work enqueued behind a ``head_start_ms`` sleep kernel (``enqueue_ms``: how long the
    host took to enqueue the pass). No verdict when the host was not done before the sleep ended
    (it blocked on the device between spans, or its launch queue filled), as the GPU may then
    have waited there too."""
    if enqueue_ms >= head_start_ms:
        return (f"no verdict: the host took {enqueue_ms:.1f} ms to enqueue the pass, longer than the "
                f"{head_start_ms:.1f} ms head start (it waited for the device between spans, or its launch queue filled)")
    excess = span_ms / max(prequeued_ms, 1e-6) - 1
    if excess > LAUNCH_BOUND_EXCESS:
        return f"launch-bound (+{excess:.0%} over pre-queued): raise --chunk-frames or use --cuda-graph"
    return f"GPU-bound ({excess:+.0%} over pre-queued)"
