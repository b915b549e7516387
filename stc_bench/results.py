"""The versioned results schema: everything a report needs, so ``report`` and ``compare``
work from files alone. ``results.json`` holds the config, the environment, every raw sample,
the exact token/MAC counts and fidelity of each point, and derived summaries for readers."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stc_bench.config import BenchConfig, STCPoint
from stc_bench.errors import BenchUsageError
from stc_bench.measurement import Arm, Measurement, Reduction, StageSpec, paired_reduction

SCHEMA_VERSION = 1


class ResultsError(BenchUsageError):
    """A results file cannot be read; the message says why."""


@dataclass
class PointResult:
    """Exact, non-timing facts of one (frame count, STC point): MACs and tokens per arm and
    stage, fidelity of +STC against the baseline, and what the cacher did per chunk."""

    frames: int
    point: STCPoint
    macs: dict[str, dict[str, int | None]]
    tokens: dict[str, dict[str, int]]
    fidelity: dict[str, float]
    chunk_kinds: list[str] = field(default_factory=list)
    recompute_fraction: float | None = None

    def flop_reduction(self, stage: str) -> float | None:
        """``1 - macs(stc) / macs(baseline)`` for ``stage``; None where MACs are not modelled."""
        base, new = self.macs[Arm.BASELINE.value].get(stage), self.macs[Arm.STC.value].get(stage)
        if not base or new is None:
            return None
        return 1.0 - new / base

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (a copy: mutating it leaves the result untouched)."""
        return copy.deepcopy({"frames": self.frames, "point": self.point.__dict__, "macs": self.macs, "tokens": self.tokens,
                              "fidelity": self.fidelity, "chunk_kinds": self.chunk_kinds,
                              "recompute_fraction": self.recompute_fraction})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PointResult:
        """Inverse of ``to_dict``."""
        return cls(d["frames"], STCPoint(**d["point"]), d["macs"], d["tokens"], d["fidelity"],
                   list(d.get("chunk_kinds", [])), d.get("recompute_fraction"))


@dataclass
class RunResult:
    """One benchmark run: config, environment, how the pipeline was built, raw measurements."""

    config: BenchConfig
    environment: dict[str, Any]
    run: dict[str, Any]
    """scale, why that scale, weights (random / checkpoint), dtype, architecture description."""
    measurements: list[Measurement] = field(default_factory=list)
    points: list[PointResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    complete: bool = False

    def baseline(self, frames: int, stage: str) -> Measurement | None:
        """The baseline measurement of ``stage`` at ``frames`` frames."""
        return next((m for m in self.measurements if m.spec.arm == Arm.BASELINE.value
                     and m.spec.frames == frames and m.spec.stage == stage), None)

    def stc(self, frames: int, point: STCPoint, stage: str) -> Measurement | None:
        """The +STC measurement of ``stage`` at ``frames`` frames and ``point``."""
        return next((m for m in self.measurements if m.spec.arm == Arm.STC.value and m.spec.frames == frames
                     and m.spec.stage == stage and (m.spec.ratio, m.spec.interval, m.spec.tokens_per_frame)
                     == (point.ratio, point.interval, point.tokens_per_frame)), None)

    @property
    def stages(self) -> list[str]:
        """Stages measured, in pipeline order."""
        order = {"vit": 0, "compress": 1, "prefill": 2}
        return sorted({m.spec.stage for m in self.measurements}, key=lambda s: order.get(s, 9))

    def reduction(self, point: PointResult, stage: str) -> Reduction | None:
        """Paired reduction of ``stage`` at a point, from the raw samples."""
        base, new = self.baseline(point.frames, stage), self.stc(point.frames, point.point, stage)
        if base is None or new is None:
            return None
        return paired_reduction(base, new)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (with derived reductions included for readers of the file); a copy."""
        summaries = []
        for p in self.points:
            for stage in self.stages:
                r = self.reduction(p, stage)
                if r is not None:
                    summaries.append({"frames": p.frames, **p.point.__dict__, "stage": stage,
                                      "reduction_min": r.on_min, "reduction_median": r.on_median,
                                      "ci_low": r.ci_low, "ci_high": r.ci_high, "flop_reduction": p.flop_reduction(stage)})
        return {
            "schema_version": SCHEMA_VERSION,
            "complete": self.complete,
            "config": self.config.to_dict(),
            "environment": copy.deepcopy(self.environment),
            "run": copy.deepcopy(self.run),
            "errors": list(self.errors),
            "points": [p.to_dict() for p in self.points],
            "measurements": [m.to_dict() for m in self.measurements],
            "summaries": summaries,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Inverse of ``to_dict`` (summaries are recomputed, not read)."""
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ResultsError(f"results schema version {version!r} is not supported (this stc-bench reads {SCHEMA_VERSION})")
        return cls(
            config=BenchConfig.from_dict(d["config"]),
            environment=d["environment"],
            run=d["run"],
            measurements=[Measurement.from_dict(m) for m in d["measurements"]],
            points=[PointResult.from_dict(p) for p in d["points"]],
            errors=list(d.get("errors", [])),
            complete=bool(d.get("complete", False)),
        )

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so a crash never leaves a torn results.json."""
        write_json_atomically(path, self.to_dict())


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a crash never leaves a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)


def load_results(path: str | Path) -> RunResult:
    """Read a results.json, or the results.json inside a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ResultsError(f"{path}: no results.json here; pass a results file or a run folder")
    try:
        return RunResult.from_dict(json.loads(p.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ResultsError(f"{p}: not an stc-bench results file ({type(err).__name__}: {err})") from None


def stage_spec(config: BenchConfig, run: dict[str, Any], device_label: str, frames: int, stage: str,
               point: STCPoint | None) -> StageSpec:
    """The identity of a measurement of this run."""
    if point is None:
        return StageSpec(config.framework, run["scale"], device_label, run["dtype"], frames, stage, Arm.BASELINE.value)
    return StageSpec(config.framework, run["scale"], device_label, run["dtype"], frames, stage, Arm.STC.value,
                     point.ratio, point.interval, point.tokens_per_frame)
