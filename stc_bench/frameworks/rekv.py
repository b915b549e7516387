"""ReKV on LLaVA-OneVision-7B (frameworks.md A.1), streamed as ReKV + STC do it.

Per chunk of ``chunk_frames`` frames (1 in STC): SigLIP (26 layers, 729 tokens per frame,
last-layer features without post-norm) -> projector (Linear, GELU, Linear) -> 2x2 bilinear
pooling (27x27 -> 14x14 = 196 tokens) -> STC-Pruner (+STC arm) -> one LLM pre-fill of the
chunk's visual tokens appended to the KV cache, after an untimed system-prompt pre-fill.

ReKV's retrieval and CPU offload of old KV blocks are not modelled: a plain growing
``DynamicCache`` equals ReKV's compute while the stream fits its 15000-token local window.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import stc
from stc.flops import LLMShape, ViTShape, streamed_prefill_macs, vit_tower_macs
from stc_bench.frameworks.framework import ArmSettings, FrameworkSpec, Preset, StreamOutput
from stc_bench.frameworks.weights import CheckpointError, build_random, read_checkpoint_config
from stc_bench.timing import StageTimer

SYSTEM_PROMPT_TOKENS = 24
"""Length of the untimed init prompt (ReKV's system + user preamble is about this long)."""
QUERY_TOKENS = 8
"""Length of the fixed query pre-filled after the stream when fidelity is captured."""


@dataclass(frozen=True)
class RekvShape:
    """Architecture of one ReKV scale: SigLIP tower, projector, Qwen2 LLM."""

    vit_width: int
    vit_mlp: int
    vit_layers: int
    vit_heads: int
    image_size: int
    patch_size: int
    llm_width: int
    llm_mlp: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int


SHAPES: dict[str, RekvShape] = {
    # Exact LLaVA-OneVision-7B: SigLIP-so400m with 26 of 27 layers, Qwen2-7B.
    "full": RekvShape(1152, 4304, 26, 16, 384, 14, 3584, 18944, 28, 28, 4, 152064),
    # Same structure and token counts (384 px, patch 14: 729 -> 196 per frame), narrower and
    # shallower so the default run takes about two minutes on a 2-core CPU.
    "small": RekvShape(256, 1024, 6, 4, 384, 14, 512, 1408, 4, 8, 2, 16384),
    # For tests: still 729 ViT tokens (54 px, patch 2) and 196 pooled tokens per frame.
    "tiny": RekvShape(32, 64, 2, 4, 54, 2, 64, 128, 2, 4, 2, 512),
}


def _preset(name: str, shape: RekvShape, summary: str) -> Preset:
    return Preset(name, summary, dict(shape.__dict__))


PRESETS = {
    "full": _preset("full", SHAPES["full"], "LLaVA-OV-7B: SigLIP-so400m (26 layers) + Qwen2-7B"),
    "small": _preset("small", SHAPES["small"], "same token counts, narrow towers: ~2 min default run on a 2-core CPU"),
    "tiny": _preset("tiny", SHAPES["tiny"], "toy widths, same 729 -> 196 token structure: for tests"),
}


def _configs(shape: RekvShape):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=shape.vit_width, intermediate_size=shape.vit_mlp, num_hidden_layers=shape.vit_layers,
        num_attention_heads=shape.vit_heads, image_size=shape.image_size, patch_size=shape.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=shape.llm_width, intermediate_size=shape.llm_mlp, num_hidden_layers=shape.llm_layers,
        num_attention_heads=shape.llm_heads, num_key_value_heads=shape.llm_kv_heads, vocab_size=shape.vocab,
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
    )
    return LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict()), vision, text


def pool_2x2_bilinear(features: torch.Tensor, grid: int) -> torch.Tensor:
    """LLaVA-OneVision's video pooling: (T, grid^2, C) -> (T, ceil(grid/2)^2, C), bilinear.

    Mirrors ``LlavaOnevisionModel.apply_pooling`` (transformers 4.45 to 5.x).
    """
    frames, _, channels = features.shape
    x = features.view(frames, grid, grid, channels).permute(0, 3, 1, 2)              # (T, C, g, g)
    side = math.ceil(grid / 2)
    x = F.interpolate(x, size=(side, side), mode="bilinear")                          # (T, C, s, s)
    return x.permute(0, 2, 3, 1).reshape(frames, side * side, channels)               # (T, s^2, C)


