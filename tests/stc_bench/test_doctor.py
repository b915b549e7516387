"""The self-check (``stc-bench doctor``): its CPU subset here, its GPU checks under ``-m gpu``.

The GPU tests call the same check functions as ``stc-bench doctor --gpu N`` and fail on any
FAIL, so ``pytest -m gpu`` on a GPU machine and the doctor agree.
"""

import pytest
import torch

from stc_bench import doctor
from stc_bench.device import HOST_READS, HostSyncError, forbid_host_syncs, host_resident, resolve_device
from stc_bench.timing import StageTimer

CPU = resolve_device("cpu")


def test_a_host_read_inside_a_strict_span_raises_and_host_metadata_is_allowed():
    timer = StageTimer(CPU, forbid_syncs=True)
    grid = host_resident(torch.tensor([[1, 4, 4]]))
    with timer.span("vit", 0):
        assert grid.tolist() == [[1, 4, 4]]
    for read in (lambda t: t.item(), lambda t: t.tolist(), lambda t: t.cpu(), lambda t: int(t), lambda t: bool(t)):
        with pytest.raises(HostSyncError, match="inside a timed span: on a GPU this waits for the device"):
            with timer.span("vit", 1):
                read(torch.tensor(3))
    assert torch.tensor(3).item() == 3  # the methods are restored outside the span
    assert all(getattr(torch.Tensor, name).__name__ != "read" for name in HOST_READS)


def test_guard_restores_tensor_methods_after_an_error():
    with pytest.raises(HostSyncError):
        with forbid_host_syncs(CPU):
            torch.ones(1).item()
    assert torch.ones(1).item() == 1.0


def test_no_framework_or_arm_syncs_inside_a_span_on_cpu():
    results = doctor.check_no_host_syncs(CPU)
    assert len(results) == 8  # 4 frameworks x (baseline, +STC)
    assert all(r.status == doctor.PASS for r in results), [r for r in results if r.status != doctor.PASS]


def test_a_sync_inside_a_span_is_reported_with_the_operation(monkeypatch):
    from stc_bench.frameworks.dispider import DispiderPipeline

    original = DispiderPipeline.stream

    def stream_with_a_sync(self, clip, arm, timer, chunk_frames, capture=False):
        real_span = timer.span

        def span(stage, chunk):
            with real_span(stage, chunk):
                clip.sum().item()  # what a careless edit inside a timed region would do
                yield

        import contextlib

        timer.span = contextlib.contextmanager(span)
        return original(self, clip, arm, timer, chunk_frames, capture)

    monkeypatch.setattr(DispiderPipeline, "stream", stream_with_a_sync)
    results = doctor.check_no_host_syncs(CPU, frameworks=("dispider",))
    assert [r.status for r in results] == [doctor.FAIL, doctor.FAIL]
    assert "HostSyncError: Tensor.item() inside a timed span" in results[0].figure


def test_gpu_only_checks_say_they_were_skipped_on_cpu():
    for results in (doctor.check_timer(CPU), doctor.check_cuda_graphs(CPU), doctor.check_full_builds(CPU)):
        assert [r.status for r in results] == [doctor.SKIP]
        assert "needs a CUDA device" in results[0].figure


def test_null_arm_and_launch_bound_checks_report_their_figures():
    """Structure only: whether the null arm PASSes is a timing question, measured by the doctor."""
    (null,) = doctor.check_null_arm(CPU, scale="tiny", frames=2, repeats=2, frameworks=("dispider",))
    assert null.name == "null arm (--interval 1): dispider vit" and null.status in (doctor.PASS, doctor.FAIL)
    assert "reduction" in null.figure and "tiny, 2 frames, n=2" in null.figure
    spans = doctor.check_launch_bound(CPU, scale="tiny", frameworks=("dispider",))
    assert [r.status for r in spans] == [doctor.INFO, doctor.INFO]
    assert all("spans" in r.figure and "wall" in r.figure for r in spans)


def test_doctor_command_exits_1_naming_the_failed_check(cli, monkeypatch):
    def failing_null_arm(device, scale="auto", **_):
        return [doctor.CheckResult("null arm (--interval 1): rekv vit", doctor.FAIL, "reduction +9.0%")]

    monkeypatch.setattr(doctor, "check_null_arm", failing_null_arm)
    monkeypatch.setattr(doctor, "check_launch_bound", lambda device, scale="auto": [])
    result = cli("doctor", "--device", "cpu", "--scale", "tiny")
    assert result.exit_code == 1
    assert "PASS no host sync in spans: rekv baseline" in result.output
    assert "SKIP CUDA graphs" in result.output
    assert "error: 1 of" in result.output and "checks failed: null arm (--interval 1): rekv vit" in result.output


def test_doctor_command_passes_when_every_check_passes(cli, monkeypatch):
    monkeypatch.setattr(doctor, "check_null_arm", lambda device, scale="auto": [])
    monkeypatch.setattr(doctor, "check_launch_bound", lambda device, scale="auto": [])
    result = cli("doctor", "--device", "cpu")
    assert result.exit_code == 0 and "FAIL" not in result.output


def _assert_no_failure(results):
    failed = [r for r in results if r.status == doctor.FAIL]
    assert not failed, failed


@pytest.fixture
def gpu():
    return resolve_device("cuda:0")


@pytest.mark.gpu
def test_gpu_timer_agrees_with_wall_clock(gpu):
    _assert_no_failure(doctor.check_timer(gpu))


@pytest.mark.gpu
def test_gpu_no_host_syncs_inside_spans_with_and_without_graphs(gpu):
    results = doctor.check_no_host_syncs(gpu)
    assert any("graphs" in r.name for r in results)
    _assert_no_failure(results)


@pytest.mark.gpu
def test_gpu_cuda_graphs_replay_and_match_eager(gpu):
    _assert_no_failure(doctor.check_cuda_graphs(gpu))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_full_fp16_builds(gpu):
    _assert_no_failure(doctor.check_full_builds(gpu))


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_null_arm_measures_no_reduction(gpu):
    _assert_no_failure(doctor.check_null_arm(gpu))
