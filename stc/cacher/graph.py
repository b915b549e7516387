"""CUDA-graph replay of the selective layer forward (opt-in, GPU only), without copies.

A selective frame launches many small kernels (row moves, a sort, short matmuls); on a fast GPU
their launch overhead can eat the saved FLOPs. Replaying each layer's selective forward from a
captured CUDA graph turns them into one launch. A graph reads its inputs from, and writes its
outputs to, fixed addresses; copying every input in and every output out on each replay would
add back seven launches per layer, so here nothing is copied where the address is already fixed:

- **References** live in two slots per layer and stream, owned by the graphs. A refresh frame writes its
  keys, values and branch outputs into the slot the stream is not reading (``keep_reference``),
  so a call that fails part-way can still be rolled back to the other slot. Each slot gets its
  own graph, which reads it in place.
- **Inputs** that are another graph's output (layer l + 1 reads layer l's output, later layers
  read layer 0's token index) are read in place; anything else (layer 0's input, a batch mixing
  refresh and selective frames) is copied into a buffer of the graph.
- **Outputs** are handed out as the graph's own buffers, not copies. Lifetime: a layer's output
  is valid until the tower's next selective call (graphs share one memory pool, so any later
  replay may reuse its memory), i.e. until the next frame is fed. The stream
  copies the last layer's output once per call (``stc.cacher.stream``), so the tower's output
  can be kept; callers that keep earlier layers' hidden states across calls
  (``output_hidden_states`` collected frame by frame) must clone them.

So a graph is captured once per layer, reference slot, weights and input shapes (two per layer
in a one-frame stream), and outlives attaches: the integration keeps one ``SelectiveGraphs`` per
tower. Capturing synchronises the device and empties the allocator's cache, so it must happen
outside timed regions: call the tower once, untimed, on a stream of the shapes that will be
timed (stc-bench runs an untimed prepare pass per arm first). Static buffers are written in
inference mode, so a graph captured under ``torch.inference_mode`` can be replayed under
``torch.no_grad`` too. Anywhere a graph cannot be used (CPU tensors, a capture error) the eager
forward runs instead, and a warning is logged once; ``stats`` says which happened.

The capture mechanism is a ``GraphBackend``: ``CUDAGraphBackend`` on GPUs, and
``EmulatedGraphBackend``, which re-runs the forward on the same fixed buffers, so the address
bookkeeping above is exercised on CPU by the tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from stc.cacher.block import LayerOps, LayerReference, selective_forward

logger = logging.getLogger(__name__)

WARMUP_ITERATIONS = 3
"""Eager runs on a side stream before capture, as PyTorch's CUDA-graph documentation does."""

Forward = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class GraphBackend(Protocol):
    """How graphs are captured and replayed on one kind of device."""

    def unsupported(self, x: torch.Tensor) -> str | None:
        """Why tensors like ``x`` cannot be graphed (None when they can)."""
        ...

    def capture(self, forward: Forward, device: torch.device) -> tuple[Callable[[], None], tuple[torch.Tensor, torch.Tensor]]:
        """Capture ``forward`` (which reads only fixed buffers) and return (replay, its fixed outputs)."""
        ...


class CUDAGraphBackend:
    """``torch.cuda.CUDAGraph`` capture, with one capture stream and one memory pool per device."""

    def __init__(self) -> None:
        self._pools: dict[torch.device, object] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def unsupported(self, x: torch.Tensor) -> str | None:
        """CUDA tensors only."""
        return None if x.is_cuda else f"tensors are on {x.device.type}, CUDA graphs need a CUDA device"

    def capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream graphs of ``device`` are warmed up and captured on, one per device.

        ``torch.cuda.graph`` without ``stream=`` uses one class-wide stream made on whichever
        device was current at the process's first capture; a later capture for another GPU on
        that stream would record none of its work (an empty graph replaying stale outputs)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def capture(self, forward: Forward, device: torch.device) -> tuple[Callable[[], None], tuple[torch.Tensor, torch.Tensor]]:
        """Warm up on the device's capture stream, then capture into the device's shared pool."""
        # Everything on the tensors' own GPU: under --gpu N the side stream, the capture stream
        # and the memory pool must belong to device N, not to whatever device is current.
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            stream = self.capture_stream(device)
            try:
                stream.wait_stream(current)  # the static buffers were filled on the current stream
                with torch.cuda.stream(stream):  # warm-up outside the graph, as torch.cuda.graphs requires
                    for _ in range(WARMUP_ITERATIONS):
                        forward()
                current.wait_stream(stream)
                if device not in self._pools:
                    self._pools[device] = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pools[device], stream=stream):
                    outputs = forward()
            finally:
                # When capture_begin or capture_end raises, torch.cuda.graph never leaves its
                # stream context, and every later kernel of this process would go to the capture
                # stream; put the caller's stream back whatever happened.
                torch.cuda.set_stream(current)
        return graph.replay, outputs


