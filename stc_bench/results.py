"""The versioned results schema and the one results table every view is derived from.

``results.json`` holds the config, the environment, every raw sample, and per frame count and
arm the exact token and MAC counts, fidelity against the baseline and what the cacher did, so
``report`` and ``compare`` work from files alone. ``RunResult.table()`` turns it into one tidy
pandas DataFrame (one row per frame count, arm and stage, each row beside its baseline row's
reduction): the terminal, report.md, the CSVs, the plots and ``compare`` read that table.

Schema 2 names each arm as a method plus its knobs; schema 1 files (baseline vs +STC points)
are upgraded on reading.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stc_bench.config import BenchConfig
from stc_bench.errors import BenchUsageError
from stc_bench.measurement import BASELINE, STAGE_ORDER, Measurement, Reduction, StageSpec, paired_reduction
from stc_bench.methods.method import Arm

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

FIDELITY_COLUMNS = ("vit_cosine_mean", "vit_cosine_min", "logits_top1_agreement", "logits_kl_mean")


class ResultsError(BenchUsageError):
    """A results file cannot be read; the message says why."""


@dataclass
class ArmResult:
    """Exact, non-timing facts of one arm at one frame count: MACs and tokens per stage, fidelity
    against the baseline (empty for the baseline itself), and what the cacher did per chunk."""

    frames: int
    arm: Arm
    macs: dict[str, int | None]
    tokens: dict[str, int]
    fidelity: dict[str, float] = field(default_factory=dict)
    chunk_kinds: list[str] = field(default_factory=list)
    recompute_fraction: float | None = None
    graphs: dict[str, Any] | None = None
    """CUDA-graph captures, replays, eager calls and why graphs were off, where they were asked for."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (a copy)."""
        return copy.deepcopy({"frames": self.frames, "arm": self.arm.to_dict(), "macs": self.macs, "tokens": self.tokens,
                              "fidelity": self.fidelity, "chunk_kinds": self.chunk_kinds,
                              "recompute_fraction": self.recompute_fraction, "graphs": self.graphs})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmResult:
        """Inverse of ``to_dict``."""
        return cls(d["frames"], Arm.from_dict(d["arm"]), dict(d["macs"]), dict(d["tokens"]), dict(d.get("fidelity", {})),
                   list(d.get("chunk_kinds", [])), d.get("recompute_fraction"), d.get("graphs"))


