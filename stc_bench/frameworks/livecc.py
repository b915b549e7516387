"""LiveCC-7B (Qwen2-VL-7B) streamed as LiveCC's demo does (frameworks.md A.4).

2 fps; the first step carries 6 frames (3 temporal groups), every later step 2 frames (one
group). Per step: the Qwen2-VL vision tower (32 blocks + 2x2 PatchMerger to 3584) on the new
frames, then one LLM pre-fill of the new visual tokens plus a short time-stamp text turn,
appended to the KV cache. STC applies the cacher only (our Qwen2-VL adapter, the first public
one), with a temporal group as the unit of reuse; the pre-fill is unchanged by STC.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stc.flops import LLMShape, ViTShape, patch_embedding_macs, patch_merger_macs, streamed_prefill_macs
from stc.integrations import batched_attention
from stc_bench.device import host_resident
from stc_bench.frameworks.framework import FrameworkSpec, Preset, StreamOutput, method_stream
from stc_bench.frameworks.parts import QWEN2, CausalLM, chunk_kinds, chunk_starts, describe_llm, stream_ids, tower_site
from stc_bench.frameworks.weights import build_random, refuse_checkpoint
from stc_bench.methods import get_method
from stc_bench.methods.method import TOWER, Arm
from stc_bench.timing import StageTimer
from stc_bench.video import CLIP_MEAN, CLIP_STD

FIRST_STEP_FRAMES = 6
"""LiveCC's first streaming step: 3 s of video at 2 fps."""
TURN_TOKENS = 12
"""Text tokens of each step's user turn ("Time=a-b s" and chat markup), pre-filled with the frames."""
QUERY_TOKENS = 8


@dataclass(frozen=True)
class QwenVisionShape:
    """The Qwen2-VL vision tower: blocks, width, heads, MLP ratio, patch, input size, output width."""

    depth: int
    width: int
    heads: int
    mlp_ratio: int
    patch_size: int
    image_size: int
    out_width: int
    temporal_patch: int = 2
    merge: int = 2

    @property
    def tokens(self) -> int:
        """ViT tokens per temporal group."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def merged_tokens(self) -> int:
        """LLM tokens per temporal group after the 2x2 merger."""
        return self.tokens // self.merge**2


@dataclass(frozen=True)
class LiveCCShape:
    """One LiveCC scale: the vision tower and the Qwen2-7B-class text model."""

    vision: QwenVisionShape
    llm: LLMShape


# 448 px frames: 32x32 = 1024 ViT tokens -> 256 LLM tokens per 2-frame group (within the
# demo's 384*28*28 pixel cap).
SHAPES = {
    "full": LiveCCShape(QwenVisionShape(32, 1280, 16, 4, 14, 448, 3584), QWEN2["full"]),
    "small": LiveCCShape(QwenVisionShape(6, 256, 4, 4, 14, 448, QWEN2["small"].width), QWEN2["small"]),
    "tiny": LiveCCShape(QwenVisionShape(2, 32, 4, 2, 2, 32, QWEN2["tiny"].width), QWEN2["tiny"]),
}
PRESETS = {
    "full": Preset("full", "LiveCC-7B: Qwen2-VL-7B vision tower (32 blocks) + Qwen2-7B-class text model"),
    "small": Preset("small", "same token counts (1024 -> 256 per 2-frame group), narrow towers: for CPUs"),
    "tiny": Preset("tiny", "toy widths (256 -> 64 tokens per group): for tests"),
}


def patchify(frames: torch.Tensor, patch: int, temporal_patch: int = 2, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (T, 3, H, W) -> Qwen2-VL's flat patches (T/2 * H/p * W/p, 3*2*p*p) and grid_thw (1, 3).

    Mirrors ``Qwen2VLImageProcessor``: tokens in merge-window-major order (each 2x2 window is
    four consecutive tokens), groups of ``temporal_patch`` frames, an odd last frame repeated.
    """
    if frames.shape[0] % temporal_patch:
        frames = torch.cat([frames, frames[-1:].expand(temporal_patch - frames.shape[0] % temporal_patch, -1, -1, -1)])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch, h // patch, w // patch
    x = frames.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                       # (gt, gh/m, gw/m, m, m, c, tp, p, p)
    grid = host_resident(torch.tensor([[gt, gh, gw]]))              # on the host, as the processor returns it
    return x.reshape(gt * gh * gw, c * temporal_patch * patch * patch), grid


