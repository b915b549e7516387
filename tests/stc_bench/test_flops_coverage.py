"""The MAC model counts every weight matrix each timed stage runs, at tiny and full scale.

For one frame (one temporal group in LiveCC) of the baseline, each stage's MAC figure must equal
the count derived from the built modules: every Linear / Conv weight's size times the tokens it
is applied to (the parameter count implied by the MAC model, weighted by tokens), plus the
attention products (activations times activations, no weights). A weight matrix missing from
the model, or one the model counts but the stage does not run, breaks the equality.

Left out on purpose, and checked to be all that is left out:
- 1-D parameters: biases, LayerNorm/RMSNorm scales, CLIP's class embedding (elementwise, no MACs);
- ``nn.Embedding`` tables: ViT position embeddings and the LLM's token embeddings (lookups: visual
  tokens enter the LLM as embeddings, text turns are looked up);
- the LM head: no timed span computes logits (fidelity logits are computed untimed).
"""

import pytest
import torch
from torch import nn

from stc_bench.frameworks import get_framework
from stc_bench.frameworks.framework import StreamOutput
from stc_bench.frameworks.livecc import TURN_TOKENS
from stc_bench.frameworks.rekv import SYSTEM_PROMPT_TOKENS
from stc_bench.frameworks.streamforest import PROMPT_TOKENS
from stc_bench.measurement import BASELINE

WEIGHTED = (nn.Linear, nn.Conv2d, nn.Conv3d)


def weight_macs(module: nn.Module, tokens) -> int:
    """Sum over the module's Linear/Conv weights of size x tokens(name); every other parameter
    must be one of the documented exclusions."""
    total, seen = 0, set()
    for name, sub in module.named_modules():
        if isinstance(sub, WEIGHTED):
            total += sub.weight.numel() * tokens(name)
            seen.add(id(sub.weight))
        elif isinstance(sub, nn.Embedding):
            seen.add(id(sub.weight))
    for name, p in module.named_parameters():
        assert id(p) in seen or p.dim() == 1, f"{name} {tuple(p.shape)}: a weight the MAC model does not know"
    return total


def decoder_macs(llm, m: int, past: int) -> int:
    """The decoder on m new tokens over a cache of ``past``: weights + causal attention products."""
    s = llm.shape
    attention = s.layers * 2 * s.width * (m * past + m * (m + 1) // 2)
    return weight_macs(llm.decoder, lambda name: m) + attention


def vit_attention(layers: int, tokens: int, width: int) -> int:
    return layers * 2 * tokens * tokens * width


def build(framework: str, scale: str):
    device = torch.device("meta") if scale == "full" else torch.device("cpu")
    return get_framework(framework).build(scale, device, torch.float32, 0)


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_rekv(scale):
    p = build("rekv", scale)
    t = p.shape.tower
    n, k = t.grid**2, p.pooled_tokens
    out = StreamOutput(tokens={"vit": n, "compress": k, "prefill": k}, llm_steps=[k], chunk_kinds=["full"])
    macs = p.macs(1, BASELINE, 1, out)
    assert macs["vit"] == weight_macs(p.vision_tower, lambda name: n) + vit_attention(t.layers, n, t.width)
    assert macs["compress"] == weight_macs(p.projector, lambda name: n)                  # before pooling
    assert macs["prefill"] == decoder_macs(p.llm, k, SYSTEM_PROMPT_TOKENS)


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_streamforest(scale):
    p = build("streamforest", scale)
    t = p.shape.tower
    n = t.grid**2
    out = StreamOutput(tokens={"vit": n, "compress": n, "prefill": n + PROMPT_TOKENS}, llm_steps=[n + PROMPT_TOKENS],
                       chunk_kinds=["full"])
    macs = p.macs(1, BASELINE, 1, out)
    assert macs["vit"] == weight_macs(p.vision_tower, lambda name: n) + vit_attention(t.layers, n, t.width)
    assert macs["compress"] == weight_macs(p.projector, lambda name: n)                  # one frame: memory = 729
    assert macs["prefill"] == decoder_macs(p.llm, n + PROMPT_TOKENS, 0)


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_dispider(scale):
    p = build("dispider", scale)
    t = p.shape.tower
    patches = t.grid**2
    out = StreamOutput(tokens={"vit": patches + 1}, llm_steps=[], chunk_kinds=["full"])
    tokens = lambda name: patches if name.endswith("patch_embedding") else patches + 1   # noqa: E731 (CLS is not a patch)
    assert p.macs(1, BASELINE, 16, out)["vit"] == (weight_macs(p.vision_tower, tokens)
                                                   + vit_attention(t.layers, patches + 1, t.width))


@pytest.mark.parametrize("scale", ["tiny", "full"])
def test_livecc(scale):
    p = build("livecc", scale)
    v = p.shape.vision
    n, merged = v.tokens, v.merged_tokens
    out = StreamOutput(tokens={"vit": n, "prefill": merged + TURN_TOKENS}, llm_steps=[merged + TURN_TOKENS],
                       chunk_kinds=["full"])
    macs = p.macs(2, BASELINE, 2, out)                                                      # one temporal group
    tokens = lambda name: merged if name.startswith("merger.") else n                      # noqa: E731
    assert macs["vit"] == weight_macs(p.vision_tower, tokens) + vit_attention(v.depth, n, v.width)
    assert macs["prefill"] == decoder_macs(p.llm, merged + TURN_TOKENS, 0)


def test_the_lm_head_is_the_only_llm_module_left_out():
    p = build("rekv", "tiny")
    assert p.modules() == [p.vision_tower, p.projector, p.llm.decoder, p.llm.lm_head]
