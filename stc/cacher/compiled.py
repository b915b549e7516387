"""``torch.compile`` of the selective layer forward (opt-in: ``CacherConfig(compile=True)``).

A selective layer is a chain of small operators around a few short matmuls; compiling it fuses
the row moves, residual adds and norms into fewer kernels. One compiled function serves every
layer of every tower: transformers' modules are inlined, so their weights are graph inputs, and
the compiler specialises on shapes, strides, the recomputed-token count and whether the layer
selects or reuses the selection. A run with several ratios or call shapes needs more variants
than torch's default recompile limit (8), past which torch would run the rest eager without a
word; the first compilation raises the process's limit to ``RECOMPILE_LIMIT`` (never lowers
it), once, rather than around every call. The first call of each variant
compiles (seconds to a minute): run one untimed stream first, as stc-bench's prepare pass does.

On CUDA the mode is ``"reduce-overhead"``, which replays CUDA graphs whose outputs the next
replay overwrites; outputs are therefore copied out before they are handed back, since a tower
that returns hidden states keeps every layer's output.

A compilation that fails (a compiler error: no C++ compiler for the CPU backend, an unsupported
operator) turns compilation off for the process with one warning, and the eager forward runs:
the same answer, and ``compile_failure()`` says why, for a report. Errors of the computation
itself (out of memory, bad inputs) propagate as they would eager.
"""

from __future__ import annotations

import functools
import logging

import torch

from stc.cacher.block import LayerOps, LayerReference, selective_forward

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 256
"""Compiled variants allowed for the one selective forward (a sweep of ratios times call shapes
times selecting/reusing stays far below)."""

_failure: list[str] = []
"""Why compilation was turned off in this process (empty while it is on)."""


@functools.lru_cache(maxsize=None)
def _compiled(device_type: str):
    """The compiled selective forward for one device type (made once per process)."""
    config = torch._dynamo.config  # read here, not at import: importing stc must not load the compiler
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # before torch 2.6
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    mode = "reduce-overhead" if device_type == "cuda" else None
    return torch.compile(selective_forward, mode=mode, dynamic=False)


def compile_failure() -> str | None:
    """Why ``compile=True`` runs eager in this process (None while compilation works)."""
    return _failure[0] if _failure else None


def compiled_selective_forward(
    ops: LayerOps,
    x: torch.Tensor,
    reference: LayerReference,
    count: int,
    metric: str,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_forward`` through ``torch.compile`` (same arguments, same results up to the
    compiler's reordering of float operations); eager after a failed compilation."""
    if _failure:
        return selective_forward(ops, x, reference, count, metric, index)
    try:
        y, chosen = _compiled(x.device.type)(ops, x, reference, count, metric, index)
    except torch._dynamo.exc.TorchDynamoException as err:  # the compiler's error, not the stream's: run eager, say so once
        _failure.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        logger.warning("STC-Cacher: torch.compile failed, running eager (%s)", _failure[0])
        return selective_forward(ops, x, reference, count, metric, index)
    if x.is_cuda:  # a CUDA-graph output lives until the next replay; the caller may keep it longer
        return y.clone(), chosen.clone()
    return y, chosen
