"""STC: STC-Cacher inside the ViT and, where the framework offers the hook, STC-Pruner before the LLM."""

from __future__ import annotations

import contextlib

import torch

import stc
from stc.cacher import CacherStats, GraphStats
from stc.config import METRICS, SELECTIONS
from stc.flops import ViTShape, vit_tower_macs
from stc_bench.methods.method import COMPRESS, TOWER, Arm, HookSite, Knob, MethodSpec, MethodStream, at_least_one


def cacher_config(arm: Arm) -> stc.CacherConfig:
    """The STC-Cacher settings of an STC arm."""
    return stc.CacherConfig(update_ratio=arm.knob("ratio"), cache_interval=arm.knob("interval"), metric=arm.knob("metric"),
                            selection=arm.knob("selection"), cuda_graph=arm.knob("cuda_graph"),
                            compile=arm.knob("compile"))


class STCStream(MethodStream):
    """One video under STC: the cacher attached for the stream, a fresh pruner."""

    patches_tower = True

    def __init__(self, arm: Arm, site: HookSite):
        self._site = site
        self._config = cacher_config(arm)
        prune = COMPRESS in site.hooks
        self._pruner = stc.STCPruner(stc.PrunerConfig(tokens_per_frame=arm.knob("tokens_per_frame"))) if prune else None
        self._handle: stc.CacherHandle | None = None

    @contextlib.contextmanager
    def tower(self):
        """STC-Cacher attached to the site's tower for the whole stream."""
        with stc.cacher_attached(self._site.tower, self._config) as handle:
            self._handle = handle
            yield handle

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """STC-Pruner: (t, n, C) -> (t, min(k, n), C), in spatial order."""
        return tokens if self._pruner is None else self._pruner.compress(tokens).tokens

    def serving(self, ids: tuple[int, ...]):
        """Each frame of the tower call in its own stream's cache (``CacherHandle.streams``)."""
        assert self._handle is not None, "serving() is entered inside tower()"
        return self._handle.streams(ids)

    def compress_streams(self, tokens: torch.Tensor) -> torch.Tensor:
        """STC-Pruner on S streams' step, (S, t, n, C) -> (S, t * min(k, n), C): each stream
        scored against its own temporal anchor."""
        streams, steps = tokens.shape[:2]
        if self._pruner is None or streams == 1:
            return super().compress_streams(tokens)
        ids = [s for s in range(streams) for _ in range(steps)]
        kept = self._pruner.compress(tokens.flatten(0, 1), streams=ids).tokens           # (S * t, k, C)
        return kept.reshape(streams, -1, kept.shape[-1])

    @property
    def cacher_stats(self) -> CacherStats | None:
        """The cacher's per-call statistics of this stream."""
        return self._handle.stats if self._handle is not None else None

    @property
    def graph_stats(self) -> GraphStats | None:
        """The tower's CUDA-graph counts (None without ``cuda_graph``)."""
        return self._handle.graph_stats if self._handle is not None else None


def _tower_macs(arm: Arm, shape: ViTShape, frames: int) -> int:
    return vit_tower_macs(shape, frames, cacher_config(arm))


def _positive_ratio(value) -> str | None:  # noqa: D103
    return None if isinstance(value, (int, float)) and 0 < value <= 1 else "must be in (0, 1]"


def _one_of(choices):
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


METHOD = MethodSpec(
    name="stc",
    summary="STC-Cacher inside the ViT + STC-Pruner before the LLM (cacher only where the framework has no pruning step)",
    knobs=(
        Knob("ratio", float, 0.25, "STC-Cacher: fraction of tokens recomputed on selective frames", "r", _positive_ratio),
        Knob("interval", int, 2, "STC-Cacher: a full refresh frame every N frames", "N", at_least_one),
        Knob("tokens_per_frame", int, 64, "STC-Pruner: visual tokens kept per frame", "k", at_least_one),
        Knob("metric", str, "cosine", "STC-Cacher token-change metric", check=_one_of(METRICS)),
        Knob("selection", str, "shared", "STC-Cacher: shared (first layer picks) or per_layer", check=_one_of(SELECTIONS)),
        Knob("cuda_graph", bool, False, "STC-Cacher: replay selective layers from CUDA graphs"),
        Knob("compile", bool, False, "STC-Cacher: run selective layers through torch.compile", "compiled"),
    ),
    hooks=frozenset({TOWER, COMPRESS}),
    stream=STCStream,
    tower_macs=_tower_macs,
)
