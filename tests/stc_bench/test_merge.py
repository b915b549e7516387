"""stc-bench merge: the shards of a tiny sweep join into the unsharded sweep's point set, each point
paired with its own shard's baseline; folders that do not make up one finished run are refused
with one line naming the difference and the folders; a merge never overwrites anything."""

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stc_bench.results import load_results
from tests.stc_bench.conftest import TOY_MODULE

SWEEP = ["sweep", "toy", "--scale", "tiny", "--ratio", "0.25,0.5", "--frames", "2,4", "--repeats", "2", "--warmup", "0",
         "--device", "cpu", "--video", "synthetic"]
"""A tiny sweep of the toy framework: 2 frame counts x 2 STC points, split into 2 shards below."""


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """The tiny sweep measured once for the module: unsharded in ``full/``, and its shards 0/2 and
    1/2 in ``shard0/`` and ``shard1/`` (one run folder each). Tests copy what they change."""
    import stc_bench.report
    from stc_bench.cli import app
    from stc_bench.frameworks import FRAMEWORK_HELP, FRAMEWORK_MODULES

    root = tmp_path_factory.mktemp("measured")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(FRAMEWORK_MODULES, "toy", TOY_MODULE)
        mp.setitem(FRAMEWORK_HELP, "toy", "the toy framework of the tests")
        mp.setattr(stc_bench.report, "write_report", functools.partial(stc_bench.report.write_report, plots=False))
        for name, extra in (("full", []), ("shard0", ["--shard", "0/2"]), ("shard1", ["--shard", "1/2"])):
            result = CliRunner().invoke(app, [*SWEEP, *extra, "--out", str(root / name)], catch_exceptions=False)
            assert result.exit_code == 0, result.output
    return root


