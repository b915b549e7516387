"""Compare two runs (BASE, NEW) and gate on regressions, for CI.

For every stage, arm and point present in both runs: the medians, the relative change
``new / base - 1`` with a bootstrap 95% interval (the runs are independent, so each is
resampled on its own), and a verdict against ``--fail-on`` gates. ``--max-reduction-drop``
gates STC's reduction in NEW against the same reduction in BASE (same GPU, previous run), and
``--expect-reduction`` (or the entry for NEW's GPU in an ``--expectations`` file) against an
absolute bar. Token counts must match exactly. Verdicts: ok, regression, inconclusive (the
interval straddles the gate or too few samples). A (frames, arm) pair of BASE that NEW did not
measure makes the verdict at least inconclusive (a regression with ``require_all``).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stc_bench.errors import BenchUsageError
from stc_bench.measurement import BOOTSTRAP_RESAMPLES, Measurement, Reduction
from stc_bench.results import ArmResult, RunResult, arm_name

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
    """``STAGE:PCT``: STC's reduction of STAGE in NEW must be at least PCT (interval lower end).
    ``origin`` names where the gate came from, for error messages."""

    stage: str
    minimum: float
    origin: str = "--expect-reduction"


@dataclass(frozen=True)
class ReductionDropGate:
    """``STAGE:POINTS``: STC's reduction of STAGE in NEW may fall at most ``allowance`` (a fraction:
    5 points = 0.05) below the same reduction in BASE.

    With BASE's median reduction ``b`` and NEW's paired 95% interval ``[low, high]``, the floor is
    ``b - allowance``: regression when ``high < floor`` (NEW is surely below it), ok when
    ``low >= floor``, inconclusive when the interval straddles the floor or either run has fewer
    than ``MIN_SAMPLES`` pairs. BASE's median is taken as the reference value: its own
    uncertainty is covered by the allowance.
    """

    stage: str
    allowance: float


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


def parse_reduction_gate(spec: str, origin: str = "--expect-reduction") -> ReductionGate:
    """Parse ``vit:20%``; ``origin`` (the option or file it came from) prefixes error messages."""
    stage, sep, pct = spec.partition(":")
    if not sep or not stage:
        raise BenchUsageError(f"{origin} {spec!r}: write STAGE:PCT, e.g. vit:20%")
    try:
        minimum = _percent(pct, spec)
    except BenchUsageError as err:
        raise BenchUsageError(f"{origin} {err}") from None
    return ReductionGate(stage, minimum, origin)


def parse_reduction_drop_gate(spec: str) -> ReductionDropGate:
    """Parse ``prefill:5`` (also ``prefill:5pp`` or ``prefill:5%``): at most 5 percentage points below BASE."""
    stage, sep, points = spec.partition(":")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:pp|%)?", points.strip())
    if not sep or not stage or not match:
        raise BenchUsageError(f"--max-reduction-drop {spec!r}: write STAGE:POINTS with POINTS >= 0 percentage points, "
                              "e.g. prefill:5")
    return ReductionDropGate(stage, float(match.group(1)) / 100.0)


class ExpectationsError(BenchUsageError):
    """The ``--expectations`` file cannot be used; the message says what to fix."""


def load_expectations(path: Path) -> dict[str, dict[str, list[ReductionGate]]]:
    """Read a per-GPU expectations file: ``{"gpus": {GPU model: {framework: ["STAGE:PCT", ...]}}}``.

    The GPU model is the ``device_name`` a result records (``torch.cuda.get_device_name``, e.g.
    ``"NVIDIA H100 80GB HBM3"``), matched exactly. Top-level keys starting with ``_`` are
    comments. JSON, not TOML, because ``tomllib`` needs Python 3.11 and stc supports 3.10.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ExpectationsError(f"--expectations {path}: cannot read ({err.strerror}); pass an existing file") from None
    except json.JSONDecodeError as err:
        raise ExpectationsError(f"--expectations {path}: not valid JSON (line {err.lineno}: {err.msg}); fix the file") from None
    unknown = [k for k in document if k != "gpus" and not k.startswith("_")] if isinstance(document, dict) else []
    if not isinstance(document, dict) or not isinstance(document.get("gpus"), dict) or unknown:
        extra = f" (unknown key {unknown[0]!r}; comments start with _)" if unknown else ""
        raise ExpectationsError(f'--expectations {path}: write {{"gpus": {{"<GPU model>": {{"<framework>": '
                                f'["STAGE:PCT", ...]}}}}}}{extra}')
    table: dict[str, dict[str, list[ReductionGate]]] = {}
    for gpu, frameworks in document["gpus"].items():
        if not isinstance(frameworks, dict):
            raise ExpectationsError(f'--expectations {path}: "{gpu}" must map framework names to lists, e.g. {{"rekv": ["vit:15%"]}}')
        table[gpu] = {}
        for framework, specs in frameworks.items():
            origin = f"--expectations {path} ({gpu}, {framework})"
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise ExpectationsError(f'{origin}: write a list of "STAGE:PCT" strings, e.g. ["vit:15%"]')
            table[gpu][framework] = [parse_reduction_gate(s, origin) for s in specs]
    return table


