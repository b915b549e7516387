"""Sharded runs (--shard K/N): the slicing, what a shard measures, its resume, its usage errors,
and the two launchers that pass --shard (the SLURM array script and the GPU workflow's matrix)."""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from stc_bench.config import BenchConfig
from stc_bench.errors import BenchUsageError
from stc_bench.results import load_results
from stc_bench.shard import Shard, plan_points, planned_frames
from tests.stc_bench.test_cli import run_folder

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "speed_benchmark" / "sweep_slurm.sbatch"
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-benchmark.yml"

SWEEP = ["sweep", "toy", "--scale", "tiny", "--ratio", "0.25,0.5", "--repeats", "2", "--warmup", "0", "--device", "cpu",
         "--video", "synthetic"]
"""A tiny sweep of the toy framework (the ``toy`` fixture registers it), without --frames: 2 STC points per frame count."""


class Arm(str):
    """A stand-in arm for the slicing: plan_points needs only the order and, for the record, a label."""

    @property
    def label(self) -> str:
        return str(self)


ARMS = [Arm("baseline"), Arm("a"), Arm("b"), Arm("c")]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_slices_are_deterministic_disjoint_and_cover_every_point(count):
    frames = (8, 16)
    points = [(f, a) for f in frames for a in ARMS[1:]]
    plans = [plan_points(frames, ARMS, f"{k}/{count}") for k in range(count)]
    assert plans == [plan_points(frames, ARMS, f"{k}/{count}") for k in range(count)]  # the same every time
    owned = [[(f, a) for f, arms in plan.items() for a in arms[1:]] for plan in plans]
    assert sorted(p for shard in owned for p in shard) == sorted(points)  # disjoint and covering
    assert all(shard for shard in owned)  # no shard idle
    assert max(map(len, owned)) - min(map(len, owned)) <= 1  # round-robin: balanced
    for plan in plans:
        assert all(arms[0] == "baseline" and "baseline" not in arms[1:] for arms in plan.values())  # one baseline per frame count
        assert list(plan) == [f for f in frames if f in plan]  # in --frames order


def test_round_robin_deals_points_in_run_order():
    assert plan_points((8, 16), ARMS, "0/2") == {8: ["baseline", "a", "c"], 16: ["baseline", "b"]}
    assert plan_points((8, 16), ARMS, "1/2") == {8: ["baseline", "b"], 16: ["baseline", "a", "c"]}
    assert plan_points((8, 16), ARMS, "2/4") == {8: ["baseline", "c"]}  # points 2 and 6 of 6: only 8 frames c
    assert plan_points((8, 16), ARMS, "3/4") == {16: ["baseline", "a"]}
    assert plan_points((8, 16), ARMS[:2], "1/2") == {16: ["baseline", "a"]}  # nothing at 8 frames: not measured there
    assert plan_points((8, 16), ARMS, None) == {8: ARMS, 16: ARMS}


def test_more_shards_than_points_is_refused_naming_both():
    with pytest.raises(BenchUsageError, match=re.escape("--shard 0/7: N = 7 is larger than the run's 6 points (frame counts x "
                                                        "arms besides the baseline), so some shard would measure nothing; "
                                                        "pass N of at most 6, e.g. --shard 0/6")):
        plan_points((8, 16), ARMS, "0/7")
    with pytest.raises(BenchUsageError, match="measures only the baseline"):
        plan_points((8,), ARMS[:1], "0/1")


def test_the_config_keeps_the_shard_as_k_over_n():
    assert BenchConfig(shard=" 1 / 4 ").shard == "1/4"
    assert BenchConfig.from_dict(BenchConfig(shard="3/4").to_dict()).shard == "3/4"
    assert BenchConfig().shard is None and Shard.parse("3/4") == Shard(3, 4) and Shard(3, 4).label == "3/4"