def folder_of(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder


@pytest.fixture
def shards(measured, tmp_path) -> list[Path]:
    """Fresh copies of the two shard folders, to edit."""
    copies = []
    for k in (0, 1):
        source = folder_of(measured / f"shard{k}")
        copies.append(Path(shutil.copytree(source, tmp_path / "shards" / source.name.replace("_toy_", f"_toy{k}_"))))
    return copies


def edit(folder: Path, change) -> None:
    """Change a shard's results.json in place: ``change(document)``."""
    path = folder / "results.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def point_set(result) -> set:
    return {(a.frames, a.arm.label) for a in result.arms}


def test_two_shards_merged_give_the_unsharded_point_set(cli, toy, no_plots, measured, shards, tmp_path):
    result = cli("merge", *map(str, shards), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    folder = folder_of(tmp_path / "merged")
    assert folder.name.endswith("_toy_cpu_merged")
    merged, full = load_results(folder), load_results(folder_of(measured / "full"))
    assert point_set(merged) == point_set(full)  # the done-when of the issue
    assert sorted((a.frames, a.arm.label) for a in merged.compared) == sorted((a.frames, a.arm.label) for a in full.compared)
    assert merged.complete and merged.config == dataclasses.replace(full.config, out=str(tmp_path / "merged"))  # no --shard
    assert [s["shard"] for s in merged.run["merged_shards"]] == ["0/2", "1/2"]
    assert "merged 2 shards (4 points, 2 frame counts) into" in result.output


def test_each_point_keeps_its_own_shards_baseline(cli, toy, no_plots, shards, tmp_path):
    assert cli("merge", *map(str, shards), "--out", str(tmp_path / "merged")).exit_code == 0
    folder = folder_of(tmp_path / "merged")
    merged = load_results(folder)
    own = {k: load_results(shards[k]) for k in (0, 1)}
    # one baseline per shard and frame count, never pooled
    assert sorted((a.frames, a.shard) for a in merged.arms if a.arm.is_baseline) == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for facts in merged.compared:
        shard = own[facts.shard]
        theirs = next(a for a in shard.compared if (a.frames, a.arm) == (facts.frames, facts.arm))
        for stage in merged.stages:
            assert merged.reduction(facts, stage) == shard.reduction(theirs, stage)  # against the same shard's baseline
            assert merged.baseline(facts.frames, stage, facts.shard).times_ms == shard.baseline(facts.frames, stage).times_ms
    report = (folder / "report.md").read_text()
    assert "| baseline (shard 0) |" in report and "| baseline (shard 1) |" in report
    assert "#### stc r0.5 N2 k64 (shard 1)" in report and "never pooled" in report
    summary = (folder / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",shard") and sum(",baseline,baseline," in line for line in summary) == 2 * 2 * 3
    assert (folder / "reductions.csv").read_text().splitlines()[0].endswith(",shard")
    again = cli("report", str(folder), "--out", str(tmp_path / "again"))  # re-rendered from results.json alone
    assert again.exit_code == 0 and (tmp_path / "again" / "summary.csv").read_text() == (folder / "summary.csv").read_text()


def test_compare_pairs_each_shards_baseline_with_the_same_shards(cli, toy, no_plots, measured, shards, tmp_path):
    from stc_bench.compare import SlowdownGate, compare_runs

    assert cli("merge", *map(str, shards), "--out", str(tmp_path / "merged")).exit_code == 0
    merged = load_results(folder_of(tmp_path / "merged"))
    checks = compare_runs(merged, merged, [SlowdownGate(None, "median", 0.05)], [])
    baselines = [c for c in checks if " baseline " in c.subject]
    assert sorted({c.subject.split(" vit")[0] for c in baselines if " vit " in c.subject}) == [
        "2f baseline (shard 0)", "2f baseline (shard 1)", "4f baseline (shard 0)", "4f baseline (shard 1)"]
    assert all("change +0.0%" in c.detail for c in checks)          # itself: each shard against its own
    # an unsharded run has one baseline per frame count, which stands for every shard's: nothing missing
    full = load_results(folder_of(measured / "full"))
    assert not [c for c in compare_runs(full, merged, [], []) + compare_runs(merged, full, [], []) if "missing" in c.subject]


def test_a_merged_streams_sweep_counts_points_not_cells(cli, toy, no_plots, tmp_path):
    """A point is a (frame count, arm) pair, measured at every --streams S: 4 points, 8 cells."""
    for k in (0, 1):
        assert cli(*SWEEP, "--streams", "1,2", "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")).exit_code == 0
    result = cli("merge", str(folder_of(tmp_path / "s0")), str(folder_of(tmp_path / "s1")), "--out", str(tmp_path / "m"))
    assert result.exit_code == 0, result.output
    assert "merged 2 shards (4 points, 2 frame counts) into" in result.output
    assert len(load_results(folder_of(tmp_path / "m")).compared) == 8


def test_merge_never_overwrites(cli, toy, no_plots, shards, tmp_path):
    before = {p: p.read_bytes() for folder in shards for p in folder.iterdir()}
    for _ in range(2):
        assert cli("merge", *map(str, shards), "--out", str(tmp_path / "merged")).exit_code == 0
    assert len(list((tmp_path / "merged").iterdir())) == 2  # a new folder each time
    assert {p: p.read_bytes() for folder in shards for p in folder.iterdir()} == before  # the shards untouched
    inside = cli("merge", *map(str, shards), "--out", str(shards[1] / "sub"))
    assert inside.exit_code == 2 and f"--out {shards[1] / 'sub'} is inside {shards[1]} (shard 1/2)" in inside.output


def refused(cli, folders, tmp_path) -> str:
    result = cli("merge", *map(str, folders), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "merged").exists()
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0].removeprefix("error: ")


def test_missing_and_duplicate_shards_are_refused(cli, toy, shards, tmp_path):
    a, b = shards
    assert refused(cli, [a], tmp_path) == (f"shard 1/2 missing (given: {a} (shard 0/2)); pass the run folder of every "
                                           "shard K = 0..1")
    twin = Path(shutil.copytree(a, tmp_path / "twin"))
    assert refused(cli, [a, twin, b], tmp_path) == f"shard 0/2 given 2 times: {a}, {twin}; pass each shard's folder once"