def expected_reductions(path: Path, new: RunResult) -> tuple[list[ReductionGate], str | None]:
    """The reduction gates an expectations file sets for NEW's GPU model and framework, and a note
    to print when it sets none (absolute gates are GPU-specific: no entry, no gate)."""
    table = load_expectations(path)
    gpu, framework = new.environment.get("device_name"), new.config.framework
    gates = table.get(gpu, {}).get(framework) if gpu is not None else None
    if gates is None:
        return [], f"{path} has no expectations for {framework} on {gpu!r}: no absolute reduction gate"
    return gates, None


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


def driver_major(version: str | None) -> str | None:
    """``"550.54.15"`` -> ``"550"``; None stays None."""
    return None if version is None else str(version).split(".")[0]


def latency_facts(result: RunResult) -> dict[str, str | None]:
    """What must agree for latencies to be comparable: device (the GPU or CPU model), scale, dtype,
    torch and, for CUDA runs, the driver's major version (``stc_bench.merge`` checks them too)."""
    env = result.environment
    facts = {"device": env.get("device_name"), "scale": result.run.get("scale"), "dtype": result.run.get("dtype"),
             "torch": env.get("torch")}
    if str(env.get("device", "")).startswith("cuda"):
        facts["driver major"] = driver_major(env.get("driver_version"))
    return facts


def check_compatible(base: RunResult, new: RunResult, allow_mismatch: bool) -> list[str]:
    """Refuse runs that should not be compared: another framework always; another device, scale,
    dtype, torch or driver major version unless ``allow_mismatch``. Returns the warnings to print:
    the mismatches allowed, and facts one run did not record (files from an older stc-bench, or
    nvidia-smi unavailable), which are unknown, not a mismatch."""
    if base.config.framework != new.config.framework:
        raise BenchUsageError(f"BASE is {base.config.framework}, NEW is {new.config.framework}: compare runs of one framework")
    base_facts, new_facts = latency_facts(base), latency_facts(new)
    problems, unknown = [], []
    for what in dict.fromkeys([*base_facts, *new_facts]):
        a, b = base_facts.get(what), new_facts.get(what)
        if a is None or b is None:
            missing = " and ".join(side for side, value in (("BASE", a), ("NEW", b)) if value is None)
            unknown.append(f"{what} not recorded in {missing}: not checked")
        elif a != b:
            problems.append(f"{what} differs: BASE {a}, NEW {b}")
    if problems and not allow_mismatch:
        raise BenchUsageError("; ".join(problems) + ": latencies are not comparable (pass --allow-mismatch to compare anyway)")
    return problems + unknown


def _pct(x: float) -> str:
    return f"{x:+.1%}"


