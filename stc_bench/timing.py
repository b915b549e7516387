"""The only place that creates clocks: CUDA events on a GPU, ``perf_counter_ns`` on a CPU.

A ``StageTimer`` times streamed passes, one after another. Each ``span(stage, chunk)`` records
a start/end mark pair around a stage of one chunk; no host synchronisation happens inside a
timed region. ``finish()`` synchronises once, turns every pair of the pass into milliseconds
and readies the timer for the next pass.

On CUDA the marks are events recorded on the device's current stream. They are created ahead
of the spans (``reserve``) and reused by every later pass, so a timed span does no more host
work than recording an event; a pass that needs more marks than reserved grows the pool, which
only the first (untimed) pass of a run does.

A run placed across several GPUs (``--device-map auto``: the device has ``peers``) still times
each span with one event pair on the run's device, but every mark is a device-side barrier
across all of them: each peer's current stream records a *join* event that the run device's
stream waits for, then the mark is recorded, then every peer's stream waits for the mark. So the
end mark completes only once every GPU has finished the span's work, and no GPU starts a span's
work before its start mark. Why not one event pair per device: CUDA cannot take the time between
events of two devices, and a per-device span would leave out the hand-offs between GPUs (a
pre-fill's layers run one GPU after the other); and why not a host synchronisation: it is not
allowed inside a run's timed rounds. The barrier costs a few event records and stream waits per
mark and nothing on the host; what it removes is overlap between stages on different GPUs (the
next chunk's ViT on GPU 0 while the last GPU finishes the pre-fill), so each stage's time is its
own critical path and the stages add up to the stream's time as on one GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stc_bench.device import Device, forbid_host_syncs


@dataclass(frozen=True)
class Span:
    """One timed stage of one chunk, in milliseconds."""

    stage: str
    chunk: int
    ms: float


class StageTimer:
    """Marks start and end of stages on ``device``.

    With ``forbid_syncs`` every span runs under ``forbid_host_syncs``: any host-device
    synchronisation inside it raises (the self-check's and the tests' way to prove a timed
    region is clean).
    """

    def __init__(self, device: Device, forbid_syncs: bool = False):
        self.device = device
        self.forbid_syncs = forbid_syncs
        self._events: list[torch.cuda.Event] = []
        self._joins: list[torch.cuda.Event] = []  # one per peer; a wait copies the event's state, so one is reused
        self._used = 0
        self._marks: list[tuple[str, int, object, object]] = []

    def reserve(self, spans: int) -> None:
        """Create the CUDA events for ``spans`` spans now, outside any timed region (no-op on CPU)."""
        if self.device.is_cuda:
            with self.device.activate():
                while len(self._events) < 2 * spans:
                    self._events.append(torch.cuda.Event(enable_timing=True))
                while len(self._joins) < len(self.device.peers):
                    self._joins.append(torch.cuda.Event())  # no timing: a join only orders streams

    def _mark(self) -> object:
        if not self.device.is_cuda:
            return time.perf_counter_ns()
        if self._used == len(self._events):
            self.reserve(len(self._events) // 2 + 1)
        event = self._events[self._used]
        self._used += 1
        stream = torch.cuda.current_stream(self.device.torch_device)
        peers = [torch.cuda.current_stream(peer) for peer in self.device.peers]
        for peer, join in zip(peers, self._joins):
            join.record(peer)           # where that GPU's queue stands now
            stream.wait_event(join)     # the mark waits for every GPU's work so far
        event.record(stream)
        for peer in peers:
            peer.wait_event(event)      # and no GPU runs later work before the mark
        return event

    @contextlib.contextmanager
    def span(self, stage: str, chunk: int) -> Iterator[None]:
        """Time the body as ``stage`` of chunk ``chunk``."""
        guard = forbid_host_syncs(self.device) if self.forbid_syncs else contextlib.nullcontext()
        start = self._mark()
        with guard:
            yield
        self._marks.append((stage, chunk, start, self._mark()))

    def finish(self) -> list[Span]:
        """Synchronise once (the device and its peers) and return every span of the pass in
        recording order; the timer is then ready for the next pass (its events are reused)."""
        self.device.synchronize()
        if self.device.is_cuda:
            spans = [Span(s, c, float(a.elapsed_time(b))) for s, c, a, b in self._marks]
        else:
            spans = [Span(s, c, (b - a) / 1e6) for s, c, a, b in self._marks]
        self._marks.clear()
        self._used = 0
        return spans


def wall_clock_ms(device: Device, fn) -> float:
    """Synchronised wall time of ``fn()`` in milliseconds: the reference a span sum is checked
    against (the self-check's timer test and its launch-bound figure)."""
    device.synchronize()
    start = time.perf_counter_ns()
    fn()
    device.synchronize()
    return (time.perf_counter_ns() - start) / 1e6


def host_ms(fn) -> float:
    """Host time of ``fn()`` in milliseconds, without synchronising: how long the host took to
    issue its work (the pre-queued launch check's enqueue time)."""
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def time_call(device: Device, fn, repeats: int, warmup: int = 1) -> list[float]:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; milliseconds each."""
    for _ in range(warmup):
        fn()
    timer = StageTimer(device)
    timer.reserve(repeats)
    for i in range(repeats):
        with timer.span("call", i):
            fn()
    return [s.ms for s in timer.finish()]
