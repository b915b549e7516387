"""CUDA-graph replay of the selective layer forward (opt-in, GPU only).

A selective frame launches many small kernels (gathers, scatters, a top-k, short matmuls);
on a fast GPU their launch overhead can eat the saved FLOPs. Replaying each layer's selective
forward from a captured CUDA graph removes that overhead.

One ``SelectiveGraphs`` belongs to one tower and outlives attaches (the integration keeps it
beside the tower), so a graph is captured once per layer, weights and input shapes, not once
per stream. Capturing synchronises the device and empties the allocator's cache, so it must
happen outside timed regions: call the tower once, untimed, on a stream of the shapes that
will be timed (stc-bench runs an untimed prepare pass per arm first). Each device gets its own
capture stream. Inputs are copied into the graph's static buffers before each replay (in
inference mode, so a graph captured under ``torch.inference_mode`` can be replayed under
``torch.no_grad`` too) and outputs are cloned out of them. Anywhere a graph cannot be used (CPU
tensors, a capture error) the eager forward runs instead, and a warning is logged once;
``stats`` says which happened, so a test or a report can tell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stc.cacher.block import LayerOps, LayerReference, selective_forward

logger = logging.getLogger(__name__)

WARMUP_ITERATIONS = 3
"""Eager runs on a side stream before capture, as PyTorch's CUDA-graph documentation does."""


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class GraphStats:
    """What the graphs of one tower did since they were created."""

    captures: int
    """Graphs captured (one per layer, weights and input shapes)."""
    replays: int
    """Selective forwards served by replaying a graph."""
    eager_calls: int
    """Selective forwards that ran eager because graphs are off."""
    disabled_reason: str | None
    """Why graphs are off (None while they are in use)."""


class SelectiveGraphs:
    """Captured selective forwards of one tower, keyed by layer, weights and input shapes."""

    def __init__(self) -> None:
        self._captured: dict[tuple, _Captured] = {}
        self._pools: dict[torch.device, object] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.disabled_reason: str | None = None
        self._replays = 0
        self._eager = 0

    @property
    def stats(self) -> GraphStats:
        """Captures, replays and eager fallbacks so far (a snapshot: later calls do not change it)."""
        return GraphStats(len(self._captured), self._replays, self._eager, self.disabled_reason)

    def _fall_back(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.warning("STC-Cacher: CUDA-graph replay is off, running eager (%s)", reason)
            self.disabled_reason = reason

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
        a layer whose parameters were replaced must not replay an old graph)."""
        if self.disabled_reason is None and not x.is_cuda:
            self._fall_back(f"tensors are on {x.device.type}, CUDA graphs need a CUDA device")
        if self.disabled_reason is not None:
            self._eager += 1
            return selective_forward(ops, x, reference, count, metric, index)
        inputs = [x, reference.keys, reference.values, reference.attn, reference.mlp]
        if index is not None:
            inputs.append(index)
        key = (layer_key, x.device, count, metric, tuple((t.shape, t.dtype) for t in inputs))
        captured = self._captured.get(key)
        if captured is None:
            try:
                captured = self._capture(ops, inputs, count, metric)
            except Exception as err:  # any capture failure means: run eager, say so once
                self._fall_back(f"capture failed: {type(err).__name__}: {err}")
                self._eager += 1
                return selective_forward(ops, x, reference, count, metric, index)
            self._captured[key] = captured
        return self._replay(captured, inputs)

    def _replay(self, captured: _Captured, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``inputs`` into the graph's static buffers, replay it, return copies of its outputs."""
        # The static buffers are made in the autograd mode of the call that captured them: under
        # inference_mode (how stc-bench streams) they are inference tensors, which a later call
        # under no_grad could not write ("Inplace update to inference tensor outside
        # InferenceMode"). Inference mode may write both kinds, so every replay writes there.
        with torch.inference_mode():
            for static, value in zip(captured.inputs, inputs):
                static.copy_(value)
            captured.graph.replay()
        self._replays += 1
        y, chosen = captured.outputs
        # Cloned in the caller's own mode, so it gets the kind of tensor an eager forward gives it
        # (a clone of an inference tensor made outside inference mode is a normal tensor).
        return y.clone(), chosen.clone()

    def _capture_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream this tower's graphs are warmed up and captured on, one per device.

        ``torch.cuda.graph`` without ``stream=`` uses one class-wide stream made on whichever
        device was current at the process's first capture; a later capture for another GPU on
        that stream would record none of its work (an empty graph replaying stale outputs)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _capture(self, ops: LayerOps, inputs: list[torch.Tensor], count: int, metric: str) -> _Captured:
        device = inputs[0].device
        static = [t.clone() for t in inputs]  # expanded references become real buffers here

        def forward():
            x, k, v, a, m, *index = static
            return selective_forward(ops, x, LayerReference(k, v, a, m), count, metric, index[0] if index else None)

        # Everything on the tensors' own GPU: under --gpu N the side stream, the capture stream
        # and the memory pool must belong to device N, not to whatever device is current.
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            stream = self._capture_stream(device)
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
        return _Captured(graph=graph, inputs=static, outputs=outputs)
