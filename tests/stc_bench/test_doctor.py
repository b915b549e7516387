"""The self-check (``stc-bench doctor``): its CPU subset here, its GPU checks under ``-m gpu``.

The GPU tests call the same check functions as ``stc-bench doctor --gpu N`` and fail on any
FAIL, so ``pytest -m gpu`` on a GPU machine and the doctor agree.
"""

import pytest
import torch

from stc_bench import doctor
from stc_bench.device import HOST_READS, Device, HostSyncError, forbid_host_syncs, host_resident, resolve_device
from stc_bench.measurement import launch_verdict
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


BLOCKING = (
    ("torch.cuda.synchronize", lambda: torch.cuda.synchronize()),
    ("torch.cuda.empty_cache", lambda: torch.cuda.empty_cache()),
    ("torch.cuda.Event.synchronize", lambda: torch.cuda.Event.synchronize(object())),
    ("torch.cuda.Stream.synchronize", lambda: torch.cuda.Stream.synchronize(object())),
    ("torch.cuda.CUDAGraph.capture_begin", lambda: torch.cuda.CUDAGraph.capture_begin(object())),
)


def _blocking_originals():
    return (torch.cuda.synchronize, torch.cuda.empty_cache, vars(torch.cuda.Event)["synchronize"],
            vars(torch.cuda.Stream)["synchronize"], vars(torch.cuda.CUDAGraph)["capture_begin"])


@pytest.mark.parametrize(("what", "call"), BLOCKING, ids=[b[0] for b in BLOCKING])
def test_a_blocking_cuda_call_inside_a_strict_span_raises_before_torch_sees_it(what, call):
    """set_sync_debug_mode misses these (and a graph capture, which calls synchronize and
    empty_cache); the guard refuses them on every device, so on a CPU-only torch the guard's
    error comes first, not torch's "not compiled with CUDA"."""
    originals = _blocking_originals()
    timer = StageTimer(CPU, forbid_syncs=True)
    with pytest.raises(HostSyncError, match=f"{what}\\(\\) inside a timed span: it blocks the host"):
        with timer.span("vit", 0):
            call()
    assert _blocking_originals() == originals  # restored after the error


def test_device_synchronize_of_a_gpu_inside_a_strict_span_raises():
    gpu = Device(torch.device("cuda", 0))  # only its synchronize() is called: no CUDA needed
    with pytest.raises(HostSyncError, match="torch.cuda.synchronize"):
        with forbid_host_syncs(CPU):
            gpu.synchronize()


def test_cuda_guard_sets_sync_debug_mode_and_refuses_the_calls_it_misses(monkeypatch):
    """The CUDA branch, run with fakes: sync debug mode "error" inside, the previous mode after
    (also after an error), the blocking calls refused, tensor methods left to the debug mode."""
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    originals = _blocking_originals()
    gpu = Device(torch.device("cuda", 0))
    with pytest.raises(HostSyncError, match="torch.cuda.empty_cache"):
        with forbid_host_syncs(gpu):
            assert modes == ["error"]
            assert torch.tensor(3).item() == 3  # on a GPU the debug mode judges reads by where the tensor is
            torch.cuda.empty_cache()
    assert modes == ["error", 0]
    assert _blocking_originals() == originals


@pytest.mark.tier1
def test_no_framework_or_arm_syncs_inside_a_span_on_cpu():
    results = doctor.check_no_host_syncs(CPU)
    assert len(results) == 8  # 4 frameworks x (baseline, +STC)
    assert all(r.status == doctor.PASS for r in results), [r for r in results if r.status != doctor.PASS]


def test_strict_pass_streams_twelve_frames_in_several_calls_and_checks_graphs_arms():
    """Dispider gets calls of 4 frames (its own 16 would be one call); LiveCC, whose tower offers
    no graphs, gets a SKIP for its graphs arm; elsewhere the graphs arm must prove, from its graph
    statistics, that it replayed graphs: on a CPU it cannot, so it fails."""
    results = doctor.check_no_host_syncs(CPU, frameworks=("dispider", "livecc"), graphs=True)
    assert [r.status for r in results] == [doctor.PASS, doctor.PASS, doctor.FAIL, doctor.PASS, doctor.PASS, doctor.SKIP]
    assert results[0].figure.startswith("3 spans, 12 frames, --chunk-frames 4")
    assert results[3].figure.startswith("8 spans, 12 frames")  # LiveCC: 6 frames, then 3 one-group steps
    assert results[2].name.endswith(" graphs")
    assert "no graph_stats" in results[2].figure or "ran eager: tensors are on cpu" in results[2].figure
    assert "not available for Qwen2-VL towers" in results[5].figure


def test_graph_use_of_a_timed_pass_is_judged_from_stats_before_and_after_it():
    from stc.cacher.graph import GraphStats

    before = GraphStats(captures=4, replays=10, eager_calls=0, disabled_reason=None)
    assert doctor.graph_use_problems(before, GraphStats(4, 20, 0, None)) == ([], 10)
    problems, _ = doctor.graph_use_problems(before, GraphStats(6, 20, 0, None))
    assert problems == ["2 graphs captured in the timed pass (capture belongs in the untimed prepare pass)"]
    problems, _ = doctor.graph_use_problems(before, GraphStats(4, 10, 3, "capture failed: HostSyncError: ..."))
    assert problems == ["ran eager: capture failed: HostSyncError: ..."]
    assert doctor.graph_use_problems(before, GraphStats(4, 10, 0, None))[0] == ["no graph replayed in the timed pass"]
    assert "no graph_stats" in doctor.graph_use_problems(None, None)[0][0]


def test_launch_verdict_compares_spans_with_the_same_pass_pre_queued():
    assert launch_verdict(130.0, 100.0, 40.0, 200.0).startswith("launch-bound (+30% over pre-queued)")
    assert launch_verdict(110.0, 100.0, 40.0, 200.0) == "GPU-bound (+10% over pre-queued)"
    assert launch_verdict(300.0, 100.0, 250.0, 200.0).startswith("no verdict: the host took 250.0 ms")


def test_kv_cache_estimate_of_qwen2_7b():
    from stc_bench.frameworks.parts import QWEN2

    # 28 layers x 4 KV heads x 128 wide, keys and values, fp16: 57344 bytes per token
    assert doctor.kv_cache_gib(QWEN2["full"], 2**15, 2) == pytest.approx(57344 * 2**15 / 2**30)


def test_run_checks_keep_the_device_current_for_every_check(monkeypatch):
    import contextlib

    current = []
    seen = []

    @contextlib.contextmanager
    def activate(self):
        current.append(self)
        yield
        current.pop()

    monkeypatch.setattr(Device, "activate", activate)
    for name in ("check_timer", "check_no_host_syncs", "check_cuda_graphs", "check_full_builds"):
        monkeypatch.setattr(doctor, name, lambda device, name=name: seen.append((name, list(current))) or [])
    for name in ("check_null_arm", "check_launch_bound"):
        monkeypatch.setattr(doctor, name, lambda device, scale, name=name: seen.append((name, list(current))) or [])
    monkeypatch.setattr(doctor, "check_clocks", lambda device, when: seen.append(("clocks", list(current))) or
                        doctor.CheckResult("clocks", doctor.INFO, when))
    list(doctor.run_checks(CPU, "tiny"))
    assert len(seen) == 8 and all(active == [CPU] for _, active in seen)
    assert current == []


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


@pytest.mark.tier1
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