def precomputed_vision_inputs(grid: torch.Tensor, merge: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rotary position ids (on ``device``) and attention boundaries of a call, computed before the
    timed span: the tower otherwise derives them from ``grid_thw`` with host loops and, on a GPU,
    a host-to-device copy inside the span. Later transformers 5.x accept them precomputed
    (``transformers_compat.vision_input_helpers``); older versions compute them inside the tower.

    They depend on the grid alone, so each grid's are made once per process: a host-to-device
    copy of pageable memory would otherwise synchronise the stream before every step's span.
    The tensors are shared: never write into them.
    """
    return dict(_vision_inputs(tuple(tuple(int(v) for v in row) for row in grid.tolist()), merge, device))


@functools.lru_cache(maxsize=64)
def _vision_inputs(grid: tuple[tuple[int, ...], ...], merge: int, device: torch.device) -> tuple[tuple[str, torch.Tensor], ...]:
    from stc_bench.frameworks.transformers_compat import vision_input_helpers

    helpers = vision_input_helpers()
    if helpers is None:
        return ()
    get_position_ids, get_cu_seqlens = helpers
    grid_thw = torch.tensor(grid)
    return (("position_ids", get_position_ids(grid_thw, merge).to(device)), ("cu_seqlens", get_cu_seqlens(grid_thw)))


def build_vision_tower(shape: QwenVisionShape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-weight ``Qwen2VisionTransformerPretrainedModel``."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = Qwen2VLVisionConfig(depth=shape.depth, embed_dim=shape.width, hidden_size=shape.out_width,
                                 num_heads=shape.heads, mlp_ratio=shape.mlp_ratio, patch_size=shape.patch_size,
                                 temporal_patch_size=shape.temporal_patch, spatial_merge_size=shape.merge,
                                 in_channels=3, hidden_act="quick_gelu")
    return build_random(lambda: Qwen2VisionTransformerPretrainedModel(config), device, dtype, seed)


class LiveCCPipeline:
    """Built LiveCC parts; ``stream`` feeds a video step by step into one KV cache."""

    stages = ("vit", "prefill")
    default_chunk_frames = 2
    mean, std = CLIP_MEAN, CLIP_STD  # Qwen2-VL's processor uses OpenAI CLIP's statistics
    notes = [
        "LiveCC uses STC-Cacher only: the pre-fill carries the same tokens in both arms, so its reduction "
        "should be ~0; it is timed to show where the time goes.",
        "Both arms run the vision attention as one batched SDPA over a step's temporal groups "
        "(stc.integrations.batched_attention in the baseline, the cacher's own forward in +STC): transformers' "
        "sdpa path loops over groups with a host sync, and counting that kernel change as STC's saving would "
        "overstate it.",
        "The text model is a Qwen2 decoder with 1-D positions (same FLOPs as Qwen2-VL's M-RoPE model); "
        "turn text is pseudo-tokens of the right length.",
        "The first step takes 6 frames (3 temporal groups), later steps 2 frames; the cacher's unit is the "
        "2-frame group.",
    ]

    def __init__(self, scale: str, shape: LiveCCShape, vision_tower: nn.Module, llm: CausalLM, seed: int):
        self.scale = scale
        self.shape = shape
        self.vision_tower = vision_tower
        self.llm = llm
        self.image_size = shape.vision.image_size
        self.site = tower_site("livecc", FRAMEWORK.hooks, vision_tower, shape.vision.tokens, shape.vision.depth)
        self._turn_ids = llm.random_ids(TURN_TOKENS, seed)
        self._query_ids = llm.random_ids(QUERY_TOKENS, seed + 1)

    def modules(self) -> list[nn.Module]:
        """The vision tower (with its merger) and the LLM's modules."""
        return [self.vision_tower, *self.llm.modules()]

    @property
    def description(self) -> dict[str, Any]:
        """Architecture facts for the report."""
        v = self.shape.vision
        return {
            "vit": f"Qwen2-VL vision {v.depth} blocks, width {v.width}, MLP {v.width * v.mlp_ratio}, {v.heads} heads, "
                   f"{v.image_size} px / patch {v.patch_size}, 2 frames per temporal group",
            "llm": describe_llm(self.shape.llm),
            "tokens": f"{v.tokens} ViT tokens -> {v.merged_tokens} LLM tokens per 2-frame group, "
                      f"+{TURN_TOKENS} text tokens per step",
        }

    def steps(self, frames: int, chunk_frames: int) -> list[tuple[int, int]]:
        """(start, end) frames of each streaming step."""
        return chunk_starts(frames, chunk_frames, first=FIRST_STEP_FRAMES)

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """One video (T, 3, H, W): per step the tower on the new frames, then their pre-fill with
        the turn text. S videos (S, T, 3, H, W) are served in lockstep: one tower call on every
        stream's new temporal groups (one ``grid_thw`` row per stream), one batched pre-fill of S
        sequences. Captures (``capture``) are the first video's."""
        from stc_bench.frameworks.transformers_compat import qwen2_vision_forward

        v = self.shape.vision
        clips = clip if clip.dim() == 5 else clip[None]                                    # (S, T, 3, H, W)
        streams, frames = clips.shape[:2]
        cache = self.llm.new_cache()
        features, vit_tokens, steps = [], 0, []
        method = method_stream(arm, self.site)
        # Like for like: an arm that leaves the tower alone gets the batched attention the cacher runs.
        patch = method.tower() if method.patches_tower else batched_attention(self.vision_tower)
        with patch:
            for step, (start, end) in enumerate(self.steps(frames, chunk_frames)):
                parts = [patchify(clips[s, start:end], v.patch_size, v.temporal_patch, v.merge) for s in range(streams)]
                pixels = torch.cat([p for p, _ in parts])                                   # (S * groups * n, 3 * 2 * p * p)
                grid = host_resident(torch.cat([g for _, g in parts]))                     # (S, 3): one row per stream, on the host
                precomputed = precomputed_vision_inputs(grid, v.merge, pixels.device)
                groups = int(grid[0, 0])
                serving = method.serving(stream_ids(streams, groups)) if streams > 1 else contextlib.nullcontext()
                with serving, timer.span("vit", step):  # naming the streams is bookkeeping, outside the span
                    visual, hidden = qwen2_vision_forward(self.vision_tower, pixels, grid, **precomputed)
                    # visual: merged tokens (S*groups*m, C); hidden: the last block's output (S*groups*n, d)
                with timer.span("prefill", step):
                    turn = self.llm.embed(self._turn_ids).expand(streams, -1, -1)                 # (S, TURN, C)
                    embeds = torch.cat([turn, visual.view(streams, -1, visual.shape[-1])], dim=1)  # (S, L, C)
                    self.llm.forward_embeds(embeds, cache)
                vit_tokens += hidden.shape[0]
                steps.append(embeds.shape[1])
                if capture:
                    features.append(hidden.view(streams, -1, v.tokens, v.width)[0])            # (groups, n, d)
        stats = method.cacher_stats
        return StreamOutput(
            tokens={"vit": vit_tokens, "prefill": streams * sum(steps)},
            llm_steps=steps,
            chunk_kinds=chunk_kinds(stats, len(self.steps(frames, chunk_frames))),
            cacher_stats=stats,
            graph_stats=method.graph_stats,
            features=torch.cat(features) if capture else None,
            logits=self.llm.lm_head(self.llm.forward_embeds(
                self.llm.embed(self._query_ids).expand(streams, -1, -1), cache)[0]) if capture else None,
            streams=streams,
        )

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """Multiply-adds of each timed stage, over every stream of the pass. vit, per temporal group: the patch embedding (a Conv3d
        over 2 frames) on every token, the blocks under the arm, the PatchMerger on every token
        (every arm leaves the whole grid); LayerNorms and rotary embeddings cost no MACs. prefill:
        the decoder on the tokens each step sent (turn-text embedding: a lookup; no logits)."""
        v = self.shape.vision
        groups = sum(-(-(end - start) // v.temporal_patch) for start, end in self.steps(frames, chunk_frames))
        shape = ViTShape(tokens=v.tokens, width=v.width, mlp_width=v.width * v.mlp_ratio, layers=v.depth)
        tokens = groups * v.tokens
        outside = (patch_embedding_macs(tokens, v.width, v.patch_size, temporal_patch=v.temporal_patch)
                   + patch_merger_macs(tokens, v.width, v.out_width, v.merge))
        return {"vit": out.streams * (outside + get_method(arm.method).tower_macs(arm, shape, groups)),
                "prefill": out.streams * streamed_prefill_macs(self.shape.llm, out.llm_steps, logits_tokens=0)}


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None) -> LiveCCPipeline:
    """Build LiveCC at ``scale`` with random weights (checkpoints: not yet supported)."""
    refuse_checkpoint("livecc", checkpoint)
    shape = SHAPES[scale]
    tower = build_vision_tower(shape.vision, device, dtype, seed)
    return LiveCCPipeline(scale, shape, tower, CausalLM.random(shape.llm, device, dtype, seed + 2), seed)


FRAMEWORK = FrameworkSpec(
    name="livecc",
    summary="LiveCC-7B: Qwen2-VL ViT per 2-frame step + Qwen2-7B-class pre-fill into a KV cache",
    presets=PRESETS,
    build=build,
    hooks=frozenset({TOWER}),
    serves_streams=True,
    tower_kind="Qwen2VLVisionBlock",
)
