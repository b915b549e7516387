"""Parts shared by the frameworks: vision-tower and LLM shapes per scale, random-weight
builders from transformers classes, and the decoder wrapper used for pre-fill."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

import stc
from stc.cacher import CacherStats
from stc.flops import LLMShape, ViTShape, patch_embedding_macs
from stc_bench.frameworks.weights import build_random
from stc_bench.methods.method import HookSite, MethodStream


@dataclass(frozen=True)
class TowerShape:
    """A ViT: width, MLP width, layers, heads, input size and patch size."""

    width: int
    mlp: int
    layers: int
    heads: int
    image_size: int
    patch_size: int

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def describe(self, name: str) -> str:
        """One line for reports."""
        return (f"{name} {self.layers} layers, width {self.width}, MLP {self.mlp}, {self.heads} heads, "
                f"{self.image_size} px / patch {self.patch_size}")


# SigLIP-so400m as LLaVA-OneVision and StreamForest run it (26 of 27 layers); small keeps the
# 729 tokens per frame with a narrow, shallow stack; tiny keeps 729 tokens at toy width.
SIGLIP = {
    "full": TowerShape(1152, 4304, 26, 16, 384, 14),
    "small": TowerShape(256, 1024, 6, 4, 384, 14),
    "tiny": TowerShape(32, 64, 2, 4, 54, 2),
}
SIGLIP["72b"] = SIGLIP["full"]  # LLaVA-OneVision-72B keeps the 7B's tower

# Qwen2-7B (ReKV, StreamForest, and LiveCC's Qwen2-VL-7B text model, same FLOPs).
QWEN2 = {
    "full": LLMShape(width=3584, mlp_width=18944, layers=28, heads=28, kv_heads=4, vocab=152064),
    "small": LLMShape(width=512, mlp_width=1408, layers=4, heads=8, kv_heads=2, vocab=16384),
    "tiny": LLMShape(width=64, mlp_width=128, layers=2, heads=4, kv_heads=2, vocab=512),
    # Qwen2-72B-Instruct, LLaVA-OneVision-72B's LLM: hidden_size 8192, intermediate_size 29568,
    # 80 layers, 64 heads, 8 KV heads, vocab_size 152064, rope_theta 1e6, rms_norm_eps 1e-6,
    # untied head (HFCFG: Qwen/Qwen2-72B-Instruct config.json). About 72.7e9 parameters, 135 GiB in
    # float16: larger than one GPU, so built only with --device-map auto.
    "72b": LLMShape(width=8192, mlp_width=29568, layers=80, heads=64, kv_heads=8, vocab=152064),
}


@dataclass(frozen=True)
class TowerLLMShape:
    """A framework built from a vision tower and a decoder LLM (ReKV, StreamForest)."""

    tower: TowerShape
    llm: LLMShape


SIGLIP_QWEN2 = {scale: TowerLLMShape(SIGLIP[scale], QWEN2[scale]) for scale in ("full", "small", "tiny", "72b")}
"""SigLIP-so400m (26 layers) + Qwen2-7B, their small and tiny stand-ins, and + Qwen2-72B."""


def describe_llm(shape: LLMShape, name: str = "Qwen2") -> str:
    """One line for reports."""
    return (f"{name} {shape.layers} layers, width {shape.width}, MLP {shape.mlp_width}, {shape.heads} heads "
            f"({shape.kv_heads} KV), vocab {shape.vocab}")


def siglip_config(shape: TowerShape):
    """``SiglipVisionConfig`` of a SigLIP-so400m-like tower (no pooling head)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=shape.width, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, image_size=shape.image_size, patch_size=shape.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
    )


