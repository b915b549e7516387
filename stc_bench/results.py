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

import contextlib
import copy
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stc_bench.config import SCALES, BenchConfig
from stc_bench.errors import BenchUsageError
from stc_bench.measurement import BASELINE, STAGE_ORDER, Measurement, Reduction, StageLaunches, StageSpec, paired_reduction
from stc_bench.methods.method import Arm

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
DOCUMENT_KEYS = ("schema_version", "complete", "config", "environment", "run", "errors", "arms", "measurements",
                 "summaries", "points")
"""Top-level keys of a results document this stc-bench reads or derives (``points``: schema 1)."""
RUN_SCALES = (*(s for s in SCALES if s != "auto"), "checkpoint")
"""Scales a run is built at (``run.scale``; ``auto`` is resolved before building)."""

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
    host_usage: dict[str, list[float]] | None = None
    """Raw samples, one per timed stream in round order: ``minor_faults``, ``major_faults`` and
    ``system_ms`` of the whole process during the stream (``getrusage``); None in files written
    before stc-bench recorded them, or where the OS does not count them."""
    launches: dict[str, dict[str, Any]] | None = None
    """Per stage, the launch figures of one untimed pass (``stc_bench.launches.StageLaunches``):
    operators dispatched per frame, and on CUDA the pre-queued span sum the launch-bound verdict
    is judged from; None in files written before stc-bench recorded them."""
    shard: int | None = None
    """In a merged run (``stc-bench merge``): the shard K that measured this arm, against its own
    baseline (the baseline's ArmResult of the same frame count and shard); else None."""
    streams: int = 1
    """Videos served concurrently in each pass (``--streams``); compared with the baseline serving
    as many. ``macs`` and ``tokens`` count every stream."""

    @property
    def name(self) -> str:
        """How reports name the arm: its label, with its streams where several and its shard in a merged run."""
        return arm_name(self.arm.label, self.shard, self.streams)

    @property
    def page_faults(self) -> list[float]:
        """Page faults (minor + major) of each timed stream; empty where not recorded."""
        usage = self.host_usage or {}
        return [a + b for a, b in zip(usage.get("minor_faults", []), usage.get("major_faults", []))]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (a copy); ``host_usage`` only where it was recorded."""
        d = {"frames": self.frames, "arm": self.arm.to_dict(), "macs": self.macs, "tokens": self.tokens,
             "fidelity": self.fidelity, "chunk_kinds": self.chunk_kinds, "recompute_fraction": self.recompute_fraction,
             "graphs": self.graphs}
        if self.host_usage is not None:
            d["host_usage"] = self.host_usage
        if self.launches is not None:
            d["launches"] = self.launches
        if self.shard is not None:
            d["shard"] = self.shard
        if self.streams != 1:
            d["streams"] = self.streams
        return copy.deepcopy(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArmResult:
        """Inverse of ``to_dict``."""
        host = d.get("host_usage")
        return cls(d["frames"], Arm.from_dict(d["arm"]), dict(d["macs"]), dict(d["tokens"]), dict(d.get("fidelity", {})),
                   list(d.get("chunk_kinds", [])), d.get("recompute_fraction"), d.get("graphs"),
                   {k: list(v) for k, v in host.items()} if host is not None else None,
                   copy.deepcopy(d.get("launches")), d.get("shard"), d.get("streams", 1))


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
    extra: dict[str, Any] = field(default_factory=dict)
    """Top-level keys of the file this result was read from that this stc-bench does not know
    (written by a newer one): kept as they were and written back, never dropped."""

    def measurement(self, frames: int, arm: Arm, stage: str, shard: int | None = None, streams: int = 1) -> Measurement | None:
        """The measurement of ``stage`` of ``arm`` at ``frames`` frames serving ``streams`` videos (in a
        merged run: of ``shard``)."""
        return next((m for m in self.measurements
                     if m.spec.frames == frames and m.spec.stage == stage and m.spec.arm == arm and m.spec.shard == shard
                     and m.spec.streams == streams), None)

    def baseline(self, frames: int, stage: str, shard: int | None = None, streams: int = 1) -> Measurement | None:
        """The baseline measurement of ``stage`` at ``frames`` frames and ``streams`` (in a merged run: ``shard``'s own)."""
        return self.measurement(frames, BASELINE, stage, shard, streams)

    @property
    def compared(self) -> list[ArmResult]:
        """Every arm but the baseline, per frame count, in run order."""
        return [a for a in self.arms if not a.arm.is_baseline]

    @property
    def stream_counts(self) -> list[int]:
        """Numbers of concurrent streams with results, in run order ([1] for a one-stream run)."""
        return list(dict.fromkeys(a.streams for a in self.arms)) or [1]

    @property
    def frame_counts(self) -> list[int]:
        """Frame counts with results, in run order."""
        return list(dict.fromkeys(a.frames for a in self.arms))

    @property
    def failed_frames(self) -> dict[int, str]:
        """Frame counts that failed (out of memory), recorded in ``run.failed_frames``, with the error."""
        return {f["frames"]: f.get("error", "") for f in self.run.get("failed_frames", [])}

    @property
    def stages(self) -> list[str]:
        """Stages measured, in pipeline order."""
        order = {s: i for i, s in enumerate(STAGE_ORDER)}
        return sorted({m.spec.stage for m in self.measurements}, key=lambda s: order.get(s, 9))

    def reduction(self, arm: ArmResult, stage: str) -> Reduction | None:
        """Paired reduction of ``stage`` of an arm against the baseline at its frame count (in a
        merged run, the baseline measured in the arm's own shard: never another shard's)."""
        base = self.baseline(arm.frames, stage, arm.shard, arm.streams)
        new = self.measurement(arm.frames, arm.arm, stage, arm.shard, arm.streams)
        if base is None or new is None or arm.arm.is_baseline or min(base.n, new.n) == 0 or base.min <= 0:
            return None  # no ratio to a baseline of no time (or no samples): rendered as a dash
        return paired_reduction(base, new)

    def flop_reduction(self, arm: ArmResult, stage: str) -> float | None:
        """``1 - macs(arm) / macs(baseline)`` of a stage; None for the baseline or where not modelled."""
        base = self.baseline_facts(arm.frames, arm.shard, arm.streams)
        if base is None or arm.arm.is_baseline:
            return None
        before, after = base.macs.get(stage), arm.macs.get(stage)
        if not before or after is None:
            return None
        return 1.0 - after / before

    def baseline_facts(self, frames: int, shard: int | None = None, streams: int = 1) -> ArmResult | None:
        """The baseline's exact facts at ``frames`` frames and ``streams`` (in a merged run: ``shard``'s own)."""
        return next((a for a in self.arms if a.frames == frames and a.arm.is_baseline and a.shard == shard
                     and a.streams == streams), None)

    def table(self) -> pd.DataFrame:
        """The results table (computed once per content; treat it as read-only): one row per
        frame count, number of concurrent streams, arm and stage.

        Columns: run identity (framework, scale, device, dtype), frames, method, arm (label),
        one column per knob of any arm (empty where an arm has no such knob), stage, sample
        statistics (n, min_ms, median_ms, mean_ms, iqr_ms, cv, noisy), tokens and macs; against
        the baseline row of the same frame count and stage: reduction_min, reduction_median,
        ci_low, ci_high, round_iqr (the interquartile range of the per-round reductions),
        flop_reduction, efficiency (empty on baseline rows); and the arm's fidelity, recompute
        fraction, peak memory, and median page faults and system ms per timed stream
        (page_faults_median, system_ms_median: the whole stream, the same on each stage row;
        empty where not recorded); the stage's operators_per_frame and, on CUDA,
        launch_verdict (``stc_bench.launches``; empty where not recorded); and shard: in a merged
        run the shard that measured the row (its reductions are against that shard's baseline
        row: one baseline row per shard and frame count, never pooled), else empty; streams, the
        videos served concurrently in each pass (reductions are against the baseline serving as
        many), with the serving figures: step_ms_median and step_ms_p90 over every streaming
        step of every timed pass (a frame waits for its step: its per-frame latency in this
        stage), and frames_per_s (streams x frames over the median pass time). Every view of a
        run reads this.
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
            for stage in self.stages:
                m = self.measurement(facts.frames, facts.arm, stage, facts.shard, facts.streams)
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
                flop = self.flop_reduction(facts, stage)
                row.update({
                    "reduction_min": r.on_min if r else None, "reduction_median": r.on_median if r else None,
                    "ci_low": r.ci_low if r else None, "ci_high": r.ci_high if r else None, "pairs": r.pairs if r else None,
                    "round_iqr": r.round_iqr if r else None,
                    "flop_reduction": flop,
                    "efficiency": r.on_median / flop if r is not None and flop else None,
                })
                row.update({name: facts.fidelity.get(name) for name in FIDELITY_COLUMNS})
                row["recompute_fraction"] = facts.recompute_fraction
                row["peak_memory_mb"] = m.metadata.get("peak_memory_mb")
                faults, system = facts.page_faults, (facts.host_usage or {}).get("system_ms", [])
                row["page_faults_median"] = float(statistics.median(faults)) if faults else None
                row["system_ms_median"] = float(statistics.median(system)) if system else None
                launches = (facts.launches or {}).get(stage)
                figures = StageLaunches.from_dict(launches) if launches is not None else None
                row["operators_per_frame"] = figures.operators_per_frame if figures is not None else None
                row["launch_verdict"] = figures.verdict if figures is not None else None
                row["shard"] = facts.shard
                row["streams"] = facts.streams
                steps = [t for repeat in m.chunk_ms for t in repeat]
                row["step_ms_median"] = float(statistics.median(steps)) if steps else None
                row["step_ms_p90"] = _p90(steps)
                row["frames_per_s"] = facts.streams * facts.frames / (m.median / 1000.0) if m.n and m.median > 0 else None
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
                                      "ci_high": r.ci_high, "round_iqr": r.round_iqr,
                                      "flop_reduction": self.flop_reduction(facts, stage),
                                      **({"shard": facts.shard} if facts.shard is not None else {}),
                                      **({"streams": facts.streams} if facts.streams != 1 else {})})
        return {
            **copy.deepcopy(self.extra),
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
            raise ResultsError(f"results schema version {version!r} is not supported (this stc-bench reads {readable}); "
                               "read it with the stc-bench version that wrote it")
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
            extra={k: v for k, v in d.items() if k not in DOCUMENT_KEYS},
        )

    def save(self, path: Path) -> None:
        """Write atomically (temp file + rename), so a crash never leaves a torn results.json."""
        write_json_atomically(path, self.to_dict())


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


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path | None:
    """``write(temp)`` into a temp file beside ``path`` (same suffix), then rename it to ``path``,
    so a crash or a full disk never leaves a torn file: on any error the temp file is removed and
    ``path`` keeps its previous content. When ``write`` returns False it had nothing to write:
    ``path`` is left alone and None returned; else ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        if write(Path(tmp)) is False:
            os.unlink(tmp)
            return None
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and reports are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomically(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through ``write_atomically``."""

    def dump(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=True)

    write_atomically(path, dump)


def results_file(path: str | Path) -> Path:
    """The results.json that ``path`` names: the file itself, or the results.json of a run folder."""
    p = Path(path)
    return p / "results.json" if p.is_dir() else p


def load_results(path: str | Path) -> RunResult:
    """Read a results.json, or the results.json inside a run folder, checking its shape first:
    ``ResultsError`` names the file, the first entry that is wrong and what is wrong with it."""
    p = results_file(path)
    if not p.is_file():
        raise ResultsError(f"{path}: no results.json here; pass a results file or a run folder")
    fix = "pass a results.json written by stc-bench, or re-run the benchmark"
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as err:
        raise ResultsError(f"{p}: cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{p}: not an stc-bench results file (not UTF-8 text); {fix}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        what = "empty" if not text.strip() else f"not valid JSON, truncated? line {err.lineno}, column {err.colno}: {err.msg}"
        raise ResultsError(f"{p}: not an stc-bench results file ({what}); {fix}") from None
    if not isinstance(document, dict):
        raise ResultsError(f"{p}: not an stc-bench results file (the top level is {_kind(document)}, "
                           f"not an object); {fix}")
    try:
        version = document.get("schema_version")
        if version in READABLE_VERSIONS and not isinstance(version, bool):
            if version == 1:
                document = upgrade_schema_1(document)
            check_document(document)
        result = RunResult.from_dict(document)
    except ResultsError as err:
        raise ResultsError(f"{p}: {err}") from None
    except _Malformed as err:
        raise ResultsError(f"{p}: not a valid stc-bench results file ({err}); {fix}") from None
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        detail = f"missing {err}" if isinstance(err, KeyError) else str(err)
        raise ResultsError(f"{p}: not a valid stc-bench results file ({detail}); {fix}") from None
    return result


class _Malformed(ValueError):
    """One entry of a results document is wrong; the message names it by its JSON path."""


def _kind(value: Any) -> str:
    """How a JSON value reads in a message: ``a list``, ``the string '4'``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (int, float)):
        return "NaN" if isinstance(value, float) and math.isnan(value) else f"the number {value!r}"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def _field(d: dict, key: str, where: str, kinds: tuple[type, ...], what: str, optional: bool = False) -> Any:
    """``d[key]`` checked to be one of ``kinds``; ``where`` is the JSON path of ``d`` ("" at the top)."""
    path = f"{where}.{key}" if where else key
    if key not in d:
        if optional:
            return None
        raise _Malformed(f"{path} is missing")
    value = d[key]
    if optional and value is None:
        return None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise _Malformed(f"{path} is {_kind(value)}, not {what}")
    return value


def _number(value: Any, where: str, *, integer: bool = False, minimum: float | None = None) -> None:
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise _Malformed(f"{where} is {_kind(value)}, not {'a whole number' if integer else 'a number'}")
    if not math.isfinite(value):
        raise _Malformed(f"{where} is {_kind(value)}, not a finite number")
    if minimum is not None and value < minimum:
        raise _Malformed(f"{where} is {value!r}, below {minimum:g}")


def _arm(d: Any, where: str) -> None:
    from stc_bench.methods import METHOD_MODULES

    if not isinstance(d, dict):
        raise _Malformed(f"{where} is {_kind(d)}, not an object with method and knobs")
    method = _field(d, "method", where, (str,), "a method name")
    if method not in METHOD_MODULES:
        raise _Malformed(f"{where}.method {method!r} is not a method of this stc-bench ({', '.join(METHOD_MODULES)})")
    knobs = _field(d, "knobs", where, (dict,), "an object", optional=True) or {}
    for name, value in knobs.items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            raise _Malformed(f"{where}.knobs.{name} is {_kind(value)}, not a single value")


def check_document(d: dict[str, Any]) -> None:
    """Raise ``_Malformed`` naming the first entry of a schema-2 results document whose shape
    or value stc-bench cannot use (types, missing keys, empty or non-finite samples, unknown
    scales, frameworks and methods); ``ResultsError`` for a config that is not a valid run."""
    from stc_bench.frameworks import FRAMEWORK_MODULES

    config = _field(d, "config", "", (dict,), "an object")
    try:
        bench = BenchConfig.from_dict(config)
    except (ValueError, TypeError) as err:
        raise _Malformed(f"config: {err}") from None
    if bench.framework not in FRAMEWORK_MODULES:
        raise _Malformed(f"config.framework {bench.framework!r} is not one of {', '.join(FRAMEWORK_MODULES)}")
    _field(d, "environment", "", (dict,), "an object")
    run = _field(d, "run", "", (dict,), "an object")
    scale = _field(run, "scale", "run", (str,), "a scale name")
    if scale not in RUN_SCALES:
        raise _Malformed(f"run.scale {scale!r} is not one of {', '.join(RUN_SCALES)}")
    for key in ("scale_reason", "dtype", "weights", "video"):
        _field(run, key, "run", (str,), "a string")
    _field(run, "chunk_frames", "run", (int,), "a whole number", optional=True)
    _field(run, "architecture", "run", (dict,), "an object", optional=True)
    if not all(isinstance(x, str) for x in _field(run, "notes", "run", (list,), "a list", optional=True) or []):
        raise _Malformed("run.notes holds something other than strings")
    for i, f in enumerate(_field(run, "failed_frames", "run", (list,), "a list", optional=True) or []):
        if not isinstance(f, dict):
            raise _Malformed(f"run.failed_frames[{i}] is {_kind(f)}, not an object with frames and error")
        _number(_field(f, "frames", f"run.failed_frames[{i}]", (int,), "a whole number"), f"run.failed_frames[{i}].frames",
                integer=True, minimum=1)
    if not all(isinstance(e, str) for e in _field(d, "errors", "", (list,), "a list of strings", optional=True) or []):
        raise _Malformed("errors holds something other than strings")
    _field(d, "complete", "", (bool,), "true or false", optional=True)
    for i, a in enumerate(_field(d, "arms", "", (list,), "a list")):
        where = f"arms[{i}]"
        if not isinstance(a, dict):
            raise _Malformed(f"{where} is {_kind(a)}, not an object")
        _number(_field(a, "frames", where, (int,), "a whole number"), f"{where}.frames", integer=True, minimum=1)
        _arm(a.get("arm"), f"{where}.arm")
        for stage, value in _field(a, "tokens", where, (dict,), "an object").items():
            _number(value, f"{where}.tokens.{stage}", integer=True, minimum=0)
        for stage, value in _field(a, "macs", where, (dict,), "an object").items():
            if value is not None:
                _number(value, f"{where}.macs.{stage}", minimum=0)
        for name, value in (_field(a, "fidelity", where, (dict,), "an object", optional=True) or {}).items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise _Malformed(f"{where}.fidelity.{name} is {_kind(value)}, not a number")  # NaN: rendered as a dash
        if not all(isinstance(k, str) for k in _field(a, "chunk_kinds", where, (list,), "a list", optional=True) or []):
            raise _Malformed(f"{where}.chunk_kinds holds something other than strings")
        if a.get("recompute_fraction") is not None:
            _number(a["recompute_fraction"], f"{where}.recompute_fraction", minimum=0)
        _field(a, "graphs", where, (dict,), "an object", optional=True)
        if a.get("shard") is not None:
            _number(a["shard"], f"{where}.shard", integer=True, minimum=0)
        if "streams" in a:
            _number(a["streams"], f"{where}.streams", integer=True, minimum=1)
        for stage, figures in (_field(a, "launches", where, (dict,), "an object", optional=True) or {}).items():
            if not isinstance(figures, dict):
                raise _Malformed(f"{where}.launches.{stage} is {_kind(figures)}, not an object")
            for key in ("operators_per_frame", "prequeued_ms", "span_ms", "enqueue_ms", "head_start_ms"):
                if figures.get(key) is not None:
                    _number(figures[key], f"{where}.launches.{stage}.{key}", minimum=0)
        for key, values in (_field(a, "host_usage", where, (dict,), "an object", optional=True) or {}).items():
            if not isinstance(values, list):
                raise _Malformed(f"{where}.host_usage.{key} is {_kind(values)}, not a list of per-stream counts")
            for j, value in enumerate(values):
                _number(value, f"{where}.host_usage.{key}[{j}]")
    for i, m in enumerate(_field(d, "measurements", "", (list,), "a list")):
        where = f"measurements[{i}]"
        if not isinstance(m, dict):
            raise _Malformed(f"{where} is {_kind(m)}, not an object")
        spec = _field(m, "spec", where, (dict,), "an object")
        for key in ("framework", "scale", "device", "dtype", "stage"):
            _field(spec, key, f"{where}.spec", (str,), "a string")
        if spec["framework"] != bench.framework:
            raise _Malformed(f"{where}.spec.framework {spec['framework']!r} is not the run's {bench.framework!r}")
        _number(_field(spec, "frames", f"{where}.spec", (int,), "a whole number"), f"{where}.spec.frames", integer=True, minimum=1)
        _arm(spec.get("arm"), f"{where}.spec.arm")
        if spec.get("shard") is not None:
            _number(spec["shard"], f"{where}.spec.shard", integer=True, minimum=0)
        if "streams" in spec:
            _number(spec["streams"], f"{where}.spec.streams", integer=True, minimum=1)
        times = _field(m, "times_ms", where, (list,), "a list of latencies")
        if not times:
            raise _Malformed(f"{where}.times_ms is empty: a measurement needs at least one sample")
        for j, t in enumerate(times):
            _number(t, f"{where}.times_ms[{j}]", minimum=0)
        chunks = _field(m, "chunk_ms", where, (list,), "a list of lists", optional=True) or []
        if chunks and len(chunks) != len(times):
            raise _Malformed(f"{where}.chunk_ms has {len(chunks)} repeats, times_ms {len(times)}")
        for j, row in enumerate(chunks):
            if not isinstance(row, list) or len(row) != len(chunks[0]):
                raise _Malformed(f"{where}.chunk_ms[{j}] is not a list of as many chunk times as the first repeat's")
            for k, t in enumerate(row):
                _number(t, f"{where}.chunk_ms[{j}][{k}]", minimum=0)
        if m.get("warmup") is not None:
            _number(m["warmup"], f"{where}.warmup", integer=True, minimum=0)
        meta = _field(m, "metadata", where, (dict,), "an object", optional=True) or {}
        if meta.get("peak_memory_mb") is not None:
            _number(meta["peak_memory_mb"], f"{where}.metadata.peak_memory_mb", minimum=0)


def stage_spec(config: BenchConfig, run: dict[str, Any], device_label: str, frames: int, stage: str, arm: Arm) -> StageSpec:
    """The identity of a measurement of this run."""
    return StageSpec(config.framework, run["scale"], device_label, run["dtype"], frames, stage, arm)


def _p90(values: list[float]) -> float | None:
    """The 90th percentile of ``values`` (linear between order statistics); None when empty."""
    if len(values) < 2:
        return float(values[0]) if values else None
    return float(statistics.quantiles(values, n=10, method="inclusive")[-1])


def arm_name(label: str, shard: Any = None, streams: Any = 1) -> str:
    """An arm's name in reports: its label, with its streams where several (``stc r0.25 N2 k64 x4
    streams``) and in a merged run its shard (``baseline (shard 1)``)."""
    name = label if is_missing(streams) or int(streams) == 1 else f"{label} x{int(streams)} streams"
    return name if is_missing(shard) else f"{name} (shard {int(shard)})"


def is_missing(value: Any) -> bool:
    """True for the empty cells of the results table (None or NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