class EmulatedGraphBackend:
    """A graph's memory behaviour without CUDA: "replay" re-runs the captured forward on the same
    fixed input buffers and writes the results into the same fixed output tensors. Nothing is
    faster; what it shows is whether the buffers are wired as a real graph would read them."""

    def unsupported(self, x: torch.Tensor) -> str | None:
        """Any device."""
        return None

    def capture(self, forward: Forward, device: torch.device) -> tuple[Callable[[], None], tuple[torch.Tensor, torch.Tensor]]:
        """Run ``forward`` once; replays overwrite its outputs in place."""
        outputs = forward()

        def replay() -> None:
            for fixed, fresh in zip(outputs, forward()):
                fixed.copy_(fresh)

        return replay, outputs


@dataclass
class _Captured:
    replay: Callable[[], None]
    copies: list[torch.Tensor | None]
    """Per input, the graph's buffer it is copied into before a replay (None: read in place)."""
    outputs: tuple[torch.Tensor, torch.Tensor]
    reads: frozenset[tuple] = frozenset()
    """Layouts of the fixed buffers (slots, other graphs' outputs) this graph reads in place."""


@dataclass(frozen=True)
class GraphStats:
    """What the graphs of one tower did since they were created."""

    captures: int
    """Graphs captured (one per layer, reference slot, weights and input shapes)."""
    replays: int
    """Selective forwards served by replaying a graph."""
    eager_calls: int
    """Selective forwards that ran eager because graphs are off."""
    disabled_reason: str | None
    """Why graphs are off (None while they are in use)."""


def _layout(t: torch.Tensor) -> tuple:
    """What identifies a fixed buffer: address, shape, strides and dtype."""
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


