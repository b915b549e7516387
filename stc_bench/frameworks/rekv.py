"""ReKV on LLaVA-OneVision-7B (frameworks.md A.1), streamed as ReKV + STC do it.

Per chunk of ``chunk_frames`` frames (1 in STC): SigLIP (26 layers, 729 tokens per frame,
last-layer features without post-norm) -> projector (Linear, GELU, Linear) -> 2x2 bilinear
pooling (27x27 -> 14x14 = 196 tokens) -> the arm's compression hook (STC-Pruner, a peer) -> one LLM pre-fill of the
chunk's visual tokens appended to the KV cache, after an untimed system-prompt pre-fill.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stc.flops import LLMShape, projector_macs, streamed_prefill_macs
from stc_bench.frameworks.framework import FrameworkSpec, Preset, StreamOutput, method_stream
from stc_bench.frameworks.parts import (
    SIGLIP_QWEN2,
    CausalLM,
    TowerLLMShape,
    TowerShape,
    build_siglip,
    chunk_kinds,
    chunk_starts,
    describe_llm,
    embedding_macs,
    qwen2_config,
    siglip_config,
    stream_ids,
    tower_site,
    vit_shape,
)
from stc_bench.frameworks.weights import CheckpointError, build_random, read_checkpoint_config
from stc_bench.methods import get_method
from stc_bench.methods.method import COMPRESS, TOWER, Arm, MethodStream
from stc_bench.timing import StageTimer

SYSTEM_PROMPT_TOKENS = 24
"""Length of the untimed init prompt (ReKV's system + user preamble is about this long)."""
QUERY_TOKENS = 8
"""Length of the fixed query pre-filled after the stream when fidelity is captured."""


SHAPES = SIGLIP_QWEN2

PRESETS = {
    "full": Preset("full", "LLaVA-OV-7B: SigLIP-so400m (26 layers) + Qwen2-7B"),
    "small": Preset("small", "same token counts (729 -> 196 per frame), narrow towers: ~1.5 min default run on a 2-core CPU"),
    "tiny": Preset("tiny", "toy widths, same 729 -> 196 token structure: for tests"),
    "72b": Preset("72b", "LLaVA-OV-72B: SigLIP-so400m (26 layers) + Qwen2-72B (135 GiB in float16): only with "
                         "--device-map auto, the LLM across several GPUs"),
}


def llava_onevision_config(shape: TowerLLMShape):
    """The ``LlavaOnevisionConfig`` of a scale (used for the projector and for test checkpoints)."""
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(vision_config=siglip_config(shape.tower).to_dict(),
                                text_config=qwen2_config(shape.llm).to_dict())


def pool_2x2_bilinear(features: torch.Tensor, grid: int) -> torch.Tensor:
    """LLaVA-OneVision's video pooling: (T, grid^2, C) -> (T, ceil(grid/2)^2, C), bilinear.

    Mirrors ``LlavaOnevisionModel.apply_pooling`` (transformers 4.46 to 5.24).
    """
    frames, _, channels = features.shape
    x = features.view(frames, grid, grid, channels).permute(0, 3, 1, 2)              # (T, C, g, g)
    side = math.ceil(grid / 2)
    x = F.interpolate(x, size=(side, side), mode="bilinear")                          # (T, C, s, s)
    return x.permute(0, 2, 3, 1).reshape(frames, side * side, channels)               # (T, s^2, C)


class RekvPipeline:
    """Built ReKV parts on one device; ``stream`` runs one video through them."""

    stages = ("vit", "compress", "prefill")
    default_chunk_frames = 1
    mean = std = (0.5, 0.5, 0.5)  # SigLIP preprocessing
    notes = ["ReKV's KV retrieval and CPU offload are not modelled: pre-fill appends to a plain growing KV cache, "
             "exact while the stream fits ReKV's 15000-token local window (76 frames at 196 tokens)."]

    def __init__(self, scale: str, shape: TowerLLMShape, vision_tower: nn.Module, projector: nn.Module, llm: CausalLM,
                 seed: int):
        self.scale = scale
        self.shape = shape
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_size = shape.tower.image_size
        self.grid = shape.tower.grid
        self.site = tower_site("rekv", FRAMEWORK.hooks, vision_tower, self.grid**2, shape.tower.layers,
                               pool=lambda maps: pool_2x2_bilinear(maps, self.grid))
        self._prompt_ids = llm.random_ids(SYSTEM_PROMPT_TOKENS, seed)
        self._query_ids = llm.random_ids(QUERY_TOKENS, seed + 1)

    @property
    def vit_tokens(self) -> int:
        """ViT tokens per frame (no CLS in SigLIP)."""
        return self.grid * self.grid

    @property
    def pooled_tokens(self) -> int:
        """Visual tokens per frame after 2x2 pooling."""
        return math.ceil(self.grid / 2) ** 2

    @property
    def description(self) -> dict[str, Any]:
        """Architecture facts for the report."""
        return {
            "vit": self.shape.tower.describe("SigLIP"),
            "llm": describe_llm(self.shape.llm),
            "tokens": f"{self.vit_tokens} ViT tokens -> {self.pooled_tokens} pooled tokens per frame",
            "system_prompt_tokens": SYSTEM_PROMPT_TOKENS,
        }

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """ViT features of the last layer, before post-norm: (t, 3, H, W) -> (t, 729, d)."""
        return self.vision_tower(pixel_values=frames, output_hidden_states=True).hidden_states[-1]

    def compress(self, features: torch.Tensor, method: MethodStream, streams: int = 1) -> torch.Tensor:
        """Projector, pooling, then the arm's compression hook: (S * t, n, d) -> (S, K, C), the
        step's tokens of each of ``streams`` streams (stream-major frames) as one sequence each.

        Pooling needs the 27x27 grid: when a method inside the tower (ToMe) left fewer tokens
        than the grid has, there is no grid to pool and the projected tokens go on unpooled.
        """
        projected = self.projector(features)                                               # (S * t, n, C)
        if projected.shape[1] == self.grid**2:
            projected = pool_2x2_bilinear(projected, self.grid)                            # (S * t, 196, C)
        return method.compress_streams(projected.unflatten(0, (streams, -1)))              # (S, K, C)

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """One video (T, 3, H, W), or S videos served concurrently (S, T, 3, H, W): untimed system
        prompt, then per step the three timed stages. S videos advance in lockstep, one chunk of
        each per step (the serving pattern): one tower call on their S * t frames, each stream's
        tokens compressed against its own history, and one batched pre-fill of S sequences, each
        into its own KV cache row. With ``capture``, also the final ViT features and the logits
        of a fixed query pre-filled (untimed) after the stream, of the first video: what the
        model would answer from, given each arm's cache."""
        clips = clip if clip.dim() == 5 else clip[None]                                    # (S, T, 3, H, W)
        streams, frames = clips.shape[:2]
        cache = self.llm.new_cache()
        self._prefill_text(self._prompt_ids, cache, streams)
        method = method_stream(arm, self.site)
        serving = streams > 1
        features, vit_tokens, steps = [], 0, []
        with method.tower():
            for chunk, (start, end) in enumerate(chunk_starts(frames, chunk_frames)):
                step = clips[:, start:end].flatten(0, 1)                                  # (S * t, 3, H, W), stream-major
                # entered before the span: naming the streams is bookkeeping, not the arm's timed work
                with method.serving(stream_ids(streams, end - start)) if serving else contextlib.nullcontext():
                    with timer.span("vit", chunk):
                        feats = self.encode(step)                                          # (S * t, n, d)
                with timer.span("compress", chunk):
                    visual = self.compress(feats, method, streams)                         # (S, K, C)
                with timer.span("prefill", chunk):
                    self.llm.forward_embeds(visual, cache)                                 # (S, K, C)
                vit_tokens += feats.shape[0] * feats.shape[1]
                steps.append(visual.shape[1])
                if capture:
                    features.append(feats[: end - start])                                  # the first video's frames
        stats = method.cacher_stats
        return StreamOutput(
            tokens={"vit": vit_tokens, "compress": streams * sum(steps), "prefill": streams * sum(steps)},
            llm_steps=steps,
            chunk_kinds=chunk_kinds(stats, len(chunk_starts(frames, chunk_frames))),
            streams=streams,
            cacher_stats=stats,
            graph_stats=method.graph_stats,
            features=torch.cat(features) if capture else None,
            logits=self.llm.lm_head(self._prefill_text(self._query_ids, cache, streams)[0]) if capture else None,
        )

    def _prefill_text(self, ids: torch.Tensor, cache, streams: int) -> torch.Tensor:
        """Pre-fill text ids (1, L) into every stream's cache row; hidden states (S, L, C)."""
        return self.llm.forward_embeds(self.llm.embed(ids).expand(streams, -1, -1), cache)

    def modules(self) -> list[nn.Module]:
        """The vision tower, the projector and the LLM's modules."""
        return [self.vision_tower, self.projector, *self.llm.modules()]

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """Multiply-adds of each timed stage, over every stream of the pass (``out.streams`` videos
        of ``frames`` frames). vit: patch embedding on every frame + the encoder layers under the
        arm (post-LayerNorm: no MACs). compress: the projector on the tokens the tower left (2x2
        pooling and the arm's compression hook, scoring and gathers, left out). prefill: the
        decoder on the tokens each step sent (no logits are computed inside the span)."""
        tower = self.shape.tower
        per_stream_vit = embedding_macs(tower, frames) + get_method(arm.method).tower_macs(arm, vit_shape(tower), frames)
        return {
            "vit": out.streams * per_stream_vit,
            "compress": projector_macs(out.tokens["vit"], tower.width, self.shape.llm.width),
            "prefill": out.streams * streamed_prefill_macs(self.shape.llm, out.llm_steps, past_tokens=SYSTEM_PROMPT_TOKENS,
                                                           logits_tokens=0),
        }


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None,
          device_map: str = "none") -> RekvPipeline:
    """Build ReKV at ``scale`` with random weights, or from a local LLaVA-OneVision checkpoint;
    with ``device_map="auto"`` the LLM is placed across every visible GPU, the vision tower and
    projector on ``device`` (built first, so the LLM's budget on ``device`` is what they leave)."""
    if checkpoint is not None:
        return _load_checkpoint(checkpoint, device, dtype, seed, device_map)
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    shape = SHAPES[scale]
    tower = build_siglip(shape.tower, device, dtype, seed)
    config = llava_onevision_config(shape)
    projector = build_random(lambda: LlavaOnevisionMultiModalProjector(config), device, dtype, seed + 1)
    llm = CausalLM.random(shape.llm, device, dtype, seed + 2, device_map=device_map)
    return RekvPipeline(scale, shape, tower, projector, llm, seed)