def compare_runs(base: RunResult, new: RunResult, slowdowns: list[SlowdownGate],
                 reductions: list[ReductionGate], drops: list[ReductionDropGate] = (), require_all: bool = False) -> list[Check]:
    """Every check of NEW against BASE and against the reduction gates, then the points of BASE
    that NEW lacks (``_missing_points``)."""
    for gate in slowdowns:
        if gate.stage is not None and gate.stage not in new.stages:
            raise BenchUsageError(f"--fail-on {gate.stage}:...: NEW has no stage {gate.stage!r} (stages: {', '.join(new.stages)})")
    for gate in drops:
        if gate.stage not in new.stages:
            raise BenchUsageError(f"--max-reduction-drop {gate.stage}:...: NEW has no stage {gate.stage!r} "
                                  f"(stages: {', '.join(new.stages)})")
    checks: list[Check] = []
    base_arms = {_point(a): a for a in base.arms}
    for facts in new.arms:
        where = f"{facts.frames}f {arm_name(facts.arm.label, facts.shard, facts.streams)}"
        old = _counterpart(base_arms, facts)
        if old is not None:
            for stage, count in facts.tokens.items():
                before = old.tokens.get(stage)
                if before != count:
                    checks.append(Check(f"{where} {stage} tokens", f"{before} -> {count}", Verdict.REGRESSION,
                                        "token counts must match exactly"))
            for stage in new.stages:
                # in a merged run, each arm's own shard (stc-bench merge keeps one baseline per shard)
                b = base.measurement(facts.frames, facts.arm, stage, old.shard, old.streams)
                n = new.measurement(facts.frames, facts.arm, stage, facts.shard, facts.streams)
                if b is None or n is None:
                    continue
                for gate in slowdowns:
                    if gate.stage in (None, stage):
                        checks.append(_slowdown_check(f"{where} {stage} {gate.stat}", b, n, gate))
            for gate in drops if not facts.arm.is_baseline else ():
                check = _drop_check(f"{where} {gate.stage} reduction vs BASE", base.reduction(old, gate.stage),
                                    new.reduction(facts, gate.stage), gate)
                if check is not None:
                    checks.append(check)
        for gate in reductions if facts.arm.method == "stc" else ():
            r = new.reduction(facts, gate.stage)
            if r is None:
                raise BenchUsageError(f"{gate.origin} {gate.stage}: NEW has no stage {gate.stage!r} "
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
    if not any(_counterpart(base_arms, a) for a in new.compared) and (slowdowns or drops):
        checks.append(Check("arms", "no (frames, arm) of NEW but the baseline is in BASE", Verdict.INCONCLUSIVE,
                            "nothing to compare: run both with the same --frames, --arms and knobs"))
    return checks + _missing_points(base, new, require_all)


def _point(facts: ArmResult) -> tuple:
    """What makes two runs' arms the same point: frame count, arm, streams served at once and, for
    a baseline of a merged run, its shard (a merged run keeps one baseline per shard; any other
    point was measured by exactly one shard)."""
    return facts.frames, facts.arm, facts.streams, facts.shard if facts.arm.is_baseline else None


def _counterpart(arms: dict[tuple, ArmResult], facts: ArmResult) -> ArmResult | None:
    """The point of the other run (``arms``, keyed by ``_point``) that ``facts`` is compared with:
    the same shard's baseline where both runs are merged; where one is not, its one baseline of
    the cell stands for every shard's (compared with the first shard's)."""
    point = _point(facts)
    if point in arms:
        return arms[point]
    return next((a for key, a in arms.items() if key[:3] == point[:3] and None in (key[3], point[3])), None)


def _missing_points(base: RunResult, new: RunResult, require_all: bool) -> list[Check]:
    """One check naming the (frames, arm) pairs BASE measured and NEW did not: NEW cannot pass a
    gate on points it lacks, so the verdict is at least inconclusive (a regression with ``require_all``)."""
    have = {_point(a): a for a in new.arms}
    missing = [a for a in base.arms if _counterpart(have, a) is None]
    if not missing:
        return []
    names = ", ".join(f"{a.frames}f {arm_name(a.arm.label, a.shard, a.streams)}" for a in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    reason = "NEW did not measure them: run it with BASE's --frames, --arms and knobs"
    if not require_all:
        reason += " (--require-all makes this a regression)"
    return [Check("points of BASE missing in NEW", f"{len(missing)} of {len(base.arms)}: {names}",
                  Verdict.REGRESSION if require_all else Verdict.INCONCLUSIVE, reason)]


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


def _drop_check(subject: str, base: Reduction | None, new: Reduction | None, gate: ReductionDropGate) -> Check | None:
    """NEW's reduction against BASE's minus the allowance (see ``ReductionDropGate``); None when either lacks the stage."""
    if base is None or new is None:
        return None
    floor = base.on_median - gate.allowance
    detail = (f"STC reduction {_pct(new.on_median)} [{_pct(new.ci_low)}, {_pct(new.ci_high)}] vs BASE {_pct(base.on_median)} "
              f"minus {gate.allowance * 100:g} points: floor {_pct(floor)}")
    pairs = min(base.pairs, new.pairs)
    if pairs < MIN_SAMPLES:
        return Check(subject, detail, Verdict.INCONCLUSIVE, f"too few samples (n={pairs} < {MIN_SAMPLES})")
    if new.ci_high < floor:
        return Check(subject, detail, Verdict.REGRESSION, f"the whole interval is more than {gate.allowance * 100:g} points "
                                                          "below BASE's reduction")
    if new.ci_low >= floor:
        return Check(subject, detail, Verdict.OK)
    return Check(subject, detail, Verdict.INCONCLUSIVE, f"the interval straddles BASE's reduction minus {gate.allowance * 100:g} points")


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