@pytest.mark.parametrize("value, message", [
    ("2/2", "--shard 2/2: K must be below N (shards count from 0: 0/2 to 1/2)"),
    ("1/0", "--shard 1/0: N, the number of shards, must be 1 or more"),
    ("x/3", "--shard x/3: write K/N, shard K of N counted from 0"),
    ("-1/3", "--shard -1/3: write K/N"),
    ("3", "--shard 3: write K/N"),
])
def test_a_bad_shard_is_a_one_line_usage_error(cli, tmp_path, value, message):
    result = cli("sweep", "--shard", value, "--out", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" in lines[0]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_help_explains_shard_and_merge(cli):
    sweep = cli("sweep", "--help").output
    assert "--shard" in sweep and "K/N" in sweep and "stc-bench merge" in sweep
    merge = cli("merge", "--help").output
    assert "DIR..." in merge and "--out" in merge and "own shard" in merge
    assert "merge" in cli("--help").output


def arms_by_frames(folder: Path) -> dict[int, list[str]]:
    data = json.loads((folder / "results.json").read_text())
    out: dict[int, list[str]] = {}
    for a in data["arms"]:
        out.setdefault(a["frames"], []).append(a["arm"]["method"] + str(a["arm"]["knobs"].get("ratio", "")))
    return out


def test_each_shard_measures_its_points_with_a_baseline_per_frame_count(cli, toy, no_plots, tmp_path):
    result = cli(*SWEEP, "--ratio", "0.1,0.25,0.5", "--frames", "2,4", "--shard", "1/4", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = run_folder(tmp_path)
    # points in run order: 2f 0.1, 2f 0.25, 2f 0.5, 4f 0.1, 4f 0.25, 4f 0.5 -> shard 1 of 4 owns 2f 0.25 and 4f 0.5
    assert arms_by_frames(folder) == {2: ["baseline", "stc0.25"], 4: ["baseline", "stc0.5"]}
    data = json.loads((folder / "results.json").read_text())
    assert data["config"]["shard"] == "1/4" and data["complete"] is True
    assert data["run"]["shard"] == {"index": 1, "count": 4, "points": [{"frames": 2, "arm": "stc r0.25 N2 k64"},
                                                                        {"frames": 4, "arm": "stc r0.5 N2 k64"}]}
    baselines = [m for m in data["measurements"] if m["spec"]["arm"]["method"] == "baseline"]
    assert sorted({m["spec"]["frames"] for m in baselines}) == [2, 4] and len(baselines) == 2 * 3  # per frame count, per stage
    assert "shard 1/4 of a sharded run" in result.output

    skipping = cli(*SWEEP, "--ratio", "0.25", "--frames", "2,4,6", "--shard", "1/3", "--out", str(tmp_path / "skip"))
    assert skipping.exit_code == 0, skipping.output
    assert arms_by_frames(run_folder(tmp_path / "skip")) == {4: ["baseline", "stc0.25"]}  # 2 and 6 frames: not measured


def test_more_shards_than_points_leaves_no_folder(cli, toy, tmp_path):
    result = cli(*SWEEP, "--frames", "2,4", "--shard", "2/5", "--out", str(tmp_path))
    assert result.exit_code == 2 and "N = 5 is larger than the run's 4 points" in result.output, result.output
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_an_interrupted_shard_resumes_to_its_own_points(cli, toy, no_plots, tmp_path, monkeypatch):
    import stc_bench.runner as runner

    args = [*SWEEP, "--ratio", "0.25", "--frames", "2,4,6", "--shard", "0/2"]  # shard 0 of 3 points: 2 and 6 frames
    real_pass, calls = runner._timed_pass, {"n": 0}

    def dies_in_the_second_frame_count(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # 2 frames done (2 rounds x 2 arms); 6 frames in its second round
            raise KeyboardInterrupt
        return real_pass(*a, **k)

    monkeypatch.setattr(runner, "_timed_pass", dies_in_the_second_frame_count)
    stopped = cli(*args, "--out", str(tmp_path))
    assert stopped.exit_code == 1 and "interrupted during --frames 6" in stopped.output, stopped.output
    folder = run_folder(tmp_path)
    assert json.loads((folder / "partial.json").read_text())["rounds"] == 1
    assert planned_frames(load_results(folder)) == [2, 6]

    monkeypatch.setattr(runner, "_timed_pass", real_pass)
    resumed = cli("sweep", "--resume", str(folder))
    assert resumed.exit_code == 0, resumed.output
    assert arms_by_frames(folder) == {2: ["baseline", "stc0.25"], 6: ["baseline", "stc0.25"]}
    assert json.loads((folder / "results.json").read_text())["complete"] is True
    again = cli("sweep", "--resume", str(folder))  # 4 frames belong to shard 1: nothing is left here
    assert again.exit_code == 2 and "the run is complete, nothing to resume" in again.output, again.output
    dropped = cli("sweep", "--resume", str(folder), "--shard", "1/2")
    assert dropped.exit_code == 2 and "drop --shard" in dropped.output


# --- the launchers: a SLURM array job and the GPU workflow's matrix -----------------------------

def parse_stc_bench(args: list[str]) -> dict:
    """Parse ``stc-bench ARGS`` with the real CLI (an unknown option or a bad value raises); its parameters."""
    from stc_bench.cli import app

    command = typer.main.get_command(app).commands[args[0]]
    return command.make_context(args[0], list(args[1:])).params


def test_the_sbatch_script_is_an_array_job_one_shard_per_task_then_merge():
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --array=0-\d+$", text, re.M), "the array counts from 0: task ids are the shard numbers"
    assert re.search(r"^#SBATCH --gres=gpu:1$", text, re.M)
    assert '--shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"' in text
    assert re.search(r"stc-bench merge reports/slurm-.+/shard-\*/\*/ --out", text)


@pytest.mark.parametrize("task, previous, expected", [
    ("2", False, ["sweep", "rekv", "--gpu", "0", "--ratio", "0.1,0.25,0.5", "--interval", "2,4", "--frames", "16,32",
                  "--shard", "2/4", "--out", "reports/slurm-77/shard-2"]),
    ("1", True, ["sweep", "--resume", "reports/slurm-77/shard-1/run/"]),  # a resubmitted task continues its folder
])
def test_the_sbatch_script_passes_its_task_as_the_shard(tmp_path, task, previous, expected):
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "stc-bench").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > calls.log\n')
    (bin_dir / "stc-bench").chmod(0o755)
    if previous:
        (tmp_path / "reports/slurm-77/shard-1/run").mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_ARRAY_JOB_ID": "77",
           "SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": "4"}
    done = subprocess.run([shutil.which("bash") or "bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "calls.log").read_text().splitlines()
    assert args == expected
    params = parse_stc_bench(args)
    if not previous:
        assert BenchConfig(shard=params["shard"]).shard == f"{task}/4"


def test_the_workflow_runs_one_shard_per_gpu_and_merges_them():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    benchmark, merge = workflow["jobs"]["benchmark"], workflow["jobs"]["merge-sweep"]
    assert benchmark["env"]["SHARD"] == "${{ strategy.job-index }}/${{ strategy.job-total }}"  # K/N of the GPU matrix
    measuring = next(s["run"] for s in benchmark["steps"] if s.get("name", "").startswith("Benchmark and sweep"))
    sweep = next(line for line in measuring.splitlines() if "stc-bench sweep" in line)
    args = shlex.split(sweep.split("stc-bench ", 1)[1].replace("$SHARD", "1/2").replace("$OUT", "reports/ci"))
    assert parse_stc_bench(args)["shard"] == "1/2" and "--out" in args

    assert merge["needs"] == "benchmark" and "!cancelled()" in merge["if"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in merge["if"]
    download = next(s for s in merge["steps"] if s.get("uses", "").startswith("actions/download-artifact"))
    assert download["with"]["pattern"] == "gpu-benchmark-*-gpu*" and download["with"]["path"] == "shards"
    uploaded = next(s for s in benchmark["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert uploaded["with"]["name"] == "${{ steps.names.outputs.artifact }}"  # gpu-benchmark-<ref>-gpu<N>: matched above
    merging = next(s["run"] for s in merge["steps"] if "stc-bench merge" in s.get("run", ""))
    args = shlex.split(merging.split("stc-bench ", 1)[1].strip())
    assert args[:2] == ["merge", "shards/*/sweep/*/"]  # <artifact>/sweep/<run folder>/ of every GPU
    assert parse_stc_bench(args)["out"] == Path("reports/ci/sweep-merged")
    upload = next(s for s in merge["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "reports/ci/sweep-merged" and upload["if"] == "always()"
