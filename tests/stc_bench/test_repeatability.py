"""How much a reduction moves from round to round (the round IQR), and the flag for arms whose
page faults per stream differ: computed from raw samples, shown in every view, also for old files."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from stc_bench.measurement import BASELINE, Measurement, StageSpec, paired_reduction, round_reductions
from stc_bench.methods.method import Arm
from stc_bench.report import write_report
from stc_bench.report.markdown import caveats, render_markdown
from stc_bench.report.tables import PAGE_FAULT_GAP, STAGE_HEADERS, host_line, host_warnings, stage_rows
from stc_bench.report.terminal import render_tables
from stc_bench.results import ResultsError, RunResult, load_results

V1_FILE = Path(__file__).parent / "data" / "results_v1_rekv_tiny.json"

BASE_MS = [100.0, 100.0, 100.0, 100.0, 100.0]
ARM_MS = [50.0, 60.0, 70.0, 80.0, 90.0]
"""Round i's reduction is 1 - ARM_MS[i] / 100: 0.5, 0.4, 0.3, 0.2, 0.1; their IQR is 0.4 - 0.2 = 0.2."""


def measurement(arm: Arm, times: list[float]) -> Measurement:
    return Measurement(StageSpec("rekv", "tiny", "cpu", "float32", 4, "vit", arm), list(times))


def test_the_round_iqr_is_the_spread_of_the_per_round_reductions():
    stc = Arm("stc")
    reduction = paired_reduction(measurement(BASELINE, BASE_MS), measurement(stc, ARM_MS))
    assert list(round_reductions(measurement(BASELINE, BASE_MS), measurement(stc, ARM_MS))) == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1])
    assert reduction.round_iqr == pytest.approx(0.2) and reduction.on_median == pytest.approx(0.3)


def test_rounds_are_paired_not_pooled():
    """The same samples paired otherwise give the same medians but another round IQR: drift that
    slows both arms of a round cancels in the round's reduction."""
    stc = Arm("stc")
    drifting_base = [100.0, 120.0, 140.0, 160.0, 180.0]
    drifting_arm = [50.0, 60.0, 70.0, 80.0, 90.0]  # always half the baseline of its own round
    steady = paired_reduction(measurement(BASELINE, drifting_base), measurement(stc, drifting_arm))
    shuffled = paired_reduction(measurement(BASELINE, drifting_base), measurement(stc, drifting_arm[::-1]))
    assert steady.round_iqr == pytest.approx(0.0) and steady.on_median == shuffled.on_median
    assert shuffled.round_iqr > 0.1


def test_one_round_has_no_spread():
    assert math.isnan(paired_reduction(measurement(BASELINE, [100.0]), measurement(Arm("stc"), [50.0])).round_iqr)


def rendered(result: RunResult) -> str:
    """The terminal tables as plain text."""
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render_tables(result, console)
    return console.file.getvalue()


@pytest.fixture
def known(tiny_result) -> RunResult:
    """A copy of the tiny run whose vit samples are BASE_MS and ARM_MS (3 repeats become 5)."""
    result = RunResult.from_dict(tiny_result.to_dict())
    for m in result.measurements:
        m.times_ms = list(BASE_MS if m.spec.arm.is_baseline else ARM_MS) if m.spec.stage == "vit" else (m.times_ms * 2)[:5]
        m.chunk_ms = []
    return result


def test_the_round_iqr_is_in_the_table_the_csv_and_every_report(known, tmp_path):
    vit = known.table().query("method == 'stc' and stage == 'vit'").iloc[0]
    assert vit.round_iqr == pytest.approx(0.2)
    label = known.compared[0].arm.label
    row = dict(zip(STAGE_HEADERS, next(r for r in stage_rows(known, 4, label) if r[0] == "vit")))
    assert row["round IQR"] == "20.0 pts"
    write_report(known, tmp_path, plots=False)
    reductions = pd.read_csv(tmp_path / "reductions.csv")
    assert reductions[reductions.stage == "vit"].round_iqr.iloc[0] == pytest.approx(0.2)
    markdown = (tmp_path / "report.md").read_text()
    assert "| round IQR |" in markdown and "| 20.0 pts |" in markdown and "Round IQR" in markdown
    summaries = json.loads((tmp_path / "results.json").read_text())["summaries"]
    assert next(s for s in summaries if s["stage"] == "vit")["round_iqr"] == pytest.approx(0.2)
    text = rendered(known)
    assert "round IQR" in text and "20.0 pts" in text


def test_an_old_results_file_re_renders_with_its_round_spread(tmp_path):
    """Schema-1 files stored each arm's samples in round order too: the spread is derived, not stored."""
    old = load_results(V1_FILE)
    compared = old.table().query("method != 'baseline'")
    assert compared.round_iqr.notna().all() and (compared.round_iqr >= 0).all()
    assert old.table().page_faults_median.isna().all()
    frames = old.frame_counts[0]
    assert host_line(old, frames) is None and host_warnings(old, frames) == []
    assert "round IQR" in render_markdown(old, [])


