"""Compare two runs (BASE, NEW) and gate on regressions, for CI.

For every stage, arm and point present in both runs: the medians, the relative change
``new / base - 1`` with a bootstrap 95% interval (the runs are independent, so each is
resampled on its own), and a verdict against ``--fail-on`` gates. ``--expect-reduction``
gates STC's own reduction inside NEW (the lower end of its paired interval must clear the
bar). Token counts must match exactly. Verdicts: ok, regression, inconclusive (the interval
straddles the gate or too few samples).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import numpy as np

from stc_bench.errors import BenchUsageError
from stc_bench.measurement import BOOTSTRAP_RESAMPLES, Measurement
from stc_bench.results import RunResult

MIN_SAMPLES = 5
"""Fewer samples than this on either side make a latency verdict inconclusive."""


class Verdict(str, enum.Enum):
    """Outcome of one check; the exit code of ``compare`` is the worst of them."""

    OK = "ok"
    INCONCLUSIVE = "inconclusive"
    REGRESSION = "regression"


EXIT_CODES = {Verdict.OK: 0, Verdict.REGRESSION: 1, Verdict.INCONCLUSIVE: 3}


@dataclass(frozen=True)
class SlowdownGate:
    """``[STAGE:]STAT:PCT``: fail when STAT (median or min) of a latency grows by more than PCT."""

    stage: str | None
    stat: str
    limit: float


@dataclass(frozen=True)
class ReductionGate:
    """``STAGE:PCT``: STC's reduction of STAGE in NEW must be at least PCT (interval lower end)."""

    stage: str
    minimum: float


def _percent(text: str, spec: str) -> float:
    match = re.fullmatch(r"(-?\d+(?:\.\d+)?)%?", text.strip())
    if not match:
        raise BenchUsageError(f"{spec!r}: {text!r} is not a percentage; write e.g. 5%")
    return float(match.group(1)) / 100.0


def parse_slowdown_gate(spec: str) -> SlowdownGate:
    """Parse ``median:5%``, ``min:10%`` or ``prefill:median:5%``."""
    parts = spec.split(":")
    if len(parts) == 2:
        stage, (stat, pct) = None, parts
    elif len(parts) == 3:
        stage, stat, pct = parts
    else:
        raise BenchUsageError(f"--fail-on {spec!r}: write [STAGE:]STAT:PCT, e.g. median:5% or prefill:median:5%")
    if stat not in ("median", "min"):
        raise BenchUsageError(f"--fail-on {spec!r}: STAT must be median or min")
    return SlowdownGate(stage, stat, _percent(pct, spec))


def parse_reduction_gate(spec: str) -> ReductionGate:
    """Parse ``vit:20%``."""
    stage, sep, pct = spec.partition(":")
    if not sep or not stage:
        raise BenchUsageError(f"--expect-reduction {spec!r}: write STAGE:PCT, e.g. vit:20%")
    return ReductionGate(stage, _percent(pct, spec))


@dataclass(frozen=True)
class Check:
    """One line of the comparison: what was checked, the numbers, and the verdict."""

    subject: str
    detail: str
    verdict: Verdict
    reason: str = ""


def relative_change(base: Measurement, new: Measurement, stat: str, seed: int = 0) -> tuple[float, float, float]:
    """``new / base - 1`` of ``stat`` with an unpaired bootstrap 95% interval (min: no interval)."""
    b, n = np.asarray(base.times_ms, dtype=float), np.asarray(new.times_ms, dtype=float)
    if stat == "min":
        change = float(n.min() / b.min() - 1)
        return change, change, change
    change = float(np.median(n) / np.median(b) - 1)
    rng = np.random.default_rng(seed)
    rb = np.median(b[rng.integers(0, b.size, (BOOTSTRAP_RESAMPLES, b.size))], axis=1)
    rn = np.median(n[rng.integers(0, n.size, (BOOTSTRAP_RESAMPLES, n.size))], axis=1)
    low, high = np.percentile(rn / rb - 1, [2.5, 97.5])
    return change, float(low), float(high)


