"""A toy framework for the tests of stc-bench's machinery (runner, resume, sweep, compare, reports).

It keeps the contract of the real frameworks (``FrameworkSpec``, a pipeline with the three timed
stages vit, compress and prefill, both hook points, exact token counts, captured features and
logits, a MAC model) at a size where a whole run takes milliseconds: about 700 parameters.

Per chunk of ``chunk_frames`` frames (1 by default): a one-layer SigLIP tower (width 4, 10x10
patches of one pixel: 100 tokens per frame) -> a Linear projector -> the arm's compression hook
-> a pre-fill that appends the chunk's keys and values to a cache. The tower is transformers'
own ``SiglipVisionModel``, so the STC arm runs the real STC-Cacher through its real
integration; everything after the tower is written here. Every ``--scale`` builds the same toy,
so a test never builds anything larger by accident.

Registered only inside tests, by the ``toy`` fixture of ``tests/stc_bench/conftest.py``; the CLI
reaches it through ``stc-bench sweep toy`` (its framework commands are made at import time from
the real registry).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from stc_bench.frameworks.framework import FrameworkSpec, Preset, StreamOutput, method_stream
from stc_bench.frameworks.parts import (
    TowerShape,
    build_siglip,
    chunk_kinds,
    chunk_starts,
    embedding_macs,
    stream_ids,
    tower_site,
    vit_shape,
)
from stc_bench.frameworks.weights import build_random, refuse_checkpoint
from stc_bench.methods import get_method
from stc_bench.methods.method import COMPRESS, TOWER, Arm, MethodStream
from stc_bench.timing import StageTimer

NAME = "toy"
"""The framework's name in the registry, in results files and run-folder names."""

TOWER_SHAPE = TowerShape(width=4, mlp=8, layers=1, heads=2, image_size=10, patch_size=1)
"""100 tokens per frame: above the default --tokens-per-frame 64, so STC-Pruner prunes."""
LLM_WIDTH = 4
"""Width of the projected visual tokens and of the decoder's keys and values."""
VOCAB = 8
"""The decoder's vocabulary: the query's ids and the logits fidelity compares."""
QUERY_TOKENS = 4
"""Length of the fixed query pre-filled (untimed) after the stream when fidelity is captured."""

PRESETS = {scale: Preset(scale, "the toy (every scale is the same ~700-parameter model): for tests")
           for scale in ("full", "small", "tiny")}
"""Every scale a run can ask for (auto picks full on CUDA, small on CPU), all the same toy."""


