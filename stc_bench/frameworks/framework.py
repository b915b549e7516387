"""What every framework module provides: presets, a builder, and a streaming pipeline.

A framework module says how to build its parts and how frames flow through them; the runner
owns arms, repeats, interleaving, timing and statistics, and is the same for every framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from stc import CacherConfig, PrunerConfig
from stc.cacher import CacherStats
from stc_bench.config import STCPoint
from stc_bench.timing import StageTimer


@dataclass(frozen=True)
class ArmSettings:
    """One arm of a run: the baseline (no STC) or +STC at ``point``."""

    arm: str
    point: STCPoint | None = None
    cacher: CacherConfig | None = None
    pruner: PrunerConfig | None = None

    @property
    def label(self) -> str:
        """``baseline`` or ``stc r0.25 N2 k64``."""
        return self.arm if self.point is None else f"{self.arm} {self.point.label}"


@dataclass
class StreamOutput:
    """What one streamed pass produced, besides its timings (exact counts; captures on request)."""

    tokens: dict[str, int]
    """Tokens each stage emitted over the whole stream."""
    chunk_kinds: list[str]
    """Per chunk: "full" (no cacher), "refresh", "selective" or "mixed"."""
    cacher_stats: CacherStats | None = None
    features: torch.Tensor | None = None
    """(T, n, d) final ViT features, when captured."""
    logits: torch.Tensor | None = None
    """(positions, vocab) logits of a fixed query pre-filled after the stream, when captured."""


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

    def stream(self, clip: torch.Tensor, arm: ArmSettings, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """Stream the normalised frames clip (T, 3, H, W) once through every stage."""
        ...

    def macs(self, frames: int, arm: ArmSettings, chunk_frames: int) -> dict[str, int | None]:
        """Analytic multiply-adds per stage for this stream (None where not modelled)."""
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
    stc_components: str
