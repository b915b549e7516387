"""Lint of the self-hosted GPU workflow: triggers, runner labels, fork guard, GPU pinning,
concurrency, gates, artifacts, and every stc-bench invocation parsed by the real CLI (so a
renamed option fails here, not on the runner). The shell steps whose failure handling matters
(artifact naming, fetching the reference, the comparison's exit codes) are run with bash
against fake gh and stc-bench commands."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-benchmark.yml"
BASH = [shutil.which("bash") or "bash", "--noprofile", "--norc", "-eo", "pipefail"]  # GitHub's default `run` shell


@pytest.fixture(scope="module")
def workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def job(workflow):
    return workflow["jobs"]["benchmark"]


def steps(workflow):
    return job(workflow)["steps"]


def step(workflow, name_start: str) -> dict:
    return next(s for s in steps(workflow) if s.get("name", "").startswith(name_start))


def run_step(script: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run a step's script as the runner would; returns the process and what it wrote to $GITHUB_OUTPUT."""
    output = tmp_path / "github_output"
    output.write_text("")
    file = tmp_path / "step.sh"
    file.write_text(script)
    done = subprocess.run([*BASH, str(file)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env, "GITHUB_OUTPUT": str(output)})
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return done, outputs


def fake_command(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + body + "\n")
    (folder / name).chmod(0o755)


def test_triggers(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"workflow_dispatch", "schedule", "pull_request"} <= set(triggers)
    assert triggers["schedule"][0]["cron"].count(" ") == 4


def test_runs_on_a_self_hosted_gpu_runner_one_job_per_gpu(workflow):
    assert job(workflow)["runs-on"] == ["self-hosted", "gpu"]
    assert job(workflow)["strategy"]["matrix"]["gpu"]


def test_fork_pull_requests_never_reach_the_runner(workflow):
    condition = job(workflow)["if"]
    assert "github.event_name != 'pull_request'" in condition
    assert "github.event.pull_request.head.repo.full_name == github.repository" in condition