def with_faults(result: RunResult, baseline: list[int], arm: list[int]) -> RunResult:
    result = RunResult.from_dict(result.to_dict())
    for facts in result.arms:
        faults = baseline if facts.arm.is_baseline else arm
        facts.host_usage = {"minor_faults": list(faults), "major_faults": [0] * len(faults), "system_ms": [5.0] * len(faults)}
    return result


def test_arms_whose_page_faults_differ_are_flagged_with_what_to_do(tiny_result):
    churning = with_faults(tiny_result, [100, 120, 110], [100 + PAGE_FAULT_GAP + 5000] * 3)
    frames, label = churning.frame_counts[0], churning.compared[0].arm.label
    warnings = host_warnings(churning, frames)
    assert len(warnings) == 1 and label in warnings[0] and "110" in warnings[0]
    assert "jemalloc" in warnings[0]  # what to do
    assert f"{100 + PAGE_FAULT_GAP + 5000:,}" in host_line(churning, frames)
    assert any("Page faults differ between arms" in c for c in caveats(churning))
    text = rendered(churning)
    assert "warning:" in text and "page faults per stream" in text
    steady = with_faults(tiny_result, [100, 120, 110], [PAGE_FAULT_GAP, 90, 95])
    assert host_warnings(steady, frames) == [] and not any("Page faults" in c for c in caveats(steady))


def test_the_advice_follows_what_the_run_did_with_the_allocator(tiny_result):
    churning = with_faults(tiny_result, [0, 0, 0], [10 * PAGE_FAULT_GAP] * 3)
    frames = churning.frame_counts[0]
    churning.environment["allocator"] = {"applied": False, "reason": "STCBENCH_ALLOCATOR=system: the C library's defaults were kept"}
    assert "STCBENCH_ALLOCATOR=system" in host_warnings(churning, frames)[0] and "unset" in host_warnings(churning, frames)[0]
    churning.environment["allocator"] = {"applied": True}
    assert "were applied" in host_warnings(churning, frames)[0]


def test_fault_samples_survive_the_file_and_malformed_ones_are_named(tiny_result, tmp_path):
    churning = with_faults(tiny_result, [1, 2, 3], [4, 5, 6])
    churning.save(tmp_path / "results.json")
    again = load_results(tmp_path)
    assert [a.page_faults for a in again.arms] == [[1, 2, 3], [4, 5, 6]]
    document = json.loads((tmp_path / "results.json").read_text())
    document["arms"][1]["host_usage"]["minor_faults"][1] = "many"
    (tmp_path / "results.json").write_text(json.dumps(document))
    with pytest.raises(ResultsError, match=r"arms\[1\]\.host_usage\.minor_faults\[1\]"):
        load_results(tmp_path)


def test_a_gpu_run_gets_no_page_fault_advice(tiny_result):
    churning = with_faults(tiny_result, [0, 0, 0], [10 * PAGE_FAULT_GAP] * 3)
    for m in churning.measurements:
        m.spec = m.spec.__class__(**{**m.spec.__dict__, "device": "cuda:0"})
    churning.__dict__.pop("_table", None)
    assert host_warnings(churning, churning.frame_counts[0]) == []


def test_a_resume_under_other_host_settings_is_a_caveat(tiny_result):
    result = RunResult.from_dict(tiny_result.to_dict())
    first = (result.environment["allocator"]["applied"], result.environment["threads"]["threads"])
    result.run["resumed_host"] = [{"applied": first[0], "threads": first[1]}]
    assert not any(c.startswith("Resumed with other host settings") for c in caveats(result))
    result.run["resumed_host"].append({"applied": not first[0], "threads": first[1]})
    assert any(c.startswith("Resumed with other host settings") for c in caveats(result))


def test_a_partial_file_with_malformed_host_samples_is_refused_by_name():
    from stc_bench.run_folder import _progress_problem

    samples = {"baseline": {"totals": {"vit": [1.0]}, "chunks": {"vit": [[1.0]]}, "host": {"minor_faults": ["many"]}}}
    problem = _progress_problem({"frames": 4, "rounds": 1, "samples": samples}, (4,), set(), ["baseline"], 3)
    assert problem == ("samples of 'baseline': host usage must hold only minor_faults, major_faults, system_ms, each at most 1 "
                       "counts (numbers >= 0)")
    samples["baseline"]["host"] = {"minor_faults": [3]}
    assert _progress_problem({"frames": 4, "rounds": 1, "samples": samples}, (4,), set(), ["baseline"], 3) is None


def test_a_partial_file_with_an_unknown_host_figure_is_refused():
    from stc_bench.run_folder import _progress_problem

    samples = {"baseline": {"totals": {"vit": [1.0]}, "chunks": {"vit": [[1.0]]}, "host": {"page_ins": [3]}}}
    problem = _progress_problem({"frames": 4, "rounds": 1, "samples": samples}, (4,), set(), ["baseline"], 3)
    assert problem == ("samples of 'baseline': host usage must hold only minor_faults, major_faults, system_ms, each at most 1 "
                       "counts (numbers >= 0)")
