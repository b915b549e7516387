"""Counting the operators a piece of code dispatches: launch counts pinned without any timing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from stc_bench.launches import OperatorCounter


@contextlib.contextmanager
def counted_per_layer(layers: list[nn.Module]) -> Iterator[OperatorCounter]:
    """Count the operators of each layer's forward under the layer's index (None: outside any layer).

    Runs under ``no_grad`` rather than ``inference_mode``: composite operators (cosine similarity,
    linear) are then split into the operators that run, which is what a launch count needs.
    """
    counter = OperatorCounter()
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda module, args, i=i: setattr(counter, "owner", i)))
        hooks.append(layer.register_forward_hook(lambda module, args, out: setattr(counter, "owner", None)))
    try:
        with torch.no_grad(), counter:
            yield counter
    finally:
        for hook in hooks:
            hook.remove()
