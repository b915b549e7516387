"""stc-bench sweep: the point grid, the files and plots, and resuming an interrupted sweep."""

import json

import pytest

from tests.stc_bench.test_cli import run_folder

SWEEP = ["sweep", "toy", "--scale", "tiny", "--ratio", "0.1,0.25,0.5", "--repeats", "3", "--warmup", "1", "--device", "cpu",
         "--video", "synthetic"]
"""A sweep of the toy framework (the ``toy`` fixture registers it): the sweep machinery, not a model."""


@pytest.mark.tier1
def test_sweep_writes_every_point_file_and_plot(cli, toy, tmp_path):
    result = cli(*SWEEP, "--frames", "4", "--interval", "2,4", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = run_folder(tmp_path)
    data = json.loads((folder / "results.json").read_text())
    points = {(a["arm"]["knobs"]["ratio"], a["arm"]["knobs"]["interval"]) for a in data["arms"] if a["arm"]["method"] == "stc"}
    assert points == {(r, n) for r in (0.1, 0.25, 0.5) for n in (2, 4)}
    assert data["complete"] is True and not (folder / "partial.json").exists()
    baselines = [m for m in data["measurements"] if m["spec"]["arm"]["method"] == "baseline"]
    assert len(baselines) == 3  # one shared baseline per stage, not one per point
    for name in ("summary.csv", "reductions.csv", "report.md", "latency.png", "reduction_vs_ratio.png",
                 "reduction_vs_interval.png", "fidelity_vs_ratio.png", "pareto.png"):
        assert (folder / name).is_file(), name
    assert "ViT reduction [95% CI]" in result.output and "stc r0.1 N4 k64" in result.output
    assert "#### stc r0.5 N2 k64" in (folder / "report.md").read_text()


def test_an_interrupted_sweep_resumes_to_the_same_point_set(cli, toy, no_plots, tmp_path, monkeypatch):
    import stc_bench.runner as runner

    reference = cli(*SWEEP, "--frames", "4,6", "--out", str(tmp_path / "ref"))
    assert reference.exit_code == 0
    expected = json.loads((run_folder(tmp_path / "ref") / "results.json").read_text())

    real_pass, calls = runner._timed_pass, {"n": 0}

    def dies_half_way(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:  # frames 4 done (4 rounds x 4 arms = 16 passes); frames 6 in round 3
            raise KeyboardInterrupt
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(runner, "_timed_pass", dies_half_way)
    stopped = cli(*SWEEP, "--frames", "4,6", "--out", str(tmp_path / "run"))
    assert stopped.exit_code == 1, stopped.output
    assert "interrupted during --frames 6" in stopped.output and "--resume" in stopped.output, stopped.output[-400:]
    folder = run_folder(tmp_path / "run")
    partial = json.loads((folder / "results.json").read_text())
    assert partial["complete"] is False and [a["frames"] for a in partial["arms"]] == [4, 4, 4, 4]  # baseline + 3 points
    progress = json.loads((folder / "partial.json").read_text())
    assert progress["frames"] == 6 and progress["rounds"] == 1

    monkeypatch.setattr(runner, "_timed_pass", real_pass)
    resumed = cli("sweep", "--resume", str(folder))
    assert resumed.exit_code == 0, resumed.output
    final = json.loads((folder / "results.json").read_text())
    assert final["complete"] is True and len(final["run"]["resumed_utc"]) == 1

    def point_set(d):
        return sorted((a["frames"], a["arm"]["method"], tuple(sorted(a["arm"]["knobs"].items()))) for a in d["arms"])

    assert point_set(final) == point_set(expected)
    assert sorted(len(m["times_ms"]) for m in final["measurements"]) == sorted(len(m["times_ms"]) for m in expected["measurements"])
    # the samples measured before the interruption are kept, not re-measured
    six = [m for m in final["measurements"] if m["spec"]["frames"] == 6 and m["spec"]["arm"] == "baseline"]
    assert all(m["times_ms"][0] == progress["samples"]["baseline"]["totals"][m["spec"]["stage"]][0] for m in six)


def test_resume_refuses_other_options_and_unknown_folders(cli, tmp_path):
    result = cli("sweep", "--resume", str(tmp_path), "--ratio", "0.3")
    assert result.exit_code == 2 and "drop --ratio" in result.output
    result = cli("sweep", "--resume", str(tmp_path))
    assert result.exit_code == 2 and "no results.json here" in result.output


@pytest.mark.parametrize("args, message", [
    (["--ratio", "0.1,x"], "--ratio 'x': not a number"),
    (["--interval", "2,0"], "--interval 0: must be a whole number >= 1"),
    (["--ratio", "0.1,2"], "--ratio 2.0: must be in (0, 1]"),
    (["--frames", "4,8", "--frames", "8"], "--frames 8: must be given once each (it is repeated)"),
    (["--frames", "3,8", "--streams", "1,4"], "--streams 4: must be at most the smallest frame count (3): each stream "
                                              "starts the clip at a frame of its own; lower --streams or raise --frames"),
])
def test_sweep_list_errors(cli, tmp_path, args, message):
    result = cli("sweep", *args, "--out", str(tmp_path))
    assert result.exit_code == 2 and message in result.output


def test_unknown_framework_lists_the_choices(cli, tmp_path):
    result = cli("sweep", "nonesuch", "--out", str(tmp_path))
    assert result.exit_code == 2 and "unknown framework 'nonesuch': choose one of dispider, livecc, rekv, streamforest" in result.output


def test_cacher_only_frameworks_refuse_a_token_sweep(cli, tmp_path):
    result = cli("sweep", "dispider", "--scale", "tiny", "--tokens-per-frame", "32,64", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 2 and "STC uses no pruner on dispider" in result.output
    assert not any(tmp_path.iterdir())
