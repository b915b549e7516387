"""CUDA-graph replay of the selective layer forward (opt-in, GPU only).

A selective frame launches many small kernels (gathers, scatters, a top-k, short matmuls);
on a fast GPU their launch overhead can eat the saved FLOPs. Replaying each layer's selective
forward from a captured CUDA graph removes that overhead. One graph is captured per layer and
input shape, on first use; inputs are copied into the graph's static buffers before each replay
and outputs are cloned out of them. Anywhere a graph cannot be used (CPU tensors, a capture
error) the eager forward runs instead, and a warning is logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from stc.cacher.block import LayerOps, LayerReference, selective_forward

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, torch.Tensor]


class SelectiveGraphs:
    """Captured selective forwards of one tower, keyed by layer and input shapes."""

    def __init__(self) -> None:
        self._captured: dict[tuple, _Captured] = {}
        self._pool = None
        self.disabled_reason: str | None = None

    def _fall_back(self, reason: str) -> None:
        if self.disabled_reason is None:
            logger.warning("STC-Cacher: CUDA-graph replay is off, running eager (%s)", reason)
            self.disabled_reason = reason

    def run(
        self,
        layer_index: int,
        ops: LayerOps,
        x: torch.Tensor,
        reference: LayerReference,
        count: int,
        metric: str,
        index: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``selective_forward(ops, x, reference, count, metric, index)``, replayed when possible."""
        if self.disabled_reason is None and not x.is_cuda:
            self._fall_back(f"tensors are on {x.device.type}, CUDA graphs need a CUDA device")
        if self.disabled_reason is not None:
            return selective_forward(ops, x, reference, count, metric, index)
        inputs = [x, reference.keys, reference.values, reference.attn, reference.mlp]
        if index is not None:
            inputs.append(index)
        key = (layer_index, count, metric, tuple((t.shape, t.dtype) for t in inputs))
        captured = self._captured.get(key)
        if captured is None:
            try:
                captured = self._capture(ops, inputs, count, metric)
            except Exception as err:  # any capture failure means: run eager, say so once
                self._fall_back(f"capture failed: {type(err).__name__}: {err}")
                return selective_forward(ops, x, reference, count, metric, index)
            self._captured[key] = captured
        for static, value in zip(captured.inputs, inputs):
            static.copy_(value)
        captured.graph.replay()
        y, chosen = captured.outputs
        return y.clone(), chosen.clone()

    def _capture(self, ops: LayerOps, inputs: list[torch.Tensor], count: int, metric: str) -> _Captured:
        static = [t.clone() for t in inputs]  # expanded references become real buffers here

        def forward():
            x, k, v, a, m, *index = static
            return selective_forward(ops, x, LayerReference(k, v, a, m), count, metric, index[0] if index else None)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs requires
            forward()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = forward()
        return _Captured(graph=graph, inputs=static, outputs=outputs)