def test_queued_reference_runs_are_never_cancelled(workflow):
    concurrency = job(workflow)["concurrency"]
    # main, nightly and manual runs: a group of their own (GitHub cancels older *pending* jobs of a group)
    assert "format('run{0}', github.run_id)" in concurrency["group"] and "matrix.gpu" in concurrency["group"]
    # pull requests: one group per PR, a new push cancels the superseded run
    assert "github.event.pull_request.number" in concurrency["group"]
    assert concurrency["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"
    measuring = step(workflow, "Benchmark and sweep")["run"]
    assert "flock" in measuring and "${GPU_UUID}" in measuring  # the GPU is exclusive through a lock on its UUID


def test_each_job_is_pinned_to_its_gpu(workflow):
    env = job(workflow)["env"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"] == env["PHYSICAL_GPU"] == "${{ matrix.gpu }}"
    scripts = "\n".join(s.get("run", "") for s in steps(workflow))
    queries = re.findall(r"nvidia-smi -i (\S+)", scripts)
    assert queries and set(queries) == {'"$PHYSICAL_GPU"'}  # nvidia-smi ignores CUDA_VISIBLE_DEVICES: its own index
    check = step(workflow, "Check that cuda:0 is the pinned GPU")["run"]
    assert "get_device_properties(0).uuid" in check and "$GPU_UUID" in check and "exit 1" in check
    assert "GPU_UUID=" in step(workflow, "Pre-flight")["run"]


def test_no_fixed_reduction_gates(workflow):
    compare = re.sub(r"\\\n\s*", " ", step(workflow, "Compare and gate")["run"])
    assert "--expect-reduction" not in compare
    assert "--max-reduction-drop vit:" in compare and "--max-reduction-drop prefill:" in compare
    assert "--expectations \"$EXPECTATIONS\"" in compare and "$GITHUB_STEP_SUMMARY" in compare
    from stc_bench.compare import load_expectations

    load_expectations(ROOT / job(workflow)["env"]["EXPECTATIONS"])


def test_artifact_names_are_sanitised(workflow, tmp_path):
    naming = step(workflow, "Name the artifacts")
    assert "github.ref_name" in naming["env"]["REF_NAME"] and "${{" not in naming["run"]  # no expression pasted into bash
    done, outputs = run_step(naming["run"], tmp_path, {"REF_NAME": 'feat/a:b*"<x>|?\\$(id)', "PHYSICAL_GPU": "1"})
    assert done.returncode == 0, done.stderr
    assert outputs["artifact"] == "gpu-benchmark-feat-a-b---x------id--gpu1"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", outputs["artifact"])
    done, outputs = run_step(naming["run"], tmp_path, {"REF_NAME": "main", "PHYSICAL_GPU": "0"})
    assert outputs == {"artifact": "gpu-benchmark-main-gpu0", "reference": "gpu-benchmark-main-gpu0"}
    upload = next(s for s in steps(workflow) if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/ci"
    assert upload["with"]["name"] == "${{ steps.names.outputs.artifact }}"
    assert step(workflow, "Fetch the last main-branch result")["env"]["REFERENCE"] == "${{ steps.names.outputs.reference }}"


@pytest.mark.parametrize("gh, found, message", [
    (None, "false", "gh is not installed"),
    ("echo 'HTTP 401: Bad credentials' >&2; exit 1", "false", "gh run list failed"),
    ('[ "$2" = list ] && exit 0; exit 1', "false", "no successful main-branch run yet"),
    ('[ "$2" = list ] && { echo 42; exit 0; }; exit 1', "false", "run 42 has no artifact gpu-benchmark-main-gpu0"),
    ('[ "$2" = list ] && echo 42; exit 0', "true", ""),
])
def test_a_missing_or_failing_gh_means_no_reference(workflow, tmp_path, gh, found, message):
    fetch = step(workflow, "Fetch the last main-branch result")
    assert fetch["continue-on-error"] is True  # even an unforeseen failure leaves the comparison to run
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gh is not None:
        fake_command(bin_dir, "gh", gh)
    done, outputs = run_step(fetch["run"], tmp_path, {"PATH": str(bin_dir), "REFERENCE": "gpu-benchmark-main-gpu0",
                                                      "GITHUB_REPOSITORY": "owner/stc"})
    assert done.returncode == 0, done.stderr
    assert outputs == {"found": found} and message in done.stdout
    compare = step(workflow, "Compare and gate")
    assert "if" not in compare and compare["env"]["REFERENCE_FOUND"] == "${{ steps.reference.outputs.found }}"


@pytest.mark.parametrize("found, codes, exit_code, bases", [
    ("false", [0], 0, ["new"]),                # no reference: the run is its own BASE
    ("true", [0], 0, ["reference"]),
    ("true", [1], 1, ["reference"]),           # regression fails the job
    ("true", [3], 0, ["reference"]),           # inconclusive only warns
    ("true", [2, 0], 0, ["reference", "new"]),  # reference not comparable: compare with itself
    ("true", [2, 1], 1, ["reference", "new"]),
    ("false", [2], 2, ["new"]),                # a usage error against itself fails the job
])
def test_comparison_exit_codes(workflow, tmp_path, found, codes, exit_code, bases):
    (tmp_path / "reports/ci/default/new").mkdir(parents=True)
    (tmp_path / "reference/default/reference").mkdir(parents=True)
    (tmp_path / "codes").write_text("\n".join(map(str, codes)) + "\n")
    fake_command(tmp_path / ".venv/bin", "stc-bench",
                 'echo "$@" >> calls.log; exit "$(sed -n "$(wc -l < calls.log)p" codes)"')
    done, _ = run_step(step(workflow, "Compare and gate")["run"], tmp_path, {
        "OUT": "reports/ci", "REFERENCE_FOUND": found, "EXPECTATIONS": "e.json", "GITHUB_STEP_SUMMARY": "summary.md"})
    assert done.returncode == exit_code, done.stdout + done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [call.split()[1].rstrip("/").rsplit("/", 1)[1] for call in calls] == bases
    assert all(call.split()[2].rstrip("/").endswith("/new") for call in calls)
    assert ("not comparable" in done.stdout) is (bases == ["reference", "new"])


def invocations(workflow):
    """Every `stc-bench ...` command line in the workflow, variables replaced by sample values."""
    for s in steps(workflow):
        script = re.sub(r"\\\n\s*", " ", s.get("run", ""))
        for line in script.splitlines():
            if "stc-bench " not in line:
                continue
            line = re.sub(r"\$\{\{[^}]*\}\}", "0", line.split("stc-bench ", 1)[1])
            line = line.replace('"', "").replace("$FRAMES", "16")  # no argument has spaces
            yield shlex.split(re.sub(r"\$\{?(\w+)\}?", r"\1", line))


def test_every_stc_bench_call_parses_and_measures_the_only_visible_gpu(workflow):
    from stc_bench.cli import app

    group = typer.main.get_command(app)
    seen = set()
    for args in invocations(workflow):
        name, rest = args[0], args[1:]
        command = group.commands.get(name)
        assert command is not None, f"stc-bench has no command {name!r}"
        context = command.make_context(name, rest)  # raises on an unknown option or a bad value
        if "gpu" in context.params:
            assert context.params["gpu"] == 0, f"stc-bench {' '.join(args)}: the job sees only its GPU, as cuda:0"
        seen.add(name)
    assert {"env", "rekv", "sweep", "compare"} <= seen
