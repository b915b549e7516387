"""StreamForest-Qwen2-7B (frameworks.md A.2), as STC's StreamForest benchmark streams it.

Frames go to SigLIP (26 layers, 729 tokens) one at a time, the cacher's natural setting. At
query time StreamForest builds its memory from all frames so far and pre-fills it once with
the prompt: the newest frame at 729 tokens, each older frame of the short-term window merged
to 128 tokens by ToMe, and older events merged to 64 tokens per frame in long-term memory.
STC applies only the cacher here; the memory and the pre-fill are timed to show where the
time goes, and carry the same token counts in both arms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stc.flops import prefill_macs, projector_macs
from stc_bench.frameworks.framework import FrameworkSpec, Preset, StreamOutput, method_stream
from stc_bench.frameworks.parts import (
    SIGLIP_QWEN2,
    CausalLM,
    TowerLLMShape,
    build_siglip,
    chunk_kinds,
    chunk_starts,
    describe_llm,
    embedding_macs,
    encode_steps,
    tower_site,
    vit_shape,
)
from stc_bench.frameworks.weights import build_random, refuse_checkpoint
from stc_bench.methods import get_method
from stc_bench.methods.method import TOWER, Arm
from stc_bench.methods.tome import merge_to_count
from stc_bench.timing import StageTimer

SHORT_TERM_TOKENS = 128
LONG_TERM_TOKENS_PER_FRAME = 64
SHORT_TERM_WINDOW = 18
EVENT_SPLIT_WINDOW = 8
LONG_TERM_QUOTA = 5120
PROMPT_TOKENS = 32
"""Time message and question pre-filled after the memory (pseudo-tokens of about the right length)."""
QUERY_TOKENS = 8
"""The last prompt tokens, whose logits the fidelity figures compare."""


def merge_tokens(x: torch.Tensor, target: int) -> torch.Tensor:
    """StreamForest's ToMe merge of tokens x (n, C) down to ``target`` (x itself when n <= target):
    the ToMe arm's own bipartite soft matching and size-weighted merge, one implementation for
    both (``stc_bench.methods.tome.merge_to_count``)."""
    return merge_to_count(x.unsqueeze(0), target)[0].squeeze(0)                        # (min(n, target), C)


def memory_tokens(frames: list[torch.Tensor]) -> torch.Tensor:
    """StreamForest's memory for the frames so far, each (729, C): long-term, short-term, now.

    Short-term holds the older frames (128 tokens each) until it reaches 26 frames; then the
    first event (cut at the lowest adjacent-frame similarity within its first 8 frames) is
    merged to 64 tokens per frame into long-term memory. Long-term stays under 5120 tokens by
    merging the most similar adjacent events (StreamForest's penalty also weighs time and merge
    counts; similarity dominates it and is what is modelled here).
    """
    short: list[torch.Tensor] = []
    events: list[tuple[int, torch.Tensor]] = []                                       # (frames, tokens)
    for frame in frames[:-1]:
        short.append(merge_tokens(frame, SHORT_TERM_TOKENS))
        if len(short) >= SHORT_TERM_WINDOW + EVENT_SPLIT_WINDOW:
            means = torch.stack([s.float().mean(0) for s in short[: EVENT_SPLIT_WINDOW + 1]])
            similarity = F.cosine_similarity(means[:-1], means[1:], dim=-1)            # (8,)
            cut = int(similarity.argmin()) + 1
            popped, short = short[:cut], short[cut:]
            events.append((cut, merge_tokens(torch.cat(popped), LONG_TERM_TOKENS_PER_FRAME * cut)))
            while sum(e.shape[0] for _, e in events) > LONG_TERM_QUOTA and len(events) > 1:
                means = torch.stack([e.float().mean(0) for _, e in events])
                i = int(F.cosine_similarity(means[:-1], means[1:], dim=-1).argmax())
                count = math.ceil((events[i][0] + events[i + 1][0]) / 2)
                joined = merge_tokens(torch.cat([events[i][1], events[i + 1][1]]), LONG_TERM_TOKENS_PER_FRAME * count)
                events[i : i + 2] = [(count, joined)]
    return torch.cat([e for _, e in events] + short + [frames[-1]])


SHAPES = SIGLIP_QWEN2
PRESETS = {
    "full": Preset("full", "StreamForest-Qwen2-7B: SigLIP-so400m (26 layers) + ToMe memory + Qwen2-7B"),
    "small": Preset("small", "same token counts (729 per frame, 128/64 in memory), narrow towers: for CPUs"),
    "tiny": Preset("tiny", "toy widths, same token structure: for tests"),
}


class StreamForestPipeline:
    """Built StreamForest parts; ``stream`` encodes frames one by one, then answers once."""

    stages = ("vit", "compress", "prefill")
    default_chunk_frames = 1
    mean = std = (0.5, 0.5, 0.5)
    notes = [
        "StreamForest uses STC-Cacher only: memory building (compress) and pre-fill carry the same token "
        "counts in both arms; they are timed to show where the time goes.",
        "Memory follows StreamForest's MemoryManager token budgets (729 / 128 / 64 per frame, 5120 long-term); "
        "its sin-cos position embeddings (an elementwise add) are left out and long-term merges are chosen "
        "by similarity alone.",
        "From 27 frames on, the memory's event split picks its cut on the host (a data-dependent size, as in "
        "StreamForest itself): the compress stage then holds one host sync per split, in both arms.",
    ]

    def __init__(self, scale: str, shape: TowerLLMShape, vision_tower: nn.Module, projector: nn.Module,
                 llm: CausalLM, seed: int):
        self.scale = scale
        self.shape = shape
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_size = shape.tower.image_size
        self.site = tower_site("streamforest", FRAMEWORK.hooks, vision_tower, shape.tower.grid**2, shape.tower.layers)
        self._prompt_ids = llm.random_ids(PROMPT_TOKENS, seed)

    def modules(self) -> list[nn.Module]:
        """The vision tower, the projector and the LLM's modules."""
        return [self.vision_tower, self.projector, *self.llm.modules()]

    @property
    def description(self) -> dict[str, Any]:
        """Architecture facts for the report."""
        return {
            "vit": self.shape.tower.describe("SigLIP"),
            "llm": describe_llm(self.shape.llm),
            "tokens": f"{self.shape.tower.grid ** 2} ViT tokens per frame; memory: newest frame 729, older frames "
                      f"{SHORT_TERM_TOKENS}, long-term {LONG_TERM_TOKENS_PER_FRAME}; +{PROMPT_TOKENS} prompt tokens",
        }

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """Encode every frame (timed per step), then build memory and pre-fill it with the prompt."""
        method = method_stream(arm, self.site)
        steps = encode_steps(self.vision_tower, clip, method, timer, chunk_frames)
        stats = method.cacher_stats
        features = [f for step in steps for f in step.unbind(0)]                          # (n, d) each: 729 unless merged
        with timer.span("compress", 0):
            memory = self.projector(memory_tokens(features))                              # (M, C)
        with timer.span("prefill", 0):
            embeds = torch.cat([memory, self.llm.embed(self._prompt_ids)[0]]).unsqueeze(0)  # (1, M + P, C)
            # Into a KV cache, as the answer's decoding needs (and without one transformers
            # checks the positions for packed sequences, a host sync inside the span).
            hidden = self.llm.forward_embeds(embeds, self.llm.new_cache())
        return StreamOutput(
            tokens={"vit": sum(f.shape[0] for f in features), "compress": memory.shape[0], "prefill": embeds.shape[1]},
            llm_steps=[embeds.shape[1]],
            chunk_kinds=chunk_kinds(stats, len(chunk_starts(clip.shape[0], chunk_frames))),
            cacher_stats=stats,
            graph_stats=method.graph_stats,
            features=torch.stack(features) if capture and len({f.shape for f in features}) == 1 else None,
            logits=self.llm.lm_head(hidden[0, -QUERY_TOKENS:]) if capture else None,
        )

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """Multiply-adds of each timed stage. vit: patch embedding on every frame + the encoder layers
        under the arm (post-LayerNorm: no MACs). compress: the projector on the memory's tokens (the
        memory's ToMe matching and merges, like ToMe's, left out). prefill: the one pre-fill of
        memory + prompt (prompt embedding: a lookup; no logits inside the span)."""
        tower = self.shape.tower
        return {"vit": embedding_macs(tower, frames) + get_method(arm.method).tower_macs(arm, vit_shape(tower), frames),
                "compress": projector_macs(out.tokens["compress"], tower.width, self.shape.llm.width),
                "prefill": sum(prefill_macs(self.shape.llm, m, logits_tokens=0) for m in out.llm_steps)}


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None) -> StreamForestPipeline:
    """Build StreamForest at ``scale`` with random weights (checkpoints: not yet supported)."""
    refuse_checkpoint("streamforest", checkpoint)
    shape = SHAPES[scale]
    tower = build_siglip(shape.tower, device, dtype, seed)
    projector = build_random(lambda: nn.Sequential(nn.Linear(shape.tower.width, shape.llm.width), nn.GELU(),
                                                   nn.Linear(shape.llm.width, shape.llm.width)), device, dtype, seed + 1)
    return StreamForestPipeline(scale, shape, tower, projector, CausalLM.random(shape.llm, device, dtype, seed + 2), seed)


FRAMEWORK = FrameworkSpec(
    name="streamforest",
    summary="StreamForest-Qwen2-7B: SigLIP ViT frame by frame, ToMe memory, one Qwen2-7B pre-fill per query",
    presets=PRESETS,
    build=build,
    hooks=frozenset({TOWER}),
    tower_kind="SiglipEncoderLayer",
)