def build_across_gpus(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                      checkpoint: str | None = None) -> RekvPipeline:
    """``build`` with the LLM placed across every visible GPU (``--device-map auto``)."""
    return build(scale, device, dtype, seed, checkpoint, device_map="auto")


def _checkpoint_device_map(path: str, device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    """The device map of a LLaVA-OneVision checkpoint under ``--device-map auto``: planned on a
    model built from its config on the meta device (nothing read but config.json)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from stc_bench.frameworks.transformers_compat import llava_onevision_parts
    from stc_bench.frameworks.weights import build_empty
    from stc_bench.placement import checkpoint_device_map

    config = LlavaOnevisionConfig.from_pretrained(path, local_files_only=True)
    meta = build_empty(lambda: LlavaOnevisionForConditionalGeneration(config), dtype)
    _, _, decoder, lm_head = llava_onevision_parts(meta)
    return checkpoint_device_map(meta, decoder, lm_head, device.index or 0, dtype)


def _load_checkpoint(path: str, device: torch.device, dtype: torch.dtype, seed: int,
                     device_map: str = "none") -> RekvPipeline:
    from transformers import LlavaOnevisionForConditionalGeneration

    from stc_bench.frameworks.transformers_compat import from_pretrained_dtype, llava_onevision_parts

    raw = read_checkpoint_config(path, ("llava_onevision",))
    if raw.get("vision_feature_layer", -1) != -1:
        raise CheckpointError(f"--checkpoint {path}: vision_feature_layer {raw['vision_feature_layer']} is not -1; "
                              "only LLaVA-OneVision checkpoints with 26-layer towers read at layer -1 are supported")
    # Straight onto the device(s) in the compute dtype: a 7B checkpoint never sits in host RAM whole.
    placement = _checkpoint_device_map(path, device, dtype) if device_map == "auto" else {"": device}
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, device_map=placement, local_files_only=True, use_safetensors=True, **from_pretrained_dtype(dtype)
    ).eval()
    vc, tc = model.config.vision_config, model.config.text_config
    shape = TowerLLMShape(
        TowerShape(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads,
                   vc.image_size, vc.patch_size),
        LLMShape(width=tc.hidden_size, mlp_width=tc.intermediate_size, layers=tc.num_hidden_layers,
                 heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads, vocab=tc.vocab_size),
    )
    vision_tower, projector, decoder, lm_head = llava_onevision_parts(model)
    return RekvPipeline("checkpoint", shape, vision_tower, projector, CausalLM(decoder, lm_head, shape.llm), seed)


FRAMEWORK = FrameworkSpec(
    name="rekv",
    summary="ReKV on LLaVA-OneVision-7B: SigLIP ViT + Qwen2-7B pre-fill into a KV cache",
    presets=PRESETS,
    build=build,
    hooks=frozenset({TOWER, COMPRESS}),
    serves_streams=True,
    tower_kind="SiglipEncoderLayer",
    build_across_gpus=build_across_gpus,
)
