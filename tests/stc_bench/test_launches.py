"""Launch figures: operators per frame and stage, the same code path on CPU as on a GPU."""

import pytest
import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import get_framework
from stc_bench.launches import profile_launches
from stc_bench.measurement import BASELINE, StageLaunches, launch_verdict
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def rekv():
    pipeline = get_framework("rekv").build("tiny", torch.device("cpu"), torch.float32, 0, None)
    clip = torch.randn(4, 3, pipeline.image_size, pipeline.image_size)
    return pipeline, clip


def test_every_stage_gets_its_operators_per_frame_and_no_verdict_on_cpu(rekv):
    pipeline, clip = rekv
    stc = get_method("stc").arm(ratio=0.25, interval=2)
    with torch.inference_mode():
        for arm in (BASELINE, stc):
            pipeline.stream(clip, arm, StageTimer(CPU), 1)  # one-time work
    base = profile_launches(pipeline, clip, BASELINE, CPU, 1)
    arm = profile_launches(pipeline, clip, stc, CPU, 1)
    assert set(base) == set(arm) == {"vit", "compress", "prefill"}
    assert all(s.operators_per_frame > 0 and s.verdict is None and s.prequeued_ms is None for s in base.values())
    # Half the frames run selective layers, which dispatch more operators than full ones.
    assert arm["vit"].operators_per_frame > base["vit"].operators_per_frame
    again = profile_launches(pipeline, clip, stc, CPU, 1)
    assert again == arm                                       # a count, not a timing: it repeats exactly


def test_stage_launches_round_trip_and_derive_their_verdict():
    gpu = StageLaunches(operators_per_frame=310.5, prequeued_ms=10.0, span_ms=13.0, enqueue_ms=4.0, head_start_ms=40.0)
    assert StageLaunches.from_dict(gpu.to_dict()) == gpu
    assert gpu.verdict == launch_verdict(13.0, 10.0, 4.0, 40.0)
    assert gpu.verdict.startswith("launch-bound (+30% over pre-queued)")


def _with_launches(result, figures):
    """A copy of ``result`` whose stc arm carries ``figures`` for its vit stage."""
    import copy

    from stc_bench.results import RunResult

    document = copy.deepcopy(result.to_dict())
    for arm in document["arms"]:
        if arm["arm"]["method"] == "stc":
            arm["launches"]["vit"] = figures.to_dict()
    return RunResult.from_dict(document)


def test_a_run_records_operators_per_stage_and_the_report_shows_them(tiny_result):
    table = tiny_result.table()
    assert table.operators_per_frame.notna().all() and table.launch_verdict.isna().all()   # counted; no verdict on CPU
    from stc_bench.report.tables import launch_lines, stage_rows

    stc_label = next(a.arm.label for a in tiny_result.arms if a.arm.method == "stc")
    vit = next(row for row in stage_rows(tiny_result, 4, stc_label) if row[0] == "vit")
    base = table[(table.method == "baseline") & (table.stage == "vit")].operators_per_frame.iloc[0]
    arm = table[(table.method == "stc") & (table.stage == "vit")].operators_per_frame.iloc[0]
    assert vit[-1] == f"{base:,.0f} → {arm:,.0f}"
    assert launch_lines(tiny_result, 4) == []


def test_a_gpu_verdict_reaches_the_report_and_survives_the_file(tiny_result, tmp_path):
    from stc_bench.report.markdown import caveats
    from stc_bench.report.tables import launch_lines
    from stc_bench.results import load_results

    bound = _with_launches(tiny_result, StageLaunches(410.0, prequeued_ms=10.0, span_ms=15.0, enqueue_ms=2.0, head_start_ms=30.0))
    (line,) = launch_lines(bound, 4)
    assert line.endswith("vit: launch-bound (+50% over pre-queued): raise --chunk-frames or use --cuda-graph")
    assert any(c.startswith("Launches, 4 frames: ") for c in caveats(bound))
    bound.save(tmp_path / "results.json")
    assert launch_lines(load_results(tmp_path / "results.json"), 4) == [line]
    fine = _with_launches(tiny_result, StageLaunches(410.0, prequeued_ms=10.0, span_ms=10.5, enqueue_ms=2.0, head_start_ms=30.0))
    assert launch_lines(fine, 4) == []                                     # GPU-bound: nothing to act on


def test_malformed_launch_figures_are_refused_by_name(tiny_result, tmp_path):
    import json

    from stc_bench.results import ResultsError, load_results

    document = tiny_result.to_dict()
    document["arms"][0]["launches"]["vit"]["operators_per_frame"] = "many"
    (tmp_path / "results.json").write_text(json.dumps(document))
    with pytest.raises(ResultsError, match=r"arms\[0\]\.launches\.vit\.operators_per_frame is the string 'many', not a number"):
        load_results(tmp_path / "results.json")


def test_passes_that_could_not_be_queued_ahead_get_one_line_not_one_per_stage(tiny_result):
    from stc_bench.report.tables import launch_lines

    unjudged = _with_launches(tiny_result, StageLaunches(410.0, prequeued_ms=10.0, span_ms=15.0, enqueue_ms=40.0,
                                                         head_start_ms=30.0))
    (line,) = launch_lines(unjudged, 4)
    assert line.startswith("no launch-bound verdict for stc r0.25 N2 k64 vit: the host could not queue the pass")


def test_figures_written_by_a_newer_stc_bench_still_load():
    assert StageLaunches.from_dict({"operators_per_frame": 3.0, "kernels_per_frame": 5.0}) == StageLaunches(3.0)