class RekvPipeline:
    """Built ReKV parts on one device; ``stream`` runs one video through them."""

    stages = ("vit", "compress", "prefill")

    def __init__(self, scale: str, shape: RekvShape, vision_tower: nn.Module, projector: nn.Module,
                 language_model: nn.Module, lm_head: nn.Module, seed: int):
        self.scale = scale
        self.shape = shape
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.lm_head = lm_head
        self.image_size = shape.image_size
        self.grid = shape.image_size // shape.patch_size
        device = next(language_model.parameters()).device
        g = torch.Generator().manual_seed(seed)
        self._prompt_ids = torch.randint(0, shape.vocab, (1, SYSTEM_PROMPT_TOKENS), generator=g).to(device)
        self._query_ids = torch.randint(0, shape.vocab, (1, QUERY_TOKENS), generator=g).to(device)

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
        s = self.shape
        return {
            "vit": f"SigLIP {s.vit_layers} layers, width {s.vit_width}, MLP {s.vit_mlp}, {s.vit_heads} heads, "
                   f"{s.image_size} px / patch {s.patch_size}",
            "llm": f"Qwen2 {s.llm_layers} layers, width {s.llm_width}, MLP {s.llm_mlp}, {s.llm_heads} heads "
                   f"({s.llm_kv_heads} KV), vocab {s.vocab}",
            "tokens": f"{self.vit_tokens} ViT tokens -> {self.pooled_tokens} pooled tokens per frame",
            "system_prompt_tokens": SYSTEM_PROMPT_TOKENS,
        }

    def _start_stream(self):
        from transformers import DynamicCache

        cache = DynamicCache()
        self._prefill_text(self._prompt_ids, cache)
        return cache

    def _prefill_text(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Pre-fill text token ids (1, L) into the cache; logits at every position (L, V)."""
        embeds = self.language_model.get_input_embeddings()(ids)                          # (1, L, C)
        hidden = self.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
        return self.lm_head(hidden[0])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """ViT features of the last layer, before post-norm: (t, 3, H, W) -> (t, 729, d)."""
        return self.vision_tower(pixel_values=frames, output_hidden_states=True).hidden_states[-1]

    def compress(self, features: torch.Tensor, pruner: stc.STCPruner | None) -> torch.Tensor:
        """Projector, pooling and (for +STC) the pruner: (t, 729, d) -> (t, k, C)."""
        pooled = pool_2x2_bilinear(self.projector(features), self.grid)                  # (t, 196, C)
        return pooled if pruner is None else pruner.compress(pooled).tokens              # (t, k, C)

    def prefill(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Append the chunk's visual tokens (t, k, C) to the KV cache; last-position logits (1, V),
        as ReKV's streaming step computes them."""
        embeds = tokens.reshape(1, -1, tokens.shape[-1])                                 # (1, t*k, C)
        hidden = self.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
        return self.lm_head(hidden[:, -1])

    def stream(self, clip: torch.Tensor, arm: ArmSettings, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """One video: untimed system prompt, then per chunk the three timed stages. With
        ``capture``, also the final ViT features and the logits of a fixed query pre-filled
        (untimed) after the stream: what the model would answer from, given each arm's cache."""
        cache = self._start_stream()
        pruner = stc.STCPruner(arm.pruner) if arm.pruner is not None else None
        features, tokens_out = [], 0
        attach = stc.cacher_attached(self.vision_tower, arm.cacher) if arm.cacher else contextlib.nullcontext()
        with attach as handle:
            for chunk, start in enumerate(range(0, clip.shape[0], chunk_frames)):
                frames = clip[start : start + chunk_frames]
                with timer.span("vit", chunk):
                    feats = self.encode(frames)
                with timer.span("compress", chunk):
                    visual = self.compress(feats, pruner)
                with timer.span("prefill", chunk):
                    self.prefill(visual, cache)
                tokens_out += visual.shape[0] * visual.shape[1]
                if capture:
                    features.append(feats)
        stats = handle.stats if handle is not None else None
        frames = clip.shape[0]
        return StreamOutput(
            tokens={"vit": frames * self.vit_tokens, "compress": tokens_out, "prefill": tokens_out},
            chunk_kinds=chunk_kinds(stats, -(-frames // chunk_frames)),
            cacher_stats=stats,
            features=torch.cat(features) if capture else None,
            logits=self._prefill_text(self._query_ids, cache) if capture else None,
        )

    def macs(self, frames: int, arm: ArmSettings, chunk_frames: int) -> dict[str, int | None]:
        """ViT and pre-fill multiply-adds of this stream; compress is not modelled (None)."""
        s = self.shape
        vit = ViTShape(tokens=self.vit_tokens, width=s.vit_width, mlp_width=s.vit_mlp, layers=s.vit_layers)
        llm = LLMShape(width=s.llm_width, mlp_width=s.llm_mlp, layers=s.llm_layers, heads=s.llm_heads,
                       kv_heads=s.llm_kv_heads, vocab=s.vocab)
        per_frame = self.pooled_tokens if arm.pruner is None else min(arm.pruner.tokens_per_frame, self.pooled_tokens)
        chunks = [min(chunk_frames, frames - start) * per_frame for start in range(0, frames, chunk_frames)]
        return {
            "vit": vit_tower_macs(vit, frames, arm.cacher),
            "compress": None,
            "prefill": streamed_prefill_macs(llm, chunks, past_tokens=SYSTEM_PROMPT_TOKENS),
        }


def chunk_kinds(stats, chunks: int) -> list[str]:
    """Per chunk, what the cacher did: "full" without a cacher, else refresh/selective/mixed."""
    if stats is None:
        return ["full"] * chunks
    kinds = []
    for call in stats.calls:
        kinds.append("refresh" if not call.selective_frames else "selective" if not call.refresh_frames else "mixed")
    return kinds


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None) -> RekvPipeline:
    """Build ReKV at ``scale`` with random weights, or from a local LLaVA-OneVision checkpoint."""
    if checkpoint is not None:
        return _load_checkpoint(checkpoint, device, dtype, seed)
    from transformers import Qwen2ForCausalLM, SiglipVisionModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

    shape = SHAPES[scale]
    config, vision, text = _configs(shape)
    tower = build_random(lambda: SiglipVisionModel(vision), device, dtype, seed)
    projector = build_random(lambda: LlavaOnevisionMultiModalProjector(config), device, dtype, seed + 1)
    llm = build_random(lambda: Qwen2ForCausalLM(text), device, dtype, seed + 2)
    return RekvPipeline(scale, shape, tower, projector, llm.model, llm.lm_head, seed)


def _load_checkpoint(path: str, device: torch.device, dtype: torch.dtype, seed: int) -> RekvPipeline:
    from transformers import LlavaOnevisionForConditionalGeneration

    raw = read_checkpoint_config(path, ("llava_onevision",))
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True
    ).to(device).eval()
    vc, tc = model.config.vision_config, model.config.text_config
    if raw.get("vision_feature_layer", -1) != -1:
        raise CheckpointError(f"--checkpoint {path}: vision_feature_layer {raw['vision_feature_layer']} is not -1; "
                         "only LLaVA-OneVision checkpoints with 26-layer towers read at layer -1 are supported")
    shape = RekvShape(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads,
                      vc.image_size, vc.patch_size, tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers,
                      tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size)
    inner = model.model
    return RekvPipeline("checkpoint", shape, inner.vision_tower, inner.multi_modal_projector,
                        inner.language_model, model.lm_head, seed)


FRAMEWORK = FrameworkSpec(
    name="rekv",
    summary="ReKV on LLaVA-OneVision-7B: SigLIP ViT + Qwen2-7B pre-fill into a KV cache",
    presets=PRESETS,
    build=build,
    stc_components="cacher + pruner",
)
