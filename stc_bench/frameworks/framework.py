"""What every framework module provides: presets, a builder, and a streaming pipeline.

A framework module says how to build its parts and how frames flow through them; the runner
owns arms, repeats, interleaving, timing and statistics, and is the same for every framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from stc.cacher import CacherStats, GraphStats
from stc_bench.methods import get_method
from stc_bench.methods.method import COMPRESS, Arm, HookSite, MethodStream
from stc_bench.timing import StageTimer


def method_stream(arm: Arm, site: HookSite) -> MethodStream:
    """The per-stream hooks of ``arm`` on a framework's hook site (a fresh object per video)."""
    return get_method(arm.method).stream(arm, site)


@dataclass
class StreamOutput:
    """What one streamed pass produced, besides its timings (exact counts; captures on request)."""

    tokens: dict[str, int]
    """Tokens each stage emitted over the whole stream."""
    llm_steps: list[int]
    """Tokens of each timed pre-fill call per stream, in order (visual and text): the pre-fill MAC
    model's input (a call pre-fills that many tokens into each of ``streams`` sequences)."""
    chunk_kinds: list[str]
    """Per chunk: "full" (no cacher), "refresh", "selective" or "mixed"."""
    cacher_stats: CacherStats | None = None
    graph_stats: GraphStats | None = None
    """The tower's CUDA-graph counts after the stream (None where graphs were not asked for)."""
    features: torch.Tensor | None = None
    """(T, n, d) final ViT features, when captured."""
    logits: torch.Tensor | None = None
    """(positions, vocab) logits of a fixed query pre-filled after the stream, when captured."""
    streams: int = 1
    """Videos served concurrently in the pass (``tokens`` count all of them; ``features`` and
    ``logits`` are the first video's)."""


@dataclass(frozen=True)
class Preset:
    """A named architecture size of a framework."""

    name: str
    summary: str


class Pipeline(Protocol):
    """A built framework, ready to stream clips."""

    scale: str
    stages: tuple[str, ...]
    image_size: int
    default_chunk_frames: int
    """Frames per streaming step in the framework's own protocol (``--chunk-frames`` overrides)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """Per-channel normalisation of the tower's input."""
    notes: list[str]
    """What the benchmark does not model, or what STC does not touch, for the report's caveats."""
    description: dict[str, Any]
    """Architecture facts for the report (widths, layers, tokens per stage)."""

    site: HookSite
    """Where methods act in this pipeline: the hook points it offers and the tower."""

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """Stream the normalised frames clip (T, 3, H, W) once through every stage under ``arm``;
        where the framework ``serves_streams``, also S videos (S, T, 3, H, W), served concurrently
        in lockstep (``--streams``)."""
        ...

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """Analytic multiply-adds per stage of a stream whose exact counts are ``out`` (None where not modelled)."""
        ...

    def modules(self) -> list[torch.nn.Module]:
        """Every built module (tower, projector, LLM parts): what the weight checks inspect."""
        ...


@dataclass(frozen=True)
class FrameworkSpec:
    """A registered framework: its presets and how to build a pipeline."""

    name: str
    summary: str
    presets: dict[str, Preset]
    build: Callable[..., Pipeline]
    """build(scale, device, dtype, seed, checkpoint) -> Pipeline"""
    hooks: frozenset[str]
    """Hook points the framework offers methods (``tower``, ``compress``)."""
    tower_kind: str
    """The tower's layer class, e.g. ``SiglipEncoderLayer``: what a tower method must be able to patch."""
    serves_streams: bool = False
    """Whether its pipeline's ``stream`` serves S videos concurrently (``--streams S``)."""
    build_across_gpus: Callable[..., Pipeline] | None = None
    """Like ``build``, with the LLM placed across every visible GPU and the rest on ``device``
    (``--device-map auto``, ``stc_bench.placement``); None where the framework cannot."""

    @property
    def stc_components(self) -> str:
        """What STC uses here: the cacher, plus the pruner where the framework has a compression step."""
        return "cacher + pruner" if COMPRESS in self.hooks else "cacher"

    def site(self) -> HookSite:
        """The hook site as known before building (no tower yet): enough to check which arms can run."""
        return HookSite(self.name, self.hooks, tower_kind=self.tower_kind, class_token=self.tower_kind == "CLIPEncoderLayer")
