"""The stc-bench command line, through typer's CliRunner."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.stc_bench.conftest import TINY_RUN, TOY, TOY_RUN


def run_folder(out: Path) -> Path:
    (folder,) = list(out.iterdir())
    return folder


def check_run_writes_its_folder_and_rerenders(cli, run: list[str], framework: str, tmp_path) -> None:
    """``stc-bench <run>`` writes the run folder and its report; ``report`` re-renders it from results.json alone."""
    result = cli(*run, "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = run_folder(tmp_path)
    assert folder.name.endswith(f"_{framework}_cpu")
    for name in ("results.json", "samples.csv", "summary.csv", "reductions.csv", "report.md", "latency.png", "per_frame_vit.png"):
        assert (folder / name).is_file(), name
    assert "scale tiny (--scale tiny was requested)" in result.output
    assert "reduction median [95% CI]" in result.output and "random weights" in result.output

    again = cli("report", str(folder / "results.json"), "--out", str(tmp_path / "again"))
    assert again.exit_code == 0
    assert (tmp_path / "again" / "summary.csv").read_text() == (folder / "summary.csv").read_text()


@pytest.mark.slow
@pytest.mark.tier1
def test_tiny_end_to_end_run_writes_the_run_folder(cli, tmp_path):
    check_run_writes_its_folder_and_rerenders(cli, TINY_RUN, "rekv", tmp_path)


def test_toy_run_writes_the_run_folder_and_report_rerenders_it(cli, toy, tmp_path):
    """The run folder a command writes, and re-rendering it from results.json, on the toy framework
    (the test above does the same on ReKV, end to end)."""
    check_run_writes_its_folder_and_rerenders(cli, TOY_RUN, "toy", tmp_path)


def test_options_reach_the_config(cli, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("stc_bench.cli.run_and_report", lambda config: seen.setdefault("config", config))
    result = cli("rekv", "-f", "8,16", "-f", "32", "--ratio", "0.5", "--interval", "4", "--tokens-per-frame", "32",
                 "--repeats", "7", "--warmup", "0", "--selection", "per_layer", "--metric", "l2", "--out", str(tmp_path))
    assert result.exit_code == 0
    config = seen["config"]
    assert config.frames == (8, 16, 32) and config.ratios == (0.5,) and config.intervals == (4,)
    assert config.tokens_per_frame == (32,) and config.repeats == 7 and config.warmup == 0
    assert (config.selection, config.metric, config.device, config.scale) == ("per_layer", "l2", "auto", "auto")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.5"], "--ratio 1.5: must be in (0, 1]"),
        (["--ratio", "0"], "--ratio 0.0: must be in (0, 1]"),
        (["--interval", "0"], "--interval 0: must be a whole number >= 1"),
        (["--frames", "0"], "--frames 0: must be a whole number >= 1"),
        (["--frames", "many"], "--frames 'many': not a whole number"),
        (["--tokens-per-frame", "0"], "--tokens-per-frame 0: must be a whole number >= 1"),
        (["--scale", "huge"], "--scale huge: must be one of auto, full, small, tiny"),
        (["--gpu", "-1"], "--gpu -1: must be a GPU index >= 0"),
        (["--repeats", "0"], "--repeats 0: must be a whole number >= 1"),
    ],
)
def test_bad_options_exit_2_with_one_line(cli, tmp_path, args, message):
    result = cli("rekv", *args, "--out", str(tmp_path))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_gpu_without_cuda_names_the_fix(cli, tmp_path):
    result = cli(*TINY_RUN, "--gpu", "0", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "CUDA is not available on this machine" in result.output and "leave out --gpu" in result.output


def test_bad_video_checkpoint_and_output_exit_2(cli, tmp_path):
    bad_video = tmp_path / "clip.mp4"
    bad_video.write_text("text")
    result = cli(*TINY_RUN, "--device", "cpu", "--video", str(bad_video), "--out", str(tmp_path / "o1"))
    assert result.exit_code == 2 and "not a readable video" in result.output
    assert not (tmp_path / "o1").exists()  # no empty run folder left behind, nor the --out folder made for it

    result = cli("rekv", "--checkpoint", str(tmp_path / "nowhere"), "--device", "cpu", "--frames", "2", "--out", str(tmp_path / "o2"))
    assert result.exit_code == 2 and "--checkpoint" in result.output and "no such directory" in result.output

    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(*TINY_RUN, "--device", "cpu", "--out", str(blocker))
    assert result.exit_code == 2 and "pass a writable --out" in result.output


@pytest.mark.slow
@pytest.mark.tier1
def test_local_checkpoint_is_loaded_offline(cli, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    from stc_bench.frameworks.rekv import SHAPES, llava_onevision_config

    model = LlavaOnevisionForConditionalGeneration(llava_onevision_config(SHAPES["tiny"]))
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    result = cli("rekv", "--checkpoint", str(tmp_path / "ckpt"), "--device", "cpu", "--frames", "2",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "checkpoint" in result.output and "random weights" not in result.output


@pytest.mark.tier1
def test_list_and_env(cli):
    listed = cli("list")
    assert listed.exit_code == 0 and "rekv" in listed.output and "Qwen2-7B" in listed.output
    env = cli("env")
    assert env.exit_code == 0 and "torch" in env.output and "transformers" in env.output


def test_help_does_not_import_torch():
    code = ("import sys, stc_bench; from stc_bench.cli import app; assert stc_bench.BenchConfig().framework == 'rekv'; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "stc_bench.cli", "rekv", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--tokens-per-frame" in out.stdout and "--checkpoint" in out.stdout


def test_out_of_memory_reports_the_settings_and_keeps_what_was_measured(cli, toy, tmp_path, monkeypatch):
    import stc_bench.runner as runner

    real_pass, calls = runner._timed_pass, {"n": 0}

    def runs_out_at_the_second_frame_count(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 8:  # frames 2: (1 warm-up + 3 repeats) x 2 arms, then frames 4 fails
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(runner, "_timed_pass", runs_out_at_the_second_frame_count)
    result = cli(*TOY, "--frames", "2,4", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "CUDA out of memory at --frames 4 (scale tiny, dtype float32, --chunk-frames 1)" in result.output
    folder = run_folder(tmp_path)
    from stc_bench.results import load_results

    saved = load_results(folder)
    assert saved.frame_counts == [2] and not saved.complete
    assert "CUDA out of memory" in (folder / "report.md").read_text()


def test_out_of_memory_while_building_reports_the_settings_and_keeps_the_run_folder(cli, tmp_path, monkeypatch):
    from stc_bench.frameworks import rekv

    def too_big(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setattr(rekv, "FRAMEWORK", dataclasses.replace(rekv.FRAMEWORK, build=too_big))
    result = cli(*TINY_RUN, "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "CUDA out of memory while building rekv (scale tiny, dtype float32, on cpu); try a smaller --scale" in result.output
    assert "Traceback" not in result.output
    folder = run_folder(tmp_path)
    from stc_bench.results import load_results

    saved = load_results(folder)
    assert saved.errors == [result.output.split("error: ")[1].strip()] and not saved.measurements
    assert f"what was measured is in {folder}" in result.output


def test_the_run_happens_with_its_device_current(tiny_result, monkeypatch):
    """--gpu N: every stream, event and graph of the run must land on GPU N, so the whole run
    (build included) happens inside the device's activate() block."""
    from stc_bench.config import BenchConfig
    from stc_bench.device import Device
    from stc_bench.frameworks import dispider
    from stc_bench.runner import run_benchmark

    events = []
    real_activate, real_build = Device.activate, dispider.build

    class Recording:
        def __init__(self, device):
            self.inner = real_activate(device)

        def __enter__(self):
            events.append("enter")
            return self.inner.__enter__()

        def __exit__(self, *exc):
            events.append("exit")
            return self.inner.__exit__(*exc)

    def recording_build(*args, **kwargs):
        events.append("build")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(Device, "activate", lambda self: Recording(self))
    monkeypatch.setattr(dispider, "FRAMEWORK", dataclasses.replace(dispider.FRAMEWORK, build=recording_build))
    run_benchmark(BenchConfig(framework="dispider", scale="tiny", device="cpu", frames=(2,), repeats=1, warmup=0))
    assert events[0] == "enter" and events[-1] == "exit" and "build" in events[1:-1]


def test_a_cuda_graph_run_that_ran_eager_says_so(cli, toy, tmp_path):
    result = cli(*TOY_RUN, "--device", "cpu", "--cuda-graph", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = run_folder(tmp_path)
    report = (folder / "report.md").read_text()
    assert "--cuda-graph was asked for, but these arms ran eager: stc r0.25 N2 k64 (tensors are on cpu" in report
    from stc_bench.results import load_results

    graphs = load_results(folder).compared[0].graphs
    assert graphs["replays"] == 0 and graphs["eager_calls"] > 0