def llm_parameters(shape: LLMShape) -> int:
    """Parameters of a Qwen2 decoder of ``shape`` with an untied LM head: per layer the q, k, v
    (with biases) and o projections, the gated MLP and two RMSNorms; then the token embedding,
    the final norm and the LM head. The matrices are those ``stc.flops.prefill_macs`` multiplies
    each token by, so its count for one token, attention left out, is the weights less the
    embedding, biases and norms."""
    d, kv = shape.width, shape.kv_heads * (shape.width // shape.heads)
    per_layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * shape.mlp_width + 2 * d
    return shape.layers * per_layer + 2 * shape.vocab * d + d


def qwen2_config(shape: LLMShape):
    """``Qwen2Config`` of a Qwen2-7B-like decoder (rope theta 1e6, untied head)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape.width, intermediate_size=shape.mlp_width, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
        rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
    )


def build_siglip(shape: TowerShape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-weight ``SiglipVisionModel``."""
    from transformers import SiglipVisionModel

    return build_random(lambda: SiglipVisionModel(siglip_config(shape)), device, dtype, seed)


def attention_implementations(modules: list[nn.Module]) -> dict[str, str]:
    """Which attention kernel family (``attn_implementation``: sdpa, eager, flash...) each built
    transformers model runs, by class name, for the run's record."""
    found = {}
    for module in modules:
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if implementation:
            found[type(module).__name__] = implementation
    return found


def vit_shape(shape: TowerShape, prefix_tokens: int = 0) -> ViTShape:
    """The FLOP-model shape of a tower (prefix tokens, e.g. CLS, on top of the patches)."""
    return ViTShape(tokens=shape.grid**2 + prefix_tokens, width=shape.width, mlp_width=shape.mlp,
                    layers=shape.layers, prefix_tokens=prefix_tokens)


def embedding_macs(shape: TowerShape, frames: int) -> int:
    """MACs of a SigLIP/CLIP tower's work outside its encoder layers on ``frames`` frames: the
    patch embedding on every patch of every frame (each arm pays it alike). The rest costs no
    MACs: position-embedding lookup and add, CLIP's class token and pre/post LayerNorms,
    SigLIP's post-LayerNorm (no pooling head is built)."""
    return patch_embedding_macs(frames * shape.grid**2, shape.width, shape.patch_size)


class CausalLM:
    """A decoder (``Qwen2Model``-like: ``inputs_embeds`` in, hidden states out) and its LM head."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, shape: LLMShape):
        from stc_bench.frameworks.transformers_compat import cache_keyword

        self.decoder = decoder
        self.lm_head = lm_head
        self.shape = shape
        self._cache_keyword = cache_keyword(decoder)   # "cache", or "past_key_values" before it existed

    @classmethod
    def random(cls, shape: LLMShape, device: torch.device, dtype: torch.dtype, seed: int,
               device_map: str = "none") -> CausalLM:
        """A random-weight Qwen2 of ``shape`` on ``device``; with ``device_map="auto"``, placed
        across every visible GPU instead (``stc_bench.placement``)."""
        from transformers import Qwen2ForCausalLM

        def factory():
            return Qwen2ForCausalLM(qwen2_config(shape))

        if device_map == "auto":
            from stc_bench.placement import place_random

            model = place_random(factory, dtype, seed)
        else:
            model = build_random(factory, device, dtype, seed)
        return cls(model.model, model.lm_head, shape)

    def modules(self) -> list[nn.Module]:
        """The decoder and the LM head."""
        return [self.decoder, self.lm_head]

    @property
    def device(self) -> torch.device:
        """Where the decoder's weights live."""
        return next(self.decoder.parameters()).device

    def new_cache(self):
        """An empty KV cache."""
        from transformers import DynamicCache

        return DynamicCache()

    def forward_embeds(self, embeds: torch.Tensor, cache=None) -> torch.Tensor:
        """Pre-fill embeddings (B, L, C) of B sequences (B concurrent streams, each its own row of
        ``cache``), appending to ``cache`` when given; hidden states (B, L, C)."""
        cache_kwarg = {self._cache_keyword: cache}
        return self.decoder(inputs_embeds=embeds, use_cache=cache is not None, **cache_kwarg).last_hidden_state

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (1, L) -> embeddings (1, L, C)."""
        return self.decoder.get_input_embeddings()(ids)

    def text_logits(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        """Pre-fill text ids (1, L); logits at every position (L, V)."""
        return self.lm_head(self.forward_embeds(self.embed(ids), cache)[0])

    def random_ids(self, length: int, seed: int) -> torch.Tensor:
        """Fixed pseudo-text token ids (1, length): prompts and queries of random-weight runs."""
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.shape.vocab, (1, length), generator=g).to(self.device)


def encode_steps(tower: nn.Module, clip: torch.Tensor, method: MethodStream, timer, chunk_frames: int) -> list[torch.Tensor]:
    """Feed the clip (T, 3, H, W), or S clips served in lockstep (S, T, 3, H, W), to a CLIP/SigLIP
    tower ``chunk_frames`` frames (of each clip) per call under the arm's tower hook, each call
    timed as stage "vit"; returns the last-layer features (before post-norm) of every call,
    (S * t, n, d) with the S clips' frames stream-major."""
    clips = clip if clip.dim() == 5 else clip[None]                                   # (S, T, 3, H, W)
    streams, frames = clips.shape[:2]
    features = []
    with method.tower():
        for step, (start, end) in enumerate(chunk_starts(frames, chunk_frames)):
            batch = clips[:, start:end].flatten(0, 1)                                # (S * t, 3, H, W)
            serving = method.serving(stream_ids(streams, end - start)) if streams > 1 else contextlib.nullcontext()
            with serving, timer.span("vit", step):  # naming the streams is bookkeeping, outside the span
                features.append(tower(pixel_values=batch, output_hidden_states=True).hidden_states[-1])
    return features


def stream_ids(streams: int, frames: int) -> tuple[int, ...]:
    """The stream of each frame of a lockstep step that carries ``frames`` frames of each of
    ``streams`` streams, stream-major: (0, 0, 1, 1, ...)."""
    return tuple(s for s in range(streams) for _ in range(frames))


def tower_site(framework: str, hooks: frozenset[str], tower: nn.Module, tokens: int, layers: int,
               pool=None) -> HookSite:
    """The hook site of a built pipeline whose tower is ``tower`` (its layer class found by STC's
    integration, so CLS handling follows the tower)."""
    _, _, kind = stc.integrations.find_vision_layers(tower)
    site = HookSite(framework, hooks, tower=tower, tower_kind=kind, class_token=kind == "CLIPEncoderLayer",
                    tower_tokens=tokens, tower_layers=layers)
    if pool is not None:
        site.pool = pool
    return site


def chunk_kinds(stats: CacherStats | None, chunks: int) -> list[str]:
    """Per ViT call, what the cacher did: "full" without a cacher, else refresh/selective/mixed
    (of the first stream: streams served in lockstep share one schedule)."""
    if stats is None:
        return ["full"] * chunks
    first = [c for c in stats.calls if c.stream == stats.calls[0].stream]
    return ["refresh" if not c.selective_frames else "selective" if not c.refresh_frames else "mixed" for c in first]


def chunk_starts(frames: int, chunk_frames: int, first: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each streaming step: an optional first step of ``first`` frames, then
    steps of ``chunk_frames`` frames."""
    bounds, start = [], 0
    if first is not None and frames > 0:
        bounds.append((0, min(first, frames)))
        start = bounds[-1][1]
    while start < frames:
        bounds.append((start, min(start + chunk_frames, frames)))
        start = bounds[-1][1]
    return bounds
