"""Lint of the self-hosted GPU workflow: triggers, runner labels, gates, artifacts, and every
stc-bench invocation parsed by the real CLI (so a renamed option fails here, not on the runner)."""

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

WORKFLOW = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "gpu-benchmark.yml"


@pytest.fixture(scope="module")
def workflow():
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow):
    return workflow["jobs"]["benchmark"]["steps"]


def test_triggers(workflow):
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert {"workflow_dispatch", "schedule", "pull_request"} <= set(triggers)
    assert triggers["schedule"][0]["cron"].count(" ") == 4


def test_runs_on_a_self_hosted_gpu_runner_one_job_per_gpu(workflow):
    job = workflow["jobs"]["benchmark"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert job["strategy"]["matrix"]["gpu"]
    assert "matrix.gpu" in job["concurrency"]["group"] and job["concurrency"]["cancel-in-progress"] is False


def test_preflight_gates_summary_and_artifact(workflow):
    scripts = [s.get("run", "") for s in steps(workflow)]
    assert "nvidia-smi" in scripts[1]
    compare = next(s for s in scripts if "stc-bench compare" in s)
    assert "--fail-on" in compare and "--expect-reduction" in compare and "$GITHUB_STEP_SUMMARY" in compare
    assert any("gh run download" in s and "gpu-benchmark-main-gpu" in s for s in scripts)
    upload = next(s for s in steps(workflow) if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "reports/ci"
    assert "gpu-benchmark-" in upload["with"]["name"] and "matrix.gpu" in upload["with"]["name"]


def invocations(workflow):
    """Every `stc-bench ...` command line in the workflow, variables replaced by sample values."""
    for step in steps(workflow):
        script = re.sub(r"\\\n\s*", " ", step.get("run", ""))
        for line in script.splitlines():
            if "stc-bench " not in line:
                continue
            line = re.sub(r"\$\{\{[^}]*\}\}", "0", line.split("stc-bench ", 1)[1])
            line = line.replace('"', "").replace("$GPU", "0").replace("$FRAMES", "16")  # no argument has spaces
            yield shlex.split(re.sub(r"\$\{?(\w+)\}?", r"\1", line))


def test_every_stc_bench_call_parses(workflow):
    from stc_bench.cli import app

    group = typer.main.get_command(app)
    seen = set()
    for args in invocations(workflow):
        name, rest = args[0], args[1:]
        command = group.commands.get(name)
        assert command is not None, f"stc-bench has no command {name!r}"
        command.make_context(name, rest)  # raises on an unknown option or a bad value
        seen.add(name)
    assert {"env", "rekv", "sweep", "compare"} <= seen
