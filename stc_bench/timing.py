"""The only place that creates clocks: CUDA events on a GPU, ``perf_counter_ns`` on a CPU.

A ``StageTimer`` lives for one streamed pass (one repeat of one arm). Each ``span(stage)``
records a start/end mark pair around a stage of one chunk; no host synchronisation happens
inside a timed region. ``finish()`` synchronises once and turns every pair into milliseconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stc_bench.device import Device


@dataclass(frozen=True)
class Span:
    """One timed stage of one chunk, in milliseconds."""

    stage: str
    chunk: int
    ms: float


class StageTimer:
    """Marks start and end of stages on ``device``; CUDA events are recorded on the current stream."""

    def __init__(self, device: Device):
        self.device = device
        self._marks: list[tuple[str, int, object, object]] = []

    def _mark(self) -> object:
        if self.device.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    @contextlib.contextmanager
    def span(self, stage: str, chunk: int) -> Iterator[None]:
        """Time the body as ``stage`` of chunk ``chunk``."""
        start = self._mark()
        yield
        self._marks.append((stage, chunk, start, self._mark()))

    def finish(self) -> list[Span]:
        """Synchronise once and return every span in recording order."""
        self.device.synchronize()
        if self.device.is_cuda:
            spans = [Span(s, c, float(a.elapsed_time(b))) for s, c, a, b in self._marks]
        else:
            spans = [Span(s, c, (b - a) / 1e6) for s, c, a, b in self._marks]
        self._marks.clear()
        return spans


def time_call(device: Device, fn, repeats: int, warmup: int = 1) -> list[float]:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; milliseconds each."""
    for _ in range(warmup):
        fn()
    timer = StageTimer(device)
    for i in range(repeats):
        with timer.span("call", i):
            fn()
    return [s.ms for s in timer.finish()]
