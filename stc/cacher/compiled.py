"""``torch.compile`` of the selective layer forward (opt-in: ``CacherConfig(compile=True)``).

A selective layer is a chain of small operators around a few short matmuls; compiling it fuses
the row moves, residual adds and norms into fewer kernels. One compiled function serves every
layer of every tower: transformers' modules are inlined, so their weights are graph inputs, and
the compiler specialises only on shapes, strides and whether the layer selects or reuses the
selection (about two graphs per tower and frame shape). The first call of each compiles (seconds
to a minute): run one untimed stream first, as stc-bench's prepare pass does.

On CUDA the mode is ``"reduce-overhead"``, which replays CUDA graphs whose outputs the next
replay overwrites; outputs are therefore copied out before they are handed back, since a tower
that returns hidden states keeps every layer's output.
"""

from __future__ import annotations

import functools

import torch

from stc.cacher.block import LayerOps, LayerReference, selective_forward


@functools.lru_cache(maxsize=None)
def _compiled(device_type: str):
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(selective_forward, mode=mode, dynamic=False)


def compiled_selective_forward(
    ops: LayerOps,
    x: torch.Tensor,
    reference: LayerReference,
    count: int,
    metric: str,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_forward`` through ``torch.compile`` (same arguments, same results up to the
    compiler's reordering of float operations)."""
    y, chosen = _compiled(x.device.type)(ops, x, reference, count, metric, index)
    if x.is_cuda:  # a CUDA-graph output lives until the next replay; the caller may keep it longer
        return y.clone(), chosen.clone()
    return y, chosen
