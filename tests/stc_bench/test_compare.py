"""stc-bench compare: verdicts, gates, exit codes (0 ok, 1 regression, 2 usage, 3 inconclusive)."""

import json
from pathlib import Path

import numpy as np
import pytest

from stc_bench.compare import (
    ReductionDropGate,
    load_expectations,
    parse_reduction_drop_gate,
    parse_reduction_gate,
    parse_slowdown_gate,
)
from stc_bench.errors import BenchUsageError
from stc_bench.results import RunResult

EXPECTATIONS = Path(__file__).resolve().parents[2] / "speed_benchmark" / "gpu_expectations.json"


def synthetic(result: RunResult, n: int = 20, stc_scale: float = 0.6, seed: int = 0, noise: float = 0.01) -> RunResult:
    """A copy of ``result`` whose samples are n draws: baseline ~100 ms, STC ~100*stc_scale ms, relative noise."""
    copy = RunResult.from_dict(result.to_dict())
    rng = np.random.default_rng(seed)
    for m in copy.measurements:
        centre = 100.0 * (stc_scale if m.spec.arm.method == "stc" else 1.0)
        m.times_ms = list(centre * (1 + noise * rng.standard_normal(n)))
        m.chunk_ms = [[t] for t in m.times_ms]
        m.__dict__.pop("_sorted", None)
    return copy


def save(result: RunResult, path):
    path.mkdir(parents=True, exist_ok=True)
    result.save(path / "results.json")
    return str(path)


@pytest.mark.tier1
def test_a_run_against_itself_is_ok(cli, tiny_result, tmp_path):
    run = save(synthetic(tiny_result), tmp_path / "a")
    summary = tmp_path / "summary.md"
    result = cli("compare", run, run, "--expect-reduction", "vit:20%", "--markdown", str(summary))
    assert result.exit_code == 0, result.output
    assert "stc-bench compare: ok" in result.output
    text = summary.read_text()
    assert text.startswith("## stc-bench compare: ✅ ok") and "| 4f stc r0.25 N2 k64 vit median |" in text


def test_a_slower_stc_median_is_a_regression(cli, tiny_result, tmp_path):
    base = save(synthetic(tiny_result, seed=1), tmp_path / "base")
    slower = save(synthetic(tiny_result, stc_scale=0.6 * 1.2, seed=2), tmp_path / "new")
    result = cli("compare", base, slower, "--fail-on", "median:5%")
    assert result.exit_code == 1, result.output
    assert "regression (slower by more than 5%)" in result.output
    assert "4f baseline vit median" in result.output  # the baseline rows are checked too, and pass


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
    new.compared[0].tokens["prefill"] += 1
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
    (["--max-reduction-drop", "vit"], "write STAGE:POINTS"),
    (["--max-reduction-drop", "decode:5"], "NEW has no stage 'decode'"),
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


def on_gpu(result: RunResult, driver: str | None = "550.54.15", torch_version: str | None = "2.5.1+cu124",
           gpu: str = "NVIDIA H100 80GB HBM3") -> RunResult:
    """``result`` as if measured on a CUDA GPU with this driver and torch (None: the key is absent, as in older files)."""
    result.environment.update(device="cuda0", device_name=gpu)
    for key, value in (("driver_version", driver), ("torch", torch_version)):
        result.environment.pop(key, None)
        if value is not None:
            result.environment[key] = value
    return result


def test_driver_major_and_torch_mismatches_are_refused_and_named(cli, tiny_result, tmp_path):
    base = save(on_gpu(synthetic(tiny_result), driver="550.54.15", torch_version="2.5.1"), tmp_path / "b")
    new = save(on_gpu(synthetic(tiny_result), driver="560.35.03", torch_version="2.6.0"), tmp_path / "n")
    refused = cli("compare", base, new)
    assert refused.exit_code == 2, refused.output
    assert ("torch differs: BASE 2.5.1, NEW 2.6.0; driver major differs: BASE 550, NEW 560: latencies are not comparable "
            "(pass --allow-mismatch to compare anyway)") in refused.output
    allowed = cli("compare", base, new, "--allow-mismatch")
    assert allowed.exit_code == 0 and "warning: driver major differs: BASE 550, NEW 560" in allowed.output


def test_another_driver_minor_version_is_comparable(cli, tiny_result, tmp_path):
    base = save(on_gpu(synthetic(tiny_result), driver="550.54.15"), tmp_path / "b")
    new = save(on_gpu(synthetic(tiny_result), driver="550.90.07"), tmp_path / "n")
    result = cli("compare", base, new)
    assert result.exit_code == 0 and "warning" not in result.output


def test_facts_an_older_file_lacks_are_unknown_not_a_mismatch(cli, tiny_result, tmp_path):
    base = save(on_gpu(synthetic(tiny_result), driver=None, torch_version=None), tmp_path / "b")
    new = save(on_gpu(synthetic(tiny_result)), tmp_path / "n")
    result = cli("compare", base, new)
    assert result.exit_code == 0, result.output
    assert "warning: torch not recorded in BASE: not checked" in result.output
    assert "warning: driver major not recorded in BASE: not checked" in result.output


def test_cpu_runs_are_not_asked_for_a_driver(cli, tiny_result, tmp_path):
    run = save(synthetic(tiny_result), tmp_path / "a")
    result = cli("compare", run, run)
    assert result.exit_code == 0 and "driver" not in result.output


