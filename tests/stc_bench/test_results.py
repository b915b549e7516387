"""Results schema round trip, CSV interface, and re-rendering a report from the JSON alone."""

import json

import pandas as pd
import pytest

from stc_bench.report import write_report
from stc_bench.report.tables import REDUCTION_COLUMNS, SUMMARY_COLUMNS
from stc_bench.results import ResultsError, RunResult, load_results


def test_run_measures_every_stage_and_arm(tiny_result):
    specs = {(m.spec.stage, m.spec.arm) for m in tiny_result.measurements}
    assert specs == {(s, a) for s in ("vit", "compress", "prefill") for a in ("baseline", "stc")}
    assert all(m.n == 3 and m.warmup == 1 and len(m.chunk_ms) == 3 for m in tiny_result.measurements)
    (point,) = tiny_result.points
    assert point.tokens == {"baseline": {"vit": 2916, "compress": 784, "prefill": 784},
                            "stc": {"vit": 2916, "compress": 256, "prefill": 256}}
    assert point.chunk_kinds == ["refresh", "selective", "refresh", "selective"]
    assert point.recompute_fraction == pytest.approx((2 * 729 + 2 * 182) / (4 * 729))
    assert 0.9 < point.fidelity["vit_cosine_mean"] <= 1.0 and point.fidelity["logits_kl_mean"] >= 0
    assert tiny_result.complete and tiny_result.run["weights"] == "random"


def test_json_round_trip(tiny_result, tmp_path):
    tiny_result.save(tmp_path / "results.json")
    again = load_results(tmp_path)
    assert again.to_dict() == tiny_result.to_dict()
    assert json.loads((tmp_path / "results.json").read_text())["schema_version"] == 1


def test_report_files_and_csv_columns(tiny_result, tmp_path):
    written = {p.name for p in write_report(tiny_result, tmp_path)}
    assert written == {"results.json", "samples.csv", "summary.csv", "reductions.csv", "report.md",
                       "latency.png", "per_frame_vit.png"}
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS and len(summary) == 6
    reductions = pd.read_csv(tmp_path / "reductions.csv")
    assert list(reductions.columns) == REDUCTION_COLUMNS and list(reductions.stage) == ["vit", "compress", "prefill"]
    vit = reductions[reductions.stage == "vit"].iloc[0]
    assert vit.efficiency == pytest.approx(vit.reduction_median / vit.flop_reduction)
    assert len(pd.read_csv(tmp_path / "samples.csv")) == 6 * 3
    report = (tmp_path / "report.md").read_text()
    assert "![latency.png](latency.png)" in report and "random" in report and "## Caveats" in report


def test_rerendering_from_json_alone_reproduces_the_tables(tiny_result, tmp_path):
    write_report(tiny_result, tmp_path / "a")
    write_report(load_results(tmp_path / "a" / "results.json"), tmp_path / "b")
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

    (point,) = tiny_result.points
    assert memory_line(tiny_result, point) is None  # a CPU run measures none
    gpu_like = RunResult.from_dict(tiny_result.to_dict())
    for m in gpu_like.measurements:
        m.metadata["peak_memory_mb"] = 2048.0 if m.spec.arm == "baseline" else 1536.0
    assert memory_line(gpu_like, gpu_like.points[0]) == "peak CUDA memory: baseline 2,048 MiB, +STC 1,536 MiB"
