"""VisionZip (Yang et al., CVPR 2025) as pure tensor functions: per frame, keep the dominant
tokens (those the selection layer attends to most) and fold the rest into a few contextual
tokens by key similarity.

Follows dvlab-research/VisionZip ``CLIPVisionTower_VisionZip.forward`` (``visionzip/clip_encoder.py``)
with its keys from ``CLIPAttention_forward`` (``visionzip/utils.py``: keys averaged over heads):

- dominant: with a CLS token, the CLS token plus the ``dominant - 1`` patch tokens with the most
  CLS attention, summed over heads (upstream ``visionzip(model, dominant, contextual)`` passes
  ``dominant - 1`` on, so ``dominant`` counts the CLS token and ``dominant + contextual`` is the
  budget); without a CLS token (SigLIP), the ``dominant`` tokens that receive the most attention,
  averaged over heads and queries. The upstream repository has no SigLIP path; this is the
  score the published LLaVA-OneVision adaptations use (e.g. HoliTom's and DyToK's SigLIP patches);
- contextual: the remaining tokens, in position order, give ``contextual`` targets at the stride
  ``max(1, remaining // contextual)``; every other remaining token joins its most similar target
  (cosine of the keys), and a contextual token is ``target + mean(tokens that joined it)``, the
  mean taken as zero when none joined. That is upstream's code and frameworks.md's formula; it
  is not the plain average of the group (a refactor, Fanziyang-v/VisionZip, changed it to that);
- which layer: the caller's choice. Upstream reads attention, keys and hidden states of the
  penultimate CLIP layer (``attentions[-2]``, ``hidden_states[-2]``, ``layers[-2]``), where
  LLaVA-1.5 reads its features; the SigLIP adaptations read the last layer, where LLaVA-OV does.

Differences: ties go to the lower index (upstream ``topk`` leaves them unspecified); similarity
and averaging run in float32 and the result is cast back to the hidden states' dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stc.integrations.handle import forward_attribute
from stc_bench.methods.method import COMPRESS, TOWER, Arm, HookSite, Knob, MethodSpec, MethodStream, at_least_one

CONTEXTUAL_SHARE = 10 / 64
"""Contextual tokens per budget token: upstream's LLaVA-1.5 settings 54+10, 108+20 and 162+30
for 64, 128 and 192 tokens all keep this ratio."""


@dataclass(frozen=True)
class VisionZipTokens:
    """Per frame, the dominant tokens (in position order) then the contextual tokens: ``tokens``
    (B, dominant + contextual, C); ``dominant`` (B, D) their ascending indices into the input
    (CLS at 0 where there is one); ``contextual`` (B, C') the target token each contextual
    token is built on, ascending."""

    tokens: torch.Tensor
    dominant: torch.Tensor
    contextual: torch.Tensor


def split_budget(budget: int) -> tuple[int, int]:
    """``(dominant, contextual)`` with ``dominant + contextual == budget`` and ``contextual =
    round(budget * 10 / 64)`` (halves up): 64 -> (54, 10), 128 -> (108, 20), 196 -> (165, 31)."""
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1")
    contextual = int(budget * CONTEXTUAL_SHARE + 0.5)
    return budget - contextual, contextual


def class_attention(attention: torch.Tensor) -> torch.Tensor:
    """Importance from the CLS query (token 0), summed over heads: attention probabilities
    (B, heads, n, n) -> (B, n). Entry 0 (CLS to itself) is unused: CLS is always kept."""
    return attention[:, :, 0, :].float().sum(dim=1)                              # (B, n)


def attention_received(attention: torch.Tensor) -> torch.Tensor:
    """Importance without a CLS token: the attention each token receives, averaged over heads
    and queries. Attention probabilities (B, heads, n, n) -> (B, n)."""
    return attention.float().mean(dim=(1, 2))                                    # (B, n)


def compress(hidden: torch.Tensor, importance: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int,
             class_token: bool = False) -> VisionZipTokens:
    """Keep ``dominant`` tokens and build ``contextual`` tokens from the rest, per frame.

    hidden (B, n, C): the selection layer's hidden states; importance (B, n): ``class_attention``
    or ``attention_received`` of that layer; keys (B, n, c): its keys averaged over heads. With
    ``class_token`` token 0 is CLS and always one of the dominant tokens.
    """
    batch, num_tokens, channels = hidden.shape
    if dominant < int(class_token) or contextual < 0 or dominant + contextual > num_tokens:
        raise ValueError(f"dominant={dominant}, contextual={contextual} do not fit {num_tokens} tokens"
                         + (" with a CLS token (dominant >= 1)" if class_token else ""))
    score = importance.float().clone()                                          # (B, n)
    if class_token:
        score[:, 0] = torch.inf
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices     # (B, n) most attended first
    chosen = torch.sort(order[:, :dominant], dim=-1).values                     # (B, D)
    is_chosen = torch.zeros_like(score, dtype=torch.int8).scatter_(1, chosen, 1)
    rest = torch.sort(is_chosen, dim=-1, stable=True).indices[:, : num_tokens - dominant]   # (B, R) ascending
    kept = hidden.gather(1, chosen.unsqueeze(-1).expand(-1, -1, channels))      # (B, D, C)
    if contextual == 0:
        return VisionZipTokens(kept, chosen, rest[:, :0])
    remaining = rest.shape[1]
    step = max(1, remaining // contextual)
    # Targets are every step-th remaining token, the first ``contextual`` of them; the others keep
    # their order. Both index sets have sizes known on the host, so no data-dependent shape
    # (a boolean mask would make one, and wait for the device) is needed.
    position = torch.arange(remaining, device=hidden.device)                    # (R,)
    is_target = (position % step == 0) & (position < step * contextual)         # (R,) exactly Cc true
    order = torch.sort(is_target.to(torch.int8), stable=True).indices           # (R,) others first, then targets
    targets, others = rest[:, order[remaining - contextual :]], rest[:, order[: remaining - contextual]]  # (B, Cc), (B, R - Cc)
    unit = F.normalize(keys.float(), dim=-1)                                    # (B, n, c)
    unit_targets = unit.gather(1, targets.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    unit_others = unit.gather(1, others.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    joins = (unit_others @ unit_targets.transpose(1, 2)).argmax(dim=-1)         # (B, R - Cc): first maximum wins ties
    assignment = F.one_hot(joins, contextual).float()                           # (B, R - Cc, Cc)
    members = hidden.gather(1, others.unsqueeze(-1).expand(-1, -1, channels)).float()
    count = assignment.sum(dim=1).clamp(min=1).unsqueeze(-1)                    # (B, Cc, 1)
    folded = assignment.transpose(1, 2) @ members / count                       # (B, Cc, C) mean of each group
    anchors = hidden.gather(1, targets.unsqueeze(-1).expand(-1, -1, channels)).float()
    tokens = torch.cat([kept, (anchors + folded).to(hidden.dtype)], dim=1)      # (B, D + Cc, C)
    return VisionZipTokens(tokens, chosen, targets)


# --- VisionZip as an arm of stc-bench ------------------------------------------------------------


class SelectionCapture:
    """What VisionZip needs from the selection layer of a CLIP/SigLIP tower, per tower call:
    each token's importance (B, n) and the keys averaged over heads (B, n, head_dim).

    The last encoder layer's instance forward is wrapped: it computes the layer's own LN1, query
    and key projections, the attention probabilities (which a fused SDPA kernel never returns),
    then runs the layer unchanged. That extra work is VisionZip's price and lands in the ``vit``
    stage, as the paper's method pays it. The last layer is the selection layer because
    LLaVA-OneVision reads its features there (upstream's CLIP towers read the penultimate one).
    """

    def __init__(self, tower: nn.Module, class_token: bool):
        from stc.integrations import find_vision_layers

        _, layers, _ = find_vision_layers(tower)
        self.layer = layers[-1]
        self.class_token = class_token
        self.importance: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []

    def _record(self, hidden: torch.Tensor) -> None:
        attn = self.layer.self_attn
        batch, tokens, width = hidden.shape
        heads = attn.num_heads
        h = self.layer.layer_norm1(hidden)                                            # (B, n, d)
        q = attn.q_proj(h).view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, n, hd)
        k = attn.k_proj(h).view(batch, tokens, heads, width // heads).transpose(1, 2)  # (B, H, n, hd)
        probs = torch.softmax((q @ k.transpose(-1, -2)).float() * attn.scale, dim=-1)  # (B, H, n, n)
        score = class_attention(probs) if self.class_token else attention_received(probs)
        self.importance.append(score)                                                 # (B, n)
        self.keys.append(k.mean(dim=1))                                               # (B, n, hd)

    @contextlib.contextmanager
    def attached(self):
        """Record every call of the selection layer while the block runs; restore it after."""
        name = forward_attribute(self.layer)
        had = name in self.layer.__dict__
        previous = self.layer.__dict__.get(name)
        original = getattr(self.layer, name)

        def forward(hidden_states, *args, **kwargs):
            self._record(hidden_states)
            return original(hidden_states, *args, **kwargs)

        setattr(self.layer, name, forward)
        try:
            yield self
        finally:
            if had:
                setattr(self.layer, name, previous)
            else:
                delattr(self.layer, name)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The importance (t, n) and keys (t, n, hd) of the frames encoded since the last take."""
        importance, keys = torch.cat(self.importance), torch.cat(self.keys)
        self.importance.clear()
        self.keys.clear()
        return importance, keys


class VisionZipStream(MethodStream):
    """One video under VisionZip: capture at the selection layer, compress before the LLM.

    The compression hook receives the framework's visual tokens (LLaVA-OV: projected and pooled,
    196 per frame); the captured importance and keys are mapped onto those tokens with the
    framework's own pooling (``HookSite.pool``), so dominant and contextual tokens are chosen
    among the tokens every pre-LLM method sees, with the same per-frame budget.
    """

    def __init__(self, arm: Arm, site: HookSite):
        self._capture = SelectionCapture(site.tower, site.class_token)
        self._pool = site.pool
        self._class_token = site.class_token
        self._budget = arm.knob("tokens_per_frame")

    def tower(self):
        """The selection layer's capture, for the whole stream."""
        return self._capture.attached()

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """(t, n, C) -> (t, min(k, n), C): dominant tokens, then contextual tokens."""
        importance, keys = self._capture.take()                                      # (t, n_vit), (t, n_vit, hd)
        if self._class_token:                                                        # CLS is dropped before the LLM
            importance, keys = importance[:, 1:], keys[:, 1:]
        importance = self._pool(importance.unsqueeze(-1)).squeeze(-1)                # (t, n)
        keys = self._pool(keys)                                                      # (t, n, hd)
        budget = min(self._budget, tokens.shape[1])
        dominant, contextual = split_budget(budget)
        return compress(tokens, importance, keys, dominant, contextual).tokens       # (t, k, C)


def _unavailable(site: HookSite) -> str | None:
    if COMPRESS not in site.hooks:
        return f"{site.framework} has no compression step before an LLM pre-fill"
    if site.tower_kind not in ("SiglipEncoderLayer", "CLIPEncoderLayer"):
        return "it reads attention from a CLIP or SigLIP encoder layer"
    return None


METHOD = MethodSpec(
    name="visionzip",
    summary="VisionZip: dominant tokens by attention at the tower's last layer + contextual tokens merged by key "
            "similarity, before the LLM (attention extraction charged to the ViT stage)",
    knobs=(Knob("tokens_per_frame", int, 64, "tokens per frame kept (dominant + contextual, 54 + 10 at 64)", "k",
                at_least_one),),
    hooks=frozenset({TOWER, COMPRESS}),
    stream=VisionZipStream,
    unavailable=_unavailable,
    report_note="VisionZip computes the last encoder layer's attention probabilities explicitly (a fused attention "
                "kernel never returns them): that cost is in its ViT time. Its importance scores and keys are pooled like "
                "the tokens, so it selects among the same tokens as the other pre-LLM methods (54 dominant + 10 "
                "contextual at 64).",
)
