"""What each stage launches, and whether the GPU waits for the host to launch it.

A selective ViT layer is a chain of small operators: at batch 1 on a fast GPU the host may take
longer to launch them than the GPU takes to run them, and then a reduction in FLOPs buys little.
Two figures per arm and stage tell a user when that happens, each from one untimed pass:

- **operators per frame**: the operators a stage dispatches, counted by a dispatch mode (views
  and other metadata-only operators left out) under ``no_grad``, where composite operators
  (linear, cosine similarity) are split into those that run, divided by the frames of the pass.
  Each launches at least one kernel on a GPU; a CUDA-graph replay dispatches nothing, so a
  replayed layer counts 0 here (the graph itself is one launch). The same code path counts on
  CPU and GPU. Compiled arms (``--compile``) get no count: torch.compile does not compile under
  a dispatch mode, so what it would count is not what the timed passes run.
- **pre-queued spans** (CUDA only): the stage's span sum in a pass enqueued behind a sleep kernel.
  The GPU then never waits for a launch, so those spans are GPU time alone; when the normal
  spans exceed them by more than ``LAUNCH_BOUND_EXCESS`` (in ``stc_bench.measurement``) the stage is launch-bound
  (``stc_bench.measurement.launch_verdict``), and raising ``--chunk-frames`` or replaying CUDA graphs would help.
  A CPU runs each operator as it is issued: there is no launch queue to judge there.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stc_bench.device import Device
from stc_bench.measurement import StageLaunches
from stc_bench.timing import StageTimer, host_ms, wall_clock_ms

if TYPE_CHECKING:
    from stc_bench.frameworks.framework import Pipeline
    from stc_bench.methods.method import Arm

PREQUEUE_HEAD_START = 2.0
"""The sleep kernel that pre-queues a pass lasts this many times the pass's wall time."""
METADATA_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.transpose", "aten.permute", "aten.expand", "aten.unsqueeze",
    "aten.squeeze", "aten.t", "aten.detach", "aten.alias", "aten.slice", "aten.select", "aten.split",
    "aten.split_with_sizes", "aten.unbind", "aten.as_strided", "aten.lift_fresh",
})
"""Operators that only make a new view of the same memory (or wrap a constant): they launch nothing."""


class OperatorCounter(TorchDispatchMode):
    """Counts the operators that launch work while active, by name, under ``owner`` (a key the
    code being counted may change as it runs: the stage or layer in progress)."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: object = None
        self.by_owner: dict[object, collections.Counter] = collections.defaultdict(collections.Counter)

    @property
    def counts(self) -> collections.Counter:
        """Counts over all owners."""
        return sum(self.by_owner.values(), collections.Counter())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in METADATA_OPS:
            self.by_owner[self.owner][name] += 1
        return func(*args, **(kwargs or {}))


class CountingTimer(StageTimer):
    """A timer whose spans also count the operators they dispatch, under the stage's name as
    ``counter``'s owner (the counter must be active around the pass)."""

    def __init__(self, device: Device, counter: OperatorCounter):
        super().__init__(device)
        self._counter = counter

    @contextlib.contextmanager
    def span(self, stage: str, chunk: int) -> Iterator[None]:
        with super().span(stage, chunk):
            self._counter.owner = stage
            try:
                yield
            finally:
                self._counter.owner = None


def sleep_on(device: Device, cycles: int) -> None:
    """Enqueue a kernel that spins ``cycles`` GPU clock cycles on ``device``'s current stream.

    Only the launch runs with ``device`` current: a timer around it must find its device's
    stream by itself, not by following the current device."""
    with torch.cuda.device(device.torch_device):
        torch.cuda._sleep(cycles)


def sleep_cycles_per_ms(device: Device) -> float:
    """How many ``torch.cuda._sleep`` cycles take one millisecond on ``device`` (wall-clock probe)."""
    probe_cycles = 10_000_000
    sleep_on(device, probe_cycles)  # the first launch loads the kernel: keep it out of the probe
    probe_ms = wall_clock_ms(device, lambda: sleep_on(device, probe_cycles))
    return probe_cycles / max(probe_ms, 1e-3)


def _stage_sums(spans) -> dict[str, float]:
    """Milliseconds per stage, summed over the chunks of one pass."""
    sums: dict[str, float] = collections.defaultdict(float)
    for span in spans:
        sums[span.stage] += span.ms
    return dict(sums)


def prequeued_pass(pipeline: Pipeline, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
                   device: Device, sleep_cycles: int) -> tuple[dict[str, float], float]:
    """Per-stage span sums of one pass enqueued behind a sleep kernel, and the host's enqueue time (ms)."""
    device.synchronize()
    sleep_on(device, sleep_cycles)
    enqueue_ms = host_ms(lambda: pipeline.stream(clip, arm, timer, chunk_frames))
    return _stage_sums(timer.finish()), enqueue_ms


def profile_launches(pipeline: Pipeline, clip: torch.Tensor, arm: Arm, device: Device, chunk_frames: int,
                     cycles_per_ms: float | None = None) -> dict[str, StageLaunches]:
    """The launch figures of every stage of ``arm``, from untimed passes over ``clip`` (run it
    after the arm's prepare pass, so one-time work is done). ``cycles_per_ms``: the sleep
    kernel's rate (``sleep_cycles_per_ms``; probed here when not given); CUDA only."""
    frames = clip.shape[0] * clip.shape[1] if clip.dim() == 5 else clip.shape[0]  # every stream's frames
    counter = OperatorCounter()
    timer = CountingTimer(device, counter)
    compiled = bool(dict(arm.knobs).get("compile", False))
    # Out of inference mode (which a run's passes are under), so composite operators split; a
    # compiled arm is not counted and stays in inference mode, or torch would compile it again.
    mode = torch.inference_mode() if compiled else torch.inference_mode(False)
    with mode, torch.no_grad(), (contextlib.nullcontext() if compiled else counter):
        pipeline.stream(clip, arm, timer, chunk_frames)
    spans = timer.finish()
    stages = list(dict.fromkeys(span.stage for span in spans))
    per_frame = {stage: None if compiled else sum(counter.by_owner[stage].values()) / frames for stage in stages}
    if not device.is_cuda:
        return {stage: StageLaunches(n) for stage, n in per_frame.items()}
    with torch.inference_mode():
        plain = StageTimer(device)
        plain.reserve(len(spans))  # events made here, not inside the reference pass's spans
        reference_spans: list = []

        def normal_pass() -> None:
            pipeline.stream(clip, arm, plain, chunk_frames)
            reference_spans.extend(plain.finish())

        wall = wall_clock_ms(device, normal_pass)
        head_start = PREQUEUE_HEAD_START * wall
        rate = sleep_cycles_per_ms(device) if cycles_per_ms is None else cycles_per_ms
        prequeued, enqueue = prequeued_pass(pipeline, clip, arm, plain, chunk_frames, device, int(head_start * rate))
    normal = _stage_sums(reference_spans)
    return {stage: StageLaunches(n, prequeued.get(stage), normal.get(stage), enqueue, head_start)
            for stage, n in per_frame.items()}