def test_a_folder_that_is_no_shard_is_refused(cli, toy, measured, shards, tmp_path):
    full = folder_of(measured / "full")
    assert refused(cli, [shards[0], full], tmp_path) == (f"{full}: not a shard (its run had no --shard K/N); merge joins the "
                                                         "folders of stc-bench sweep ... --shard K/N runs, one per K")


def test_other_shard_counts_are_refused(cli, toy, shards, tmp_path):
    a, b = shards
    edit(b, lambda d: d["config"].update(shard="1/3"))
    assert refused(cli, shards, tmp_path) == (f"the shard count N is 2 in {a} (shard 0/2) but 3 in {b} (shard 1/3); merge "
                                              "the N folders of one --shard K/N run")


def test_other_settings_are_refused_naming_the_option(cli, toy, shards, tmp_path):
    a, b = shards
    edit(b, lambda d: d["config"].update(warmup=1, ratios=[0.25, 0.75]))
    assert refused(cli, shards, tmp_path) == (
        f"the shards' settings differ: --warmup is 0 in {a} (shard 0/2) but 1 in {b} (shard 1/2); --ratio is 0.25,0.5 in {a} "
        f"(shard 0/2) but 0.25,0.75 in {b} (shard 1/2); the shards of one run share every setting but --shard (and --out, "
        "--gpu): re-run the odd shards with the others' settings")


def test_other_devices_and_software_are_refused(cli, toy, shards, tmp_path):
    a, b = shards
    edit(b, lambda d: d["environment"].update(device_name="NVIDIA A100-SXM4-80GB", torch="9.9.9"))
    message = refused(cli, shards, tmp_path)
    assert message.startswith("the shards' device or software differ: device is ")
    assert f"but NVIDIA A100-SXM4-80GB in {b} (shard 1/2)" in message and "torch is " in message
    assert f"but 9.9.9 in {b} (shard 1/2)" in message
    assert message.endswith("the shards of one run must run on one device model with one software setup (re-run the odd "
                            "shards where the others ran)")
    for key, value in (("transformers", "0.0.1"), ("git_commit", "0123abc")):
        fresh = [Path(shutil.copytree(f, tmp_path / key / f.name)) for f in (a, b)]
        edit(fresh[1], lambda d, key=key, value=value: d["environment"].update({key: value}))
        message = refused(cli, fresh, tmp_path)
        assert f"{key} is " in message and f"but {value} in {fresh[1]} (shard 1/2)" in message


def test_the_gpu_index_may_differ_but_not_the_video(cli, toy, no_plots, shards, tmp_path):
    a, b = shards
    # --gpu K for shard K on one machine: the index in the config may differ (the device model is checked
    # from the environment)
    edit(b, lambda d: d["config"].update(device="cuda:1"))
    assert cli("merge", *map(str, shards), "--out", str(tmp_path / "ok")).exit_code == 0
    edit(b, lambda d: d["run"].update(video="sample (bikes.mp4)"))
    assert "run.video is synthetic" in refused(cli, shards, tmp_path)


def test_an_unfinished_shard_is_refused_with_the_resume_command(cli, toy, shards, tmp_path):
    a, b = shards
    edit(b, lambda d: (d.update(complete=False), d["errors"].append("interrupted during --frames 4")))
    assert refused(cli, shards, tmp_path) == (f"{b} (shard 1/2) did not finish (interrupted during --frames 4); finish it with "
                                              f"stc-bench sweep --resume {b}, then merge again")


def test_a_point_measured_by_two_shards_is_refused(cli, toy, shards, tmp_path):
    a, b = shards
    theirs = json.loads((a / "results.json").read_text())
    stolen = next(x for x in theirs["arms"] if x["arm"]["method"] == "stc")
    edit(b, lambda d: d["arms"].append(stolen))
    message = refused(cli, shards, tmp_path)
    assert message.startswith(f"{stolen['frames']} frames stc r0.25 N2 k64 was measured by two shards, {a} (shard 0/2) and "
                              f"{b} (shard 1/2)")


def test_no_folder_and_unreadable_folders(cli, tmp_path):
    assert cli("merge").exit_code == 2
    assert "no results.json here" in refused(cli, [tmp_path / "nothing"], tmp_path)