class ToyDecoder(nn.Module):
    """A one-layer key/value cache: pre-fill projects each token to a key and a value and appends
    them; a query reads the cache with one attention head and maps to vocabulary logits."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, vocab)

    def prefill(self, tokens: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Append the keys and values of tokens (L, C) to ``cache``."""
        cache.append((self.k_proj(tokens), self.v_proj(tokens)))                          # (L, C) each

    def query_logits(self, ids: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits (L, V) of query ids (L,) reading every cached token."""
        q = self.embed(ids)                                                                # (L, C)
        keys = torch.cat([k for k, _ in cache])                                            # (N, C)
        values = torch.cat([v for _, v in cache])                                          # (N, C)
        weights = torch.softmax(q @ keys.T / math.sqrt(q.shape[-1]), dim=-1)              # (L, N)
        return self.head(q + weights @ values)                                             # (L, V)


class ToyPipeline:
    """The built toy on one device; ``stream`` runs one video through it."""

    stages = ("vit", "compress", "prefill")
    default_chunk_frames = 1
    mean = std = (0.5, 0.5, 0.5)  # SigLIP preprocessing
    notes = ["The toy framework of stc-bench's tests: its latencies mean nothing."]

    def __init__(self, scale: str, vision_tower: nn.Module, projector: nn.Module, decoder: ToyDecoder, seed: int):
        self.scale = scale
        self.vision_tower = vision_tower
        self.projector = projector
        self.decoder = decoder
        self.image_size = TOWER_SHAPE.image_size
        self.site = tower_site(NAME, FRAMEWORK.hooks, vision_tower, TOWER_SHAPE.grid**2, TOWER_SHAPE.layers)
        g = torch.Generator().manual_seed(seed)
        self._query_ids = torch.randint(0, VOCAB, (QUERY_TOKENS,), generator=g).to(projector.weight.device)

    @property
    def description(self) -> dict[str, Any]:
        """Architecture facts for the report."""
        return {"vit": TOWER_SHAPE.describe("SigLIP"), "llm": f"toy key/value cache, width {LLM_WIDTH}, vocab {VOCAB}",
                "tokens": f"{TOWER_SHAPE.grid**2} ViT tokens per frame, projected, not pooled"}

    def stream(self, clip: torch.Tensor, arm: Arm, timer: StageTimer, chunk_frames: int,
               capture: bool = False) -> StreamOutput:
        """One video (T, 3, H, W), or S videos in lockstep (S, T, 3, H, W), chunk by chunk through the
        three timed stages; with ``capture``, also the first video's final ViT features and the
        logits of a fixed query read (untimed) from its cache."""
        clips = clip if clip.dim() == 5 else clip[None]                                              # (S, T, 3, H, W)
        streams, frames = clips.shape[:2]
        caches: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(streams)]
        method: MethodStream = method_stream(arm, self.site)
        features, vit_tokens, steps = [], 0, []
        bounds = chunk_starts(frames, chunk_frames)
        with method.tower():
            for chunk, (start, end) in enumerate(bounds):
                serving = method.serving(stream_ids(streams, end - start)) if streams > 1 else contextlib.nullcontext()
                with serving, timer.span("vit", chunk):
                    encoded = self.vision_tower(pixel_values=clips[:, start:end].flatten(0, 1), output_hidden_states=True)
                    feats = encoded.hidden_states[-1]                                                # (S*t, n, d), before post-norm
                with timer.span("compress", chunk):
                    visual = method.compress_streams(self.projector(feats).unflatten(0, (streams, -1)))  # (S, K, C)
                with timer.span("prefill", chunk):
                    for s in range(streams):                                                         # a toy: one cache each
                        self.decoder.prefill(visual[s], caches[s])                                   # (K, C)
                vit_tokens += feats.shape[0] * feats.shape[1]
                steps.append(visual.shape[1])
                if capture:
                    features.append(feats[: end - start])
        return StreamOutput(
            tokens={"vit": vit_tokens, "compress": streams * sum(steps), "prefill": streams * sum(steps)},
            llm_steps=steps,
            chunk_kinds=chunk_kinds(method.cacher_stats, len(bounds)),
            cacher_stats=method.cacher_stats,
            graph_stats=method.graph_stats,
            features=torch.cat(features) if capture else None,
            logits=self.decoder.query_logits(self._query_ids, caches[0]) if capture else None,
            streams=streams,
        )

    def macs(self, frames: int, arm: Arm, chunk_frames: int, out: StreamOutput) -> dict[str, int | None]:
        """Multiply-adds per stage. vit: patch embedding + the encoder layer under the arm.
        compress: the projector on the tokens the tower left (the arm's hook left out, as in the
        real frameworks). prefill: a key and a value projection of every token sent."""
        return {
            "vit": out.streams * (embedding_macs(TOWER_SHAPE, frames)
                                  + get_method(arm.method).tower_macs(arm, vit_shape(TOWER_SHAPE), frames)),
            "compress": out.tokens["vit"] * TOWER_SHAPE.width * LLM_WIDTH,
            "prefill": out.streams * 2 * sum(out.llm_steps) * LLM_WIDTH * LLM_WIDTH,
        }

    def modules(self) -> list[nn.Module]:
        """The tower, the projector and the decoder."""
        return [self.vision_tower, self.projector, self.decoder]


def build(scale: str, device: torch.device, dtype: torch.dtype, seed: int = 0, checkpoint: str | None = None) -> ToyPipeline:
    """The toy with random weights (the same at every ``scale``); no checkpoints."""
    refuse_checkpoint(NAME, checkpoint)
    tower = build_siglip(TOWER_SHAPE, device, dtype, seed)
    projector = build_random(lambda: nn.Linear(TOWER_SHAPE.width, LLM_WIDTH), device, dtype, seed + 1)
    decoder = build_random(lambda: ToyDecoder(LLM_WIDTH, VOCAB), device, dtype, seed + 2)
    return ToyPipeline(scale, tower, projector, decoder, seed)


FRAMEWORK = FrameworkSpec(
    name=NAME,
    summary="toy: a one-layer SigLIP tower, a Linear projector and a key/value cache (tests only)",
    presets=PRESETS,
    build=build,
    hooks=frozenset({TOWER, COMPRESS}),
    serves_streams=True,
    tower_kind="SiglipEncoderLayer",
)
