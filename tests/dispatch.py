"""Counting the operators a piece of code dispatches: launch counts pinned without any timing."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

METADATA_OPS = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.transpose", "aten.permute", "aten.expand",
                "aten.unsqueeze", "aten.squeeze", "aten.t", "aten.detach", "aten.alias", "aten.slice", "aten.select",
                "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.as_strided", "aten.lift_fresh"}
"""Operators that only make a new view of the same memory (or wrap a constant): they launch nothing."""


class OpCounter(TorchDispatchMode):
    """Counts every operator that launches work while active, by name, under ``owner`` (a key
    that the code being counted may change as it runs, e.g. the layer in progress)."""

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


@contextlib.contextmanager
def counted_per_layer(layers: list[nn.Module]) -> Iterator[OpCounter]:
    """Count the operators of each layer's forward under the layer's index (None: outside any layer).

    Runs under ``no_grad`` rather than ``inference_mode``: composite operators (cosine similarity,
    linear) are then split into the operators that run, which is what a launch count needs.
    """
    counter = OpCounter()
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
