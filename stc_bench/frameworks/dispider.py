"""Dispider (frameworks.md A.3): its CLIP ViT-L/14 at 224 px, run on clips of 16 frames.

STC applies the cacher only, to the CLIP tower (257 tokens per frame; the CLS token is always
recomputed). Only the ViT stage is built and timed: Dispider's compact and reaction LLMs depend
on configuration values that are not public (frameworks.md section D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stc_bench.frameworks.framework import FrameworkSpec, Preset, StreamOutput, method_stream
from stc_bench.frameworks.parts import TowerShape, chunk_kinds, chunk_starts, embedding_macs, encode_steps, tower_site, vit_shape
from stc_bench.frameworks.weights import build_random, refuse_checkpoint
from stc_bench.methods import get_method
from stc_bench.methods.method import TOWER, Arm
from stc_bench.timing import StageTimer
from stc_bench.video import CLIP_MEAN, CLIP_STD


@dataclass(frozen=True)
class DispiderShape:
    """One Dispider scale: the CLIP vision tower."""

    tower: TowerShape


SHAPES = {
    "full": DispiderShape(TowerShape(1024, 4096, 24, 16, 224, 14)),    # openai/clip-vit-large-patch14
    "small": DispiderShape(TowerShape(256, 1024, 6, 4, 224, 14)),      # same 257 tokens per frame
    "tiny": DispiderShape(TowerShape(32, 64, 2, 4, 32, 2)),            # 256 + CLS tokens
}
PRESETS = {
    "full": Preset("full", "Dispider's CLIP ViT-L/14 @ 224 px (24 layers, 257 tokens with CLS)"),
    "small": Preset("small", "same 257 tokens per frame, narrow tower: for CPUs"),
    "tiny": Preset("tiny", "toy width, 256 + CLS tokens: for tests"),
}


class DispiderPipeline:
    """The CLIP tower, fed clips of ``chunk_frames`` frames (16 in Dispider)."""

    stages = ("vit",)
    default_chunk_frames = 16
    mean, std = CLIP_MEAN, CLIP_STD
    notes = ["Dispider uses STC-Cacher only, and only its ViT is built: the compact (Qwen2-1.5B) and reaction "
             "(Qwen2-7B) LLMs depend on checkpoint settings that are not public."]

    def __init__(self, scale: str, shape: DispiderShape, vision_tower: nn.Module):
        self.scale = scale
        self.shape = shape
        self.vision_tower = vision_tower
        self.image_size = shape.tower.image_size
        self.site = tower_site("dispider", FRAMEWORK.hooks, vision_tower, shape.tower.grid**2 + 1, shape.tower.layers)

    def modules(self) -> list[nn.Module]:
        """The vision tower (the only part built)."""
        return [self.vision_tower]

    @property
    def description(self) -> dict[str, Any]:
        """Architecture facts for the report."""
        return {"vit": self.shape.tower.describe("CLIP"),
                "tokens": f"{self.shape.tower.grid ** 2} patch tokens + CLS per frame (CLS always recomputed)"}

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """Every clip of ``chunk_frames`` frames through the tower, timed per clip; S videos
        (S, T, 3, H, W) are served in lockstep, one clip of each per tower call."""
        streams, frames = (clip.shape[0], clip.shape[1]) if clip.dim() == 5 else (1, clip.shape[0])
        method = method_stream(arm, self.site)
        steps = encode_steps(self.vision_tower, clip, method, timer, chunk_frames)
        first = [step[: step.shape[0] // streams] for step in steps]                       # the first video's frames
        return StreamOutput(
            tokens={"vit": sum(s.shape[0] * s.shape[1] for s in steps)},
            llm_steps=[],
            chunk_kinds=chunk_kinds(method.cacher_stats, len(chunk_starts(frames, chunk_frames))),
            cacher_stats=method.cacher_stats,
            graph_stats=method.graph_stats,
            features=torch.cat(first)[:, 1:] if capture else None,                        # drop CLS: (T, n - 1, d)
            streams=streams,
        )

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """ViT multiply-adds of every stream of the pass: patch embedding on every frame + the encoder
        layers under the arm (CLS included); the class token, position embeddings and pre/post LayerNorms cost no MACs."""
        tower = self.shape.tower
        return {"vit": out.streams * (embedding_macs(tower, frames)
                                      + get_method(arm.method).tower_macs(arm, vit_shape(tower, prefix_tokens=1), frames))}


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None) -> DispiderPipeline:
    """Build Dispider's CLIP tower at ``scale`` with random weights."""
    refuse_checkpoint("dispider", checkpoint)
    from transformers import CLIPVisionConfig, CLIPVisionModel

    t = SHAPES[scale].tower
    config = CLIPVisionConfig(hidden_size=t.width, intermediate_size=t.mlp, num_hidden_layers=t.layers,
                              num_attention_heads=t.heads, image_size=t.image_size, patch_size=t.patch_size,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return DispiderPipeline(scale, SHAPES[scale], build_random(lambda: CLIPVisionModel(config), device, dtype, seed))


FRAMEWORK = FrameworkSpec(
    name="dispider",
    summary="Dispider: CLIP ViT-L/14 @ 224 px on clips of 16 frames",
    presets=PRESETS,
    build=build,
    hooks=frozenset({TOWER}),
    serves_streams=True,
    tower_kind="CLIPEncoderLayer",
)