class SelectiveGraphs:
    """Captured selective forwards of one tower, keyed by layer, weights, reference slot and shapes."""

    def __init__(self, backend: GraphBackend | None = None) -> None:
        self.backend: GraphBackend = CUDAGraphBackend() if backend is None else backend
        self._captured: dict[tuple, _Captured] = {}
        self._slots: dict[tuple, list[LayerReference]] = {}
        self._fixed: set[tuple] = set()
        """Layouts (address, shape, strides, dtype) of every buffer the graphs own: such a tensor
        is read in place by a graph, never copied."""
        self.disabled_reason: str | None = None
        self._captures = 0
        self._replays = 0
        self._eager = 0

    @property
    def stats(self) -> GraphStats:
        """Captures, replays and eager fallbacks so far (a snapshot: later calls do not change it)."""
        return GraphStats(self._captures, self._replays, self._eager, self.disabled_reason)

    def _fall_back(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.warning("STC-Cacher: CUDA-graph replay is off, running eager (%s)", reason)
            self.disabled_reason = reason

    def active_for(self, x: torch.Tensor) -> bool:
        """Whether selective forwards on tensors like ``x`` will replay graphs (turning graphs off
        for good, with a warning, when they cannot)."""
        if self.disabled_reason is None:
            reason = self.backend.unsupported(x)
            if reason is not None:
                self._fall_back(reason)
        return self.disabled_reason is None

    def keep_reference(self, slot_key: tuple, reference: LayerReference, frame: int,
                       current: LayerReference | None) -> LayerReference:
        """Frame ``frame`` of a refresh batch's ``reference``, written into the reference slot of
        ``slot_key`` (layer, weights, stream id last) that ``current`` (the reference the stream
        reads now) does not occupy; returns the slot. Graphs read the slot in place, so a selective frame copies no reference."""
        slots = self._slots.get(slot_key)
        source = LayerReference(*(t[frame : frame + 1] for t in (reference.keys, reference.values, reference.attn, reference.mlp)))
        if slots is None or slots[0].keys.shape != source.keys.shape or slots[0].keys.dtype != source.keys.dtype:
            # made in the caller's autograd mode, like every fixed buffer, and written in inference mode
            if slots is not None:  # new shapes: the old slots go, and every graph that read them
                self._forget({_layout(t) for slot in slots for t in (slot.keys, slot.values, slot.attn, slot.mlp)})
            slots = [LayerReference(*(torch.empty_like(t, memory_format=torch.contiguous_format)
                                      for t in (source.keys, source.values, source.attn, source.mlp)))
                     for _ in range(2)]
            self._slots[slot_key] = slots
            self._fixed.update(_layout(t) for slot in slots for t in (slot.keys, slot.values, slot.attn, slot.mlp))
        slot = slots[1] if current is not None and current.keys.data_ptr() == slots[0].keys.data_ptr() else slots[0]
        with torch.inference_mode():
            for fixed, fresh in zip((slot.keys, slot.values, slot.attn, slot.mlp),
                                    (source.keys, source.values, source.attn, source.mlp)):
                fixed.copy_(fresh)
        return slot

    def slot_bytes(self) -> dict:
        """Bytes of the reference slots of each stream (slots are keyed by layer, weights and
        stream id, the id last)."""
        out: dict = {}
        for key, slots in self._slots.items():
            out[key[-1]] = out.get(key[-1], 0) + sum(t.numel() * t.element_size() for slot in slots
                                                     for t in (slot.keys, slot.values, slot.attn, slot.mlp))
        return out

    def release_slots(self, stream_id) -> None:
        """Free the reference slots of a stream that left, and the graphs that read them."""
        for key in [key for key in self._slots if key[-1] == stream_id]:
            slots = self._slots.pop(key)
            self._forget({_layout(t) for slot in slots for t in (slot.keys, slot.values, slot.attn, slot.mlp)})

    def _forget(self, layouts: set[tuple]) -> None:
        """Drop buffers about to be freed, and the graphs that read them in place: a later tensor
        at one of those addresses is not theirs. (Graphs of the next layers that read a dropped
        graph's output in place are keyed by its layout too, and go with it.)"""
        while layouts:
            self._fixed -= layouts
            stale = [key for key, captured in self._captured.items() if captured.reads & layouts]
            layouts = {_layout(t) for key in stale for t in self._captured.pop(key).outputs}

    def run(
        self,
        layer_key: tuple,
        ops: LayerOps,
        x: torch.Tensor,
        reference: LayerReference,
        count: int,
        metric: str,
        index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``selective_forward(ops, x, reference, count, metric, index)``, replayed when possible.

        ``layer_key`` identifies the layer and its weights (a graph reads weights by address, so
        a layer whose parameters were replaced must not replay an old graph). The outputs are
        the graph's own buffers: valid until the tower's next selective call."""
        if not self.active_for(x):
            self._eager += 1
            return selective_forward(ops, x, reference, count, metric, index)
        inputs = [x, reference.keys, reference.values, reference.attn, reference.mlp]
        if index is not None:
            inputs.append(index)
        layouts = [_layout(t) for t in inputs]
        in_place = [layout in self._fixed for layout in layouts]
        # Inputs read in place are part of the key by address; copied ones by shape alone.
        key = (layer_key, x.device, count, metric,
               tuple(layout if fixed else layout[1:] for layout, fixed in zip(layouts, in_place)))
        captured = self._captured.get(key)
        if captured is None:
            try:
                captured = self._capture(ops, inputs, in_place, count, metric)
                captured.reads = frozenset(layout for layout, fixed in zip(layouts, in_place) if fixed)
            except Exception as err:  # any capture failure means: run eager, say so once
                self._fall_back(f"capture failed: {type(err).__name__}: {err}")
                self._eager += 1
                return selective_forward(ops, x, reference, count, metric, index)
            self._captured[key] = captured
            self._captures += 1
            self._fixed.update(_layout(t) for t in captured.outputs)
        return self._replay(captured, inputs)

    def _replay(self, captured: _Captured, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the inputs that are not read in place into the graph's buffers, replay it, and
        return its output buffers."""
        # The fixed buffers are made in the autograd mode of the call that captured them: under
        # inference_mode (how stc-bench streams) they are inference tensors, which a later call
        # under no_grad could not write ("Inplace update to inference tensor outside
        # InferenceMode"). Inference mode may write both kinds, so every replay writes there.
        with torch.inference_mode():
            for buffer, value in zip(captured.copies, inputs):
                if buffer is not None:
                    buffer.copy_(value)
            captured.replay()
        self._replays += 1
        return captured.outputs

    def _capture(self, ops: LayerOps, inputs: list[torch.Tensor], in_place: list[bool], count: int,
                 metric: str) -> _Captured:
        # a broadcast reference (one stored frame for S frames) becomes a real buffer here
        copies = [None if fixed else t.clone(memory_format=torch.contiguous_format) for t, fixed in zip(inputs, in_place)]
        reads = [t if buffer is None else buffer for t, buffer in zip(inputs, copies)]

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            x, k, v, a, m, *index = reads
            return selective_forward(ops, x, LayerReference(k, v, a, m), count, metric, index[0] if index else None)

        replay, outputs = self.backend.capture(forward, inputs[0].device)
        return _Captured(replay=replay, copies=copies, outputs=outputs)
