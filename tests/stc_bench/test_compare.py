"""stc-bench compare: verdicts, gates, exit codes (0 ok, 1 regression, 2 usage, 3 inconclusive)."""

import numpy as np
import pytest

from stc_bench.compare import parse_reduction_gate, parse_slowdown_gate
from stc_bench.results import RunResult


def synthetic(result: RunResult, n: int = 20, stc_scale: float = 0.6, seed: int = 0, noise: float = 0.01) -> RunResult:
    """A copy of ``result`` whose samples are n draws: baseline ~100 ms, STC ~100*stc_scale ms, relative noise."""
    copy = RunResult.from_dict(result.to_dict())
    rng = np.random.default_rng(seed)
    for m in copy.measurements:
        centre = 100.0 * (stc_scale if m.spec.arm == "stc" else 1.0)
        m.times_ms = list(centre * (1 + noise * rng.standard_normal(n)))
        m.chunk_ms = [[t] for t in m.times_ms]
        m.__dict__.pop("_sorted", None)
    return copy


def save(result: RunResult, path):
    path.mkdir(parents=True, exist_ok=True)
    result.save(path / "results.json")
    return str(path)


def test_a_run_against_itself_is_ok(cli, tiny_result, tmp_path):
    run = save(synthetic(tiny_result), tmp_path / "a")
    summary = tmp_path / "summary.md"
    result = cli("compare", run, run, "--expect-reduction", "vit:20%", "--markdown", str(summary))
    assert result.exit_code == 0, result.output
    assert "stc-bench compare: ok" in result.output
    text = summary.read_text()
    assert text.startswith("## stc-bench compare: ✅ ok") and "| 4f r0.25 N2 k64 vit/stc median |" in text


def test_a_slower_stc_median_is_a_regression(cli, tiny_result, tmp_path):
    base = save(synthetic(tiny_result, seed=1), tmp_path / "base")
    slower = save(synthetic(tiny_result, stc_scale=0.6 * 1.2, seed=2), tmp_path / "new")
    result = cli("compare", base, slower, "--fail-on", "median:5%")
    assert result.exit_code == 1, result.output
    assert "regression (slower by more than 5%)" in result.output
    assert "vit/baseline median" in result.output  # the baseline rows are checked too, and pass


def test_too_few_samples_is_inconclusive(cli, tiny_result, tmp_path):
    few = save(synthetic(tiny_result, n=3), tmp_path / "few")
    result = cli("compare", few, few)
    assert result.exit_code == 3, result.output
    assert "too few samples (n=3 < 5)" in result.output


def test_noisy_runs_straddling_the_limit_are_inconclusive(cli, tiny_result, tmp_path):
    base = synthetic(tiny_result, n=8, seed=3, noise=0.05)
    new = synthetic(tiny_result, n=8, seed=4, noise=0.05, stc_scale=0.6 * 1.05)
    result = cli("compare", save(base, tmp_path / "b"), save(new, tmp_path / "n"), "--fail-on", "vit:median:5%")
    assert result.exit_code == 3, result.output
    assert "the interval straddles the 5% limit" in result.output


def test_expected_reduction_gate(cli, tiny_result, tmp_path):
    run = save(synthetic(tiny_result), tmp_path / "a")  # STC is 40% faster
    assert cli("compare", run, run, "--expect-reduction", "vit:35%").exit_code == 0
    failed = cli("compare", run, run, "--expect-reduction", "prefill:60%")
    assert failed.exit_code == 1 and "the whole interval is below the required reduction" in failed.output


def test_token_counts_are_gated_exactly(cli, tiny_result, tmp_path):
    base = synthetic(tiny_result)
    new = synthetic(tiny_result)
    new.points[0].tokens["stc"]["prefill"] += 1
    result = cli("compare", save(base, tmp_path / "b"), save(new, tmp_path / "n"))
    assert result.exit_code == 1 and "token counts must match exactly" in result.output


def test_different_devices_are_refused_unless_allowed(cli, tiny_result, tmp_path):
    base = synthetic(tiny_result)
    new = synthetic(tiny_result)
    new.environment["device_name"] = "NVIDIA H100"
    b, n = save(base, tmp_path / "b"), save(new, tmp_path / "n")
    refused = cli("compare", b, n)
    assert refused.exit_code == 2 and "device differs" in refused.output and "--allow-mismatch" in refused.output
    allowed = cli("compare", b, n, "--allow-mismatch")
    assert allowed.exit_code == 0 and "warning: device differs" in allowed.output


@pytest.mark.parametrize("args, message", [
    (["--fail-on", "p99:5%"], "STAT must be median or min"),
    (["--fail-on", "median:fast"], "'fast' is not a percentage"),
    (["--expect-reduction", "vit"], "write STAGE:PCT, e.g. vit:20%"),
    (["--expect-reduction", "decode:10%"], "NEW has no stage 'decode'"),
    (["--fail-on", "stc:median:5%"], "NEW has no stage 'stc'"),
])
def test_bad_gates_are_usage_errors(cli, tiny_result, tmp_path, args, message):
    run = save(synthetic(tiny_result), tmp_path / "a")
    result = cli("compare", run, run, *args)
    assert result.exit_code == 2 and message in result.output


def test_gate_parsing():
    assert parse_slowdown_gate("median:5%").limit == pytest.approx(0.05)
    gate = parse_slowdown_gate("prefill:min:10")
    assert (gate.stage, gate.stat, gate.limit) == ("prefill", "min", pytest.approx(0.10))
    assert parse_reduction_gate("vit:20%").minimum == pytest.approx(0.20)