def check_compatible(base: RunResult, new: RunResult, allow_mismatch: bool) -> list[str]:
    """Reasons the runs should not be compared (framework always; device and scale unless allowed)."""
    problems = []
    if base.config.framework != new.config.framework:
        raise BenchUsageError(f"BASE is {base.config.framework}, NEW is {new.config.framework}: compare runs of one framework")
    for what, a, b in (("device", base.environment.get("device_name"), new.environment.get("device_name")),
                       ("scale", base.run.get("scale"), new.run.get("scale")),
                       ("dtype", base.run.get("dtype"), new.run.get("dtype"))):
        if a != b:
            problems.append(f"{what} differs: BASE {a}, NEW {b}")
    if problems and not allow_mismatch:
        raise BenchUsageError("; ".join(problems) + ": latencies are not comparable (pass --allow-mismatch to compare anyway)")
    return problems


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def compare_runs(base: RunResult, new: RunResult, slowdowns: list[SlowdownGate],
                 reductions: list[ReductionGate]) -> list[Check]:
    """Every check of NEW against BASE and against the reduction gates."""
    for gate in slowdowns:
        if gate.stage is not None and gate.stage not in new.stages:
            raise BenchUsageError(f"--fail-on {gate.stage}:...: NEW has no stage {gate.stage!r} (stages: {', '.join(new.stages)})")
    checks: list[Check] = []
    base_points = {(p.frames, p.point): p for p in base.points}
    for p in new.points:
        where = f"{p.frames}f {p.point.label}"
        old = base_points.get((p.frames, p.point))
        if old is not None:
            for arm in ("baseline", "stc"):
                for stage, count in p.tokens[arm].items():
                    before = old.tokens[arm].get(stage)
                    if before != count:
                        checks.append(Check(f"{where} {stage}/{arm} tokens", f"{before} -> {count}", Verdict.REGRESSION,
                                            "token counts must match exactly"))
            for stage in new.stages:
                for arm, get in (("baseline", lambda r: r.baseline(p.frames, stage)),
                                 ("stc", lambda r: r.stc(p.frames, p.point, stage))):
                    b, n = get(base), get(new)
                    if b is None or n is None:
                        continue
                    for gate in slowdowns:
                        if gate.stage not in (None, stage):
                            continue
                        checks.append(_slowdown_check(f"{where} {stage}/{arm} {gate.stat}", b, n, gate))
        for gate in reductions:
            r = new.reduction(p, gate.stage)
            if r is None:
                raise BenchUsageError(f"--expect-reduction {gate.stage}: NEW has no stage {gate.stage!r} "
                                      f"(stages: {', '.join(new.stages)})")
            detail = f"STC reduction {_pct(r.on_median)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}] vs required {gate.minimum:.0%}"
            if r.pairs < MIN_SAMPLES:
                verdict, reason = Verdict.INCONCLUSIVE, f"too few samples (n={r.pairs} < {MIN_SAMPLES})"
            elif r.ci_low >= gate.minimum:
                verdict, reason = Verdict.OK, ""
            elif r.ci_high < gate.minimum:
                verdict, reason = Verdict.REGRESSION, "the whole interval is below the required reduction"
            else:
                verdict, reason = Verdict.INCONCLUSIVE, "the interval straddles the required reduction"
            checks.append(Check(f"{where} {gate.stage} reduction", detail, verdict, reason))
    if not any(base_points.get((p.frames, p.point)) for p in new.points) and slowdowns:
        checks.append(Check("points", "no (frames, STC point) of NEW is in BASE", Verdict.INCONCLUSIVE,
                            "nothing to compare: run both with the same --frames/--ratio/--interval/--tokens-per-frame"))
    return checks


def _slowdown_check(subject: str, base: Measurement, new: Measurement, gate: SlowdownGate) -> Check:
    change, low, high = relative_change(base, new, gate.stat)
    old_v, new_v = (base.median, new.median) if gate.stat == "median" else (base.min, new.min)
    detail = f"{old_v:.2f} -> {new_v:.2f} ms, change {_pct(change)}"
    if gate.stat == "median":
        detail += f" [{_pct(low)}, {_pct(high)}]"
    if min(base.n, new.n) < MIN_SAMPLES:
        return Check(subject, detail, Verdict.INCONCLUSIVE, f"too few samples (n={min(base.n, new.n)} < {MIN_SAMPLES})")
    if low > gate.limit:
        return Check(subject, detail, Verdict.REGRESSION, f"slower by more than {gate.limit:.0%}")
    if high <= gate.limit:
        return Check(subject, detail, Verdict.OK)
    return Check(subject, detail, Verdict.INCONCLUSIVE, f"the interval straddles the {gate.limit:.0%} limit")


def overall(checks: list[Check]) -> Verdict:
    """The worst verdict: regression, then inconclusive, then ok."""
    verdicts = {c.verdict for c in checks}
    for v in (Verdict.REGRESSION, Verdict.INCONCLUSIVE):
        if v in verdicts:
            return v
    return Verdict.OK


def render_markdown(base_name: str, new_name: str, checks: list[Check], warnings: list[str]) -> str:
    """A Markdown summary fit for a CI job summary."""
    verdict = overall(checks)
    icon = {Verdict.OK: "✅", Verdict.REGRESSION: "❌", Verdict.INCONCLUSIVE: "⚠️"}[verdict]
    lines = [f"## stc-bench compare: {icon} {verdict.value}", "", f"BASE `{base_name}` → NEW `{new_name}`", ""]
    lines += [f"> {w}" for w in warnings]
    lines += ["| check | numbers | verdict |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.subject} | {c.detail} | {c.verdict.value}{' — ' + c.reason if c.reason else ''} |")
    return "\n".join(lines) + "\n"