@pytest.mark.parametrize("new_scale, points, code, verdict", [
    (0.62, "5", 0, "ok"),                                   # 38% vs 40%: within 5 points
    (0.70, "5", 1, "regression (the whole interval is more than 5 points below BASE's reduction)"),  # 30% vs 40%
    (0.70, "12pp", 0, "ok"),                                # within a 12-point allowance
])
def test_reduction_drop_gate_against_base(cli, tiny_result, tmp_path, new_scale, points, code, verdict):
    base = save(synthetic(tiny_result, seed=1), tmp_path / "b")  # STC 40% faster
    new = save(synthetic(tiny_result, stc_scale=new_scale, seed=2), tmp_path / "n")
    result = cli("compare", base, new, "--fail-on", "median:50%", "--max-reduction-drop", f"vit:{points}")
    assert result.exit_code == code, result.output
    assert "vit reduction vs BASE" in result.output and verdict in result.output


def test_reduction_drop_gate_straddling_or_few_samples_is_inconclusive(cli, tiny_result, tmp_path):
    base = save(synthetic(tiny_result, seed=1), tmp_path / "b")
    noisy = save(synthetic(tiny_result, n=8, stc_scale=0.65, seed=5, noise=0.08), tmp_path / "n")
    straddles = cli("compare", base, noisy, "--max-reduction-drop", "vit:5")
    assert straddles.exit_code == 3 and "the interval straddles BASE's reduction minus 5 points" in straddles.output
    few = save(synthetic(tiny_result, n=3), tmp_path / "few")
    assert "too few samples (n=3 < 5)" in cli("compare", base, few, "--max-reduction-drop", "vit:5").output


def expectations(tmp_path, document) -> str:
    path = tmp_path / "expectations.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def test_expectations_gate_the_entry_for_new_gpu(cli, tiny_result, tmp_path):
    run = save(on_gpu(synthetic(tiny_result)), tmp_path / "a")  # STC 40% faster
    met = expectations(tmp_path, {"_about": "comment", "gpus": {"NVIDIA H100 80GB HBM3": {"rekv": ["vit:35%"]}}})
    assert cli("compare", run, run, "--expectations", met).exit_code == 0
    missed = expectations(tmp_path, {"gpus": {"NVIDIA H100 80GB HBM3": {"rekv": ["vit:35%", "prefill:60%"]}}})
    result = cli("compare", run, run, "--expectations", missed)
    assert result.exit_code == 1 and "prefill reduction" in result.output and "vs required 60%" in result.output


def test_expectations_without_an_entry_for_this_gpu_set_no_gate(cli, tiny_result, tmp_path):
    run = save(on_gpu(synthetic(tiny_result), gpu="NVIDIA A100-SXM4-80GB"), tmp_path / "a")
    file = expectations(tmp_path, {"gpus": {"NVIDIA H100 80GB HBM3": {"rekv": ["vit:90%"]}}})
    result = cli("compare", run, run, "--expectations", file)
    assert result.exit_code == 0, result.output
    assert "has no expectations for rekv on 'NVIDIA A100-SXM4-80GB': no absolute reduction gate" in result.output


@pytest.mark.parametrize("document, message", [
    ("{", "not valid JSON (line 1"),
    ({"gpu": {}}, "unknown key 'gpu'; comments start with _"),
    ({"gpus": []}, 'write {"gpus": {"<GPU model>": {"<framework>": ["STAGE:PCT", ...]}}}'),
    ({"gpus": {"X": ["vit:5%"]}}, '"X" must map framework names to lists'),
    ({"gpus": {"X": {"rekv": "vit:5%"}}}, '(X, rekv): write a list of "STAGE:PCT" strings'),
    ({"gpus": {"X": {"rekv": ["vit:fast"]}}}, "(X, rekv) 'vit:fast': 'fast' is not a percentage"),
    ({"gpus": {"NVIDIA H100 80GB HBM3": {"rekv": ["decode:5%"]}}}, "(NVIDIA H100 80GB HBM3, rekv) decode: NEW has no stage 'decode'"),
])
def test_bad_expectations_files_are_usage_errors(cli, tiny_result, tmp_path, document, message):
    run = save(on_gpu(synthetic(tiny_result)), tmp_path / "a")
    result = cli("compare", run, run, "--expectations", expectations(tmp_path, document))
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_missing_expectations_file_is_a_usage_error(cli, tiny_result, tmp_path):
    run = save(synthetic(tiny_result), tmp_path / "a")
    result = cli("compare", run, run, "--expectations", str(tmp_path / "none.json"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_the_checked_in_expectations_file_is_valid():
    table = load_expectations(EXPECTATIONS)
    assert all(gates and all(g.minimum > 0 for g in gates) for frameworks in table.values() for gates in frameworks.values())


def test_reduction_drop_parsing():
    assert parse_reduction_drop_gate("prefill:5").allowance == pytest.approx(0.05)
    assert parse_reduction_drop_gate("vit:2.5pp") == ReductionDropGate("vit", pytest.approx(0.025))
    for bad in ("vit", "vit:-5", "vit:five", ":5"):
        with pytest.raises(BenchUsageError, match="write STAGE:POINTS"):
            parse_reduction_drop_gate(bad)
