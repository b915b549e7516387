"""Results schema round trip, CSV interface, and re-rendering a report from the JSON alone."""

import json
from pathlib import Path

import pandas as pd
import pytest

from stc_bench.methods import get_method
from stc_bench.report import write_report
from stc_bench.report.tables import IDENTITY_COLUMNS, REDUCTION_COLUMNS, STAT_COLUMNS
from stc_bench.results import ResultsError, RunResult, load_results

V1_FILE = Path(__file__).parent / "data" / "results_v1_rekv_tiny.json"
"""A schema-1 run folder's results.json, written by stc-bench before arms were methods (commit d20012c)."""


def test_run_measures_every_stage_and_arm(tiny_result):
    specs = {(m.spec.stage, m.spec.arm.label) for m in tiny_result.measurements}
    assert specs == {(s, a) for s in ("vit", "compress", "prefill") for a in ("baseline", "stc r0.25 N2 k64")}
    assert all(m.n == 3 and m.warmup == 1 and len(m.chunk_ms) == 3 for m in tiny_result.measurements)
    base, arm = tiny_result.arms
    assert base.arm.is_baseline and base.tokens == {"vit": 2916, "compress": 784, "prefill": 784} and base.fidelity == {}
    assert arm.tokens == {"vit": 2916, "compress": 256, "prefill": 256}
    assert arm.chunk_kinds == ["refresh", "selective", "refresh", "selective"]
    assert arm.recompute_fraction == pytest.approx((2 * 729 + 2 * 182) / (4 * 729))
    assert 0.9 < arm.fidelity["vit_cosine_mean"] <= 1.0 and arm.fidelity["logits_kl_mean"] >= 0
    assert tiny_result.complete and tiny_result.run["weights"] == "random"


def test_the_results_table_has_one_row_per_frame_count_arm_and_stage(tiny_result):
    table = tiny_result.table()
    assert list(table.arm) == ["baseline"] * 3 + ["stc r0.25 N2 k64"] * 3
    assert list(table.stage) == ["vit", "compress", "prefill"] * 2
    base, stc_rows = table[table.method == "baseline"], table[table.method == "stc"]
    assert base.reduction_median.isna().all() and stc_rows.reduction_median.notna().all()
    vit = stc_rows[stc_rows.stage == "vit"].iloc[0]
    assert vit.efficiency == pytest.approx(vit.reduction_median / vit.flop_reduction)
    assert vit.reduction_median == pytest.approx(1 - vit.median_ms / base[base.stage == "vit"].iloc[0].median_ms)
    assert (vit.ratio, vit.interval, vit.tokens_per_frame) == (0.25, 2, 64)


def test_json_round_trip(tiny_result, tmp_path):
    tiny_result.save(tmp_path / "results.json")
    again = load_results(tmp_path)
    assert again.to_dict() == tiny_result.to_dict()
    assert json.loads((tmp_path / "results.json").read_text())["schema_version"] == 2


def test_report_files_and_csv_columns(tiny_result, tmp_path):
    written = {p.name for p in write_report(tiny_result, tmp_path)}
    assert written == {"results.json", "samples.csv", "summary.csv", "reductions.csv", "report.md",
                       "latency.png", "per_frame_vit.png"}
    knobs = [k.name for k in get_method("stc").knobs]  # ratio, interval, tokens_per_frame, metric, ...
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == IDENTITY_COLUMNS + knobs + ["stage"] + STAT_COLUMNS and len(summary) == 6
    reductions = pd.read_csv(tmp_path / "reductions.csv")
    assert list(reductions.columns) == IDENTITY_COLUMNS + knobs + ["stage"] + REDUCTION_COLUMNS
    assert list(reductions.stage) == ["vit", "compress", "prefill"]
    vit = reductions[reductions.stage == "vit"].iloc[0]
    assert vit.efficiency == pytest.approx(vit.reduction_median / vit.flop_reduction)
    assert len(pd.read_csv(tmp_path / "samples.csv")) == 6 * 3
    report = (tmp_path / "report.md").read_text()
    assert "![latency.png](latency.png)" in report and "random" in report and "## Caveats" in report


def test_a_schema_1_folder_still_renders_and_compares(tmp_path, cli):
    """Run folders written before arms were methods read as a baseline arm and one stc arm."""
    old = load_results(V1_FILE)
    assert [a.arm.label for a in old.arms] == ["baseline", "stc r0.25 N2 k64"]
    assert old.arms[1].arm.knob("metric") == "cosine" and old.arms[0].tokens["compress"] == 2 * 196
    table = old.table()
    assert len(table) == 6 and table[table.method == "stc"].reduction_median.notna().all()
    before = V1_FILE.read_bytes()
    folder = tmp_path / "rendered"
    result = cli("report", str(V1_FILE), "--out", str(folder))
    assert result.exit_code == 0, result.output
    assert (folder / "report.md").is_file() and "stc r0.25 N2 k64" in result.output
    assert V1_FILE.read_bytes() == before
    compared = cli("compare", str(V1_FILE), str(V1_FILE), "--fail-on", "median:50%")
    assert compared.exit_code in (0, 3), compared.output  # n=2 samples: inconclusive is the honest answer


def test_rerendering_from_json_alone_reproduces_the_tables(tiny_result, tmp_path):
    # The tables are compared; plots re-rendered from a results file are drawn by the report command's tests.
    write_report(tiny_result, tmp_path / "a", plots=False)
    write_report(load_results(tmp_path / "a" / "results.json"), tmp_path / "b", plots=False)
    for name in ("summary.csv", "reductions.csv", "samples.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_unreadable_results_are_refused(tmp_path):
    with pytest.raises(ResultsError, match="no results.json here"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"schema_version": 99}')
    with pytest.raises(ResultsError, match="schema version 99 is not supported"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ResultsError, match="not an stc-bench results file"):
        load_results(tmp_path)


def test_peak_cuda_memory_is_reported_when_measured(tiny_result):
    from stc_bench.report.tables import memory_line

    assert memory_line(tiny_result, 4) is None  # a CPU run measures none
    gpu_like = RunResult.from_dict(tiny_result.to_dict())
    for m in gpu_like.measurements:
        m.metadata["peak_memory_mb"] = 2048.0 if m.spec.arm.is_baseline else 1536.0
    assert memory_line(gpu_like, 4) == "peak CUDA memory: baseline 2,048 MiB, stc r0.25 N2 k64 1,536 MiB"