@dataclass
class RunResult:
    """One benchmark run: config, environment, how the pipeline was built, raw measurements and
    the exact facts of every arm."""

    config: BenchConfig
    environment: dict[str, Any]
    run: dict[str, Any]
    """scale, why that scale, weights (random / checkpoint), dtype, video, architecture."""
    measurements: list[Measurement] = field(default_factory=list)
    arms: list[ArmResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    complete: bool = False

    def measurement(self, frames: int, arm: Arm, stage: str) -> Measurement | None:
        """The measurement of ``stage`` of ``arm`` at ``frames`` frames."""
        return next((m for m in self.measurements
                     if m.spec.frames == frames and m.spec.stage == stage and m.spec.arm == arm), None)

    def baseline(self, frames: int, stage: str) -> Measurement | None:
        """The baseline measurement of ``stage`` at ``frames`` frames."""
        return self.measurement(frames, BASELINE, stage)

    @property
    def compared(self) -> list[ArmResult]:
        """Every arm but the baseline, per frame count, in run order."""
        return [a for a in self.arms if not a.arm.is_baseline]

    @property
    def frame_counts(self) -> list[int]:
        """Frame counts with results, in run order."""
        return list(dict.fromkeys(a.frames for a in self.arms))

    @property
    def stages(self) -> list[str]:
        """Stages measured, in pipeline order."""
        order = {s: i for i, s in enumerate(STAGE_ORDER)}
        return sorted({m.spec.stage for m in self.measurements}, key=lambda s: order.get(s, 9))

    def reduction(self, arm: ArmResult, stage: str) -> Reduction | None:
        """Paired reduction of ``stage`` of an arm against the baseline at its frame count."""
        base, new = self.baseline(arm.frames, stage), self.measurement(arm.frames, arm.arm, stage)
        if base is None or new is None or arm.arm.is_baseline:
            return None
        return paired_reduction(base, new)

    def flop_reduction(self, arm: ArmResult, stage: str) -> float | None:
        """``1 - macs(arm) / macs(baseline)`` of a stage; None for the baseline or where not modelled."""
        return _flop_reduction(self.baseline_facts(arm.frames), arm, stage)

    def baseline_facts(self, frames: int) -> ArmResult | None:
        """The baseline's exact facts at ``frames`` frames."""
        return next((a for a in self.arms if a.frames == frames and a.arm.is_baseline), None)

    def table(self) -> pd.DataFrame:
        """The results table (computed once per content; treat it as read-only): one row per
        frame count, arm and stage.

        Columns: run identity (framework, scale, device, dtype), frames, method, arm (label),
        one column per knob of any arm (empty where an arm has no such knob), stage, sample
        statistics (n, min_ms, median_ms, mean_ms, iqr_ms, cv, noisy), tokens and macs; against
        the baseline row of the same frame count and stage: reduction_min, reduction_median,
        ci_low, ci_high, flop_reduction, efficiency (empty on baseline rows); and the arm's
        fidelity, recompute fraction and peak memory. Every view of a run reads this.
        """
        key = (len(self.measurements), len(self.arms), tuple(m.n for m in self.measurements),
               tuple(bool(m.metadata) for m in self.measurements))
        cached = self.__dict__.get("_table")
        if cached is not None and cached[0] == key:
            return cached[1]
        table = self._build_table()
        self.__dict__["_table"] = (key, table)
        return table

    def _build_table(self) -> pd.DataFrame:
        import pandas as pd

        knob_names = list(dict.fromkeys(name for a in self.arms for name, _ in a.arm.knobs))
        rows = []
        for facts in self.arms:
            base_facts = self.baseline_facts(facts.frames)
            for stage in self.stages:
                m = self.measurement(facts.frames, facts.arm, stage)
                if m is None:
                    continue
                knobs = dict(facts.arm.knobs)
                row: dict[str, Any] = {
                    "framework": m.spec.framework, "scale": m.spec.scale, "device": m.spec.device, "dtype": m.spec.dtype,
                    "frames": facts.frames, "method": facts.arm.method, "arm": facts.arm.label,
                    **{name: knobs.get(name) for name in knob_names},
                    "stage": stage, "n": m.n, "min_ms": m.min, "median_ms": m.median, "mean_ms": m.mean,
                    "iqr_ms": m.iqr, "cv": m.cv, "noisy": m.noisy,
                    "tokens": facts.tokens.get(stage), "macs": facts.macs.get(stage),
                }
                r = self.reduction(facts, stage)
                flop = _flop_reduction(base_facts, facts, stage)
                row.update({
                    "reduction_min": r.on_min if r else None, "reduction_median": r.on_median if r else None,
                    "ci_low": r.ci_low if r else None, "ci_high": r.ci_high if r else None, "pairs": r.pairs if r else None,
                    "flop_reduction": flop,
                    "efficiency": r.on_median / flop if r is not None and flop else None,
                })
                row.update({name: facts.fidelity.get(name) for name in FIDELITY_COLUMNS})
                row["recompute_fraction"] = facts.recompute_fraction
                row["peak_memory_mb"] = m.metadata.get("peak_memory_mb")
                rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (with derived reductions included for readers of the file); a copy."""
        summaries = []
        for facts in self.compared:
            for stage in self.stages:
                r = self.reduction(facts, stage)
                if r is not None:
                    summaries.append({"frames": facts.frames, "arm": facts.arm.to_dict(), "stage": stage,
                                      "reduction_min": r.on_min, "reduction_median": r.on_median, "ci_low": r.ci_low,
                                      "ci_high": r.ci_high,
                                      "flop_reduction": _flop_reduction(self.baseline_facts(facts.frames), facts, stage)})
        return {
            "schema_version": SCHEMA_VERSION,
            "complete": self.complete,
            "config": self.config.to_dict(),
            "environment": copy.deepcopy(self.environment),
            "run": copy.deepcopy(self.run),
            "errors": list(self.errors),
            "arms": [a.to_dict() for a in self.arms],
            "measurements": [m.to_dict() for m in self.measurements],
            "summaries": summaries,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        """Inverse of ``to_dict`` (summaries are recomputed, not read); schema 1 is upgraded."""
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise ResultsError(f"results schema version {version!r} is not supported (this stc-bench reads {readable})")
        if version == 1:
            d = upgrade_schema_1(d)
        return cls(
            config=BenchConfig.from_dict(d["config"]),
            environment=d["environment"],
            run=d["run"],
            measurements=[Measurement.from_dict(m) for m in d["measurements"]],
            arms=[ArmResult.from_dict(a) for a in d["arms"]],
            errors=list(d.get("errors", [])),
            complete=bool(d.get("complete", False)),
        )

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so a crash never leaves a torn results.json."""
        write_json_atomically(path, self.to_dict())


def _flop_reduction(base: ArmResult | None, arm: ArmResult, stage: str) -> float | None:
    """``1 - macs(arm) / macs(baseline)`` of a stage; None for the baseline or where MACs are not modelled."""
    if base is None or arm.arm.is_baseline:
        return None
    before, after = base.macs.get(stage), arm.macs.get(stage)
    if not before or after is None:
        return None
    return 1.0 - after / before


def upgrade_schema_1(d: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 document (baseline vs +STC points) as schema 2: measurement specs name their
    arm as ``{"method", "knobs"}``; each point's facts become a baseline and an stc arm result."""
    config = d["config"]
    fixed = {"metric": config.get("metric", "cosine"), "selection": config.get("selection", "shared"),
             "cuda_graph": config.get("cuda_graph", False)}

    def stc_arm(point: dict[str, Any]) -> dict[str, Any]:
        knobs = {"ratio": point["ratio"], "interval": point["interval"], "tokens_per_frame": point["tokens_per_frame"], **fixed}
        return {"method": "stc", "knobs": knobs}

    measurements = []
    for m in d["measurements"]:
        spec = dict(m["spec"])
        point = {k: spec.pop(k, None) for k in ("ratio", "interval", "tokens_per_frame")}
        spec["arm"] = {"method": "baseline", "knobs": {}} if spec["arm"] == "baseline" else stc_arm(point)
        measurements.append({**m, "spec": spec})
    arms, baselines = [], set()
    for p in d["points"]:
        if p["frames"] not in baselines:
            baselines.add(p["frames"])
            arms.append({"frames": p["frames"], "arm": {"method": "baseline", "knobs": {}}, "macs": p["macs"]["baseline"],
                         "tokens": p["tokens"]["baseline"], "chunk_kinds": ["full"] * len(p.get("chunk_kinds", []))})
        arms.append({"frames": p["frames"], "arm": stc_arm(p["point"]), "macs": p["macs"]["stc"], "tokens": p["tokens"]["stc"],
                     "fidelity": p.get("fidelity", {}), "chunk_kinds": p.get("chunk_kinds", []),
                     "recompute_fraction": p.get("recompute_fraction")})
    return {**d, "schema_version": SCHEMA_VERSION, "measurements": measurements, "arms": arms}


def write_json_atomically(path: Path, data: Any) -> None:
    """Write JSON through a temp file + rename, so a crash never leaves a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, allow_nan=True)
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
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ResultsError(f"{p}: not an stc-bench results file ({type(err).__name__}: {err})") from None


def stage_spec(config: BenchConfig, run: dict[str, Any], device_label: str, frames: int, stage: str, arm: Arm) -> StageSpec:
    """The identity of a measurement of this run."""
    return StageSpec(config.framework, run["scale"], device_label, run["dtype"], frames, stage, arm)


def is_missing(value: Any) -> bool:
    """True for the empty cells of the results table (None or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
