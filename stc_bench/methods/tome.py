"""ToMe, Token Merging (Bolya et al., ICLR 2023): the pure tensor functions, and the patch that
runs them inside a HuggingFace CLIP or SigLIP vision tower.

Inside each ViT layer, after attention: split the tokens alternately into sets A (even
positions) and B (odd positions), pair every A token with its most similar B token (cosine of
the head-averaged keys), and merge the ``r`` best-matched A tokens into their partners as
size-weighted averages. Later layers see fewer tokens and add ``log(size)`` to the attention
logits (proportional attention), so a merged token keeps the weight of the tokens it stands for.

Follows facebookresearch/ToMe ``tome/merge.py`` (``bipartite_soft_matching``, ``merge_wavg``)
and ``tome/patch/timm.py`` (``ToMeAttention``, ``ToMeBlock``), with these differences:

- ties are deterministic: a token's partner is the first most similar B token, and among
  equally good pairs the lower A index merges first (upstream's ``argsort`` is not stable);
- the A tokens that stay are always in ascending position order (upstream sorts them only when
  there is a class token), so the output order does not depend on the scores;
- sizes are float32 counts whatever the token dtype (bf16 cannot count past 256 exactly), and
  the weighted average is formed in float32 (or the tokens' own dtype when wider) and cast back;
- the number of merges per layer comes from ``merge_schedule`` (a per-frame budget), not from
  upstream's ``parse_r`` (a constant ``r``, or ``(r, inflection)``).

The tower patch (``tome_attached`` / ``attach_tome``) replaces each encoder layer *instance's*
forward with ``tome_layer_forward``, which calls the HF layer's own norms, projections and MLP
(upstream copies timm's block instead), and restores every replaced attribute on exit. Usage::

    with tome_attached(tower, schedule_for_budget(tokens, layers, tokens_per_frame, class_token)):
        features = tower(pixel_values).last_hidden_state   # (frames, kept tokens, C)
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stc.integrations.handle import HANDLE_ATTRIBUTE, PatchHandle, forward_attribute
from stc_bench.methods.method import TOWER, Arm, HookSite, Knob, MethodSpec, MethodStream, at_least_one


@dataclass(frozen=True)
class TokenMatching:
    """One layer's merge plan for a batch of B token sequences of length ``num_tokens``.

    Indices count within the sets: A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...
    ``kept`` (B, nA - r): the A tokens that stay, ascending. ``merged`` (B, r): the A tokens
    merged away; ``partner`` (B, r): the B token each of them joins.
    """

    num_tokens: int
    kept: torch.Tensor
    merged: torch.Tensor
    partner: torch.Tensor

    @property
    def merges(self) -> int:
        """How many tokens this plan removes (r)."""
        return self.merged.shape[1]


def max_merges(num_tokens: int, class_token: bool = False) -> int:
    """The most tokens one layer can merge: half the unprotected tokens, rounded down
    (upstream ``bipartite_soft_matching``: ``min(r, (t - protected) // 2)``)."""
    return max(0, (num_tokens - int(class_token)) // 2)


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False) -> TokenMatching:
    """The merge plan that removes ``min(r, max_merges(n))`` tokens of metric (B, n, c).

    metric: the layer's keys averaged over heads (upstream ``k.mean(1)``). With
    ``class_token`` the first token (CLS) is in set A and never merged. Scores are cosines
    computed in float32; ties go to the lower index (see the module docstring).
    """
    batch, num_tokens, _ = metric.shape
    r = max(0, min(r, max_merges(num_tokens, class_token)))
    if r == 0:                                       # nothing to merge (and set B may be empty)
        kept = torch.arange((num_tokens + 1) // 2, device=metric.device).expand(batch, -1)
        empty = kept[:, :0]
        return TokenMatching(num_tokens, kept, empty, empty)
    unit = F.normalize(metric.float(), dim=-1)                                  # (B, n, c)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)                       # (B, nA, nB)
    if class_token:
        scores[:, 0] = -math.inf
    best, partner = scores.max(dim=-1)                                          # (B, nA): first maximum wins ties
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices      # (B, nA) best pairs first
    merged = order[:, :r]                                                       # (B, r)
    kept = torch.sort(order[:, r:], dim=-1).values                              # (B, nA - r)
    return TokenMatching(num_tokens, kept, merged, partner.gather(1, merged))


def merge_weighted_average(x: torch.Tensor, matching: TokenMatching,
                           size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a merge plan to tokens x (B, n, C) of sizes (B, n) (ones when None).

    Returns ``(tokens, sizes)``: (B, n - r, C) in x's dtype, laid out as [kept A tokens, all B
    tokens], and their float32 sizes (B, n - r). A B token becomes the size-weighted mean of
    itself and the A tokens merged into it, so sizes still sum to the original token count and
    the size-weighted mean of all tokens is unchanged (upstream ``merge_wavg``).
    """
    batch, num_tokens, channels = x.shape
    if num_tokens != matching.num_tokens:
        raise ValueError(f"the matching was made for {matching.num_tokens} tokens, x has {num_tokens}")
    if size is None:
        size = torch.ones(batch, num_tokens, device=x.device, dtype=torch.float32)
    size = size.float()
    work = torch.promote_types(x.dtype, torch.float32)   # average in float32 at least, never below x's precision
    a, b = x[:, ::2], x[:, 1::2]                                                # (B, nA, C), (B, nB, C)
    size_a, size_b = size[:, ::2], size[:, 1::2]                                # (B, nA), (B, nB)
    rows = matching.merged.unsqueeze(-1).expand(-1, -1, channels)               # (B, r, C)
    into = matching.partner.unsqueeze(-1).expand(-1, -1, channels)              # (B, r, C)
    weighted_a = a.to(work) * size_a.unsqueeze(-1)                              # (B, nA, C)
    total_b = (b.to(work) * size_b.unsqueeze(-1)).scatter_add(1, into, weighted_a.gather(1, rows))  # (B, nB, C)
    size_b = size_b.scatter_add(1, matching.partner, size_a.gather(1, matching.merged))           # (B, nB)
    kept_a = a.gather(1, matching.kept.unsqueeze(-1).expand(-1, -1, channels))  # (B, nA - r, C)
    merged_b = (total_b / size_b.unsqueeze(-1)).to(x.dtype)                     # (B, nB, C)
    tokens = torch.cat([kept_a, merged_b], dim=1)                               # (B, n - r, C)
    return tokens, torch.cat([size_a.gather(1, matching.kept), size_b], dim=1)


def proportional_attention_bias(size: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The additive attention bias ``log(size)`` of each key: sizes (B, n) -> (B, 1, 1, n).

    Added to the attention logits (upstream ``ToMeAttention``: ``attn + size.log()``), it
    broadcasts over heads and queries and fits an SDPA float ``attn_mask``.
    """
    bias = size.log()[:, None, None, :]                                         # (B, 1, 1, n)
    return bias if dtype is None else bias.to(dtype)


def merge_to_count(x: torch.Tensor, target: int, size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens x (B, n, C) down to ``target`` tokens, outside a ViT: the tokens are their
    own metric and each pass removes ``min(n - target, n // 2)``. Returns (tokens, sizes)."""
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    while x.shape[1] > max(target, 1):
        matching = bipartite_soft_matching(x, x.shape[1] - target)
        x, size = merge_weighted_average(x, matching, size)
    return x, size


def layer_token_counts(num_tokens: int, schedule: list[int], class_token: bool = False) -> list[int]:
    """Tokens entering each layer and leaving the last: ``len(schedule) + 1`` counts.

    Layer l runs attention on ``counts[l]`` tokens and its MLP on ``counts[l + 1]`` (ToMe merges
    between the two). Each r is capped by ``max_merges`` exactly as ``bipartite_soft_matching``
    caps it, so a constant upstream-style r gives the counts the tower will produce.
    """
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - min(r, max_merges(counts[-1], class_token)))
    return counts


def fewest_tokens(num_tokens: int, num_layers: int, class_token: bool = False) -> int:
    """The fewest tokens a tower of ``num_layers`` can leave, merging the maximum in every layer."""
    return layer_token_counts(num_tokens, [num_tokens] * num_layers, class_token)[-1]


def merge_schedule(num_tokens: int, num_layers: int, target_tokens: int, class_token: bool = False) -> list[int]:
    """Merges per layer, r_0 .. r_{L-1}, so that ``num_tokens`` entering the tower leave it as
    exactly ``target_tokens`` (CLS included in both where there is one).

    The rule: as constant as possible (ToMe's own schedule is a constant r), the remainder
    going to the earliest layers (each layer takes ``ceil(remaining / layers left)``), and no
    layer merging more than half its unprotected tokens. Where that cap would stop a later
    layer from reaching the target, earlier layers take just enough more. Raises ValueError when
    the target is unreachable (above ``num_tokens`` or below ``fewest_tokens``).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    fewest = fewest_tokens(num_tokens, num_layers, class_token)
    if not fewest <= target_tokens <= num_tokens:
        raise ValueError(f"target_tokens={target_tokens} must lie in [{fewest}, {num_tokens}]: {num_layers} layers "
                         f"merging at most half their tokens each cannot leave fewer than {fewest} of {num_tokens}")
    schedule, count = [], num_tokens
    for layer in range(num_layers):
        layers_left = num_layers - layer
        r = min(-(-(count - target_tokens) // layers_left), max_merges(count, class_token))
        while fewest_tokens(count - r, layers_left - 1, class_token) > target_tokens:
            r += 1                                   # stays within the cap: the target was reachable from here
        schedule.append(r)
        count -= r
    return schedule


# --- ToMe inside a HuggingFace CLIP / SigLIP vision tower -----------------------------------

_QWEN2_VL_BLOCK = "Qwen2VLVisionBlock"
_CLASS_TOKEN = {"CLIPEncoderLayer": True, "SiglipEncoderLayer": False}
"""Supported layer classes (by name) and whether their frames start with a CLS token."""


class ToMePatchError(ValueError):
    """A tower, schedule or call that ToMe cannot patch or run as asked; the message names the fix."""


@dataclass
class ToMeState:
    """Per-call ToMe state shared by reference by every patched layer of one tower.

    Layer 0 resets it when a call starts; each layer reads the sizes the previous one left.
    """

    schedule: tuple[int, ...]
    class_token: bool
    size: torch.Tensor | None = None
    """(B, n) float32 sizes of the tokens in flight; None while nothing has merged (all ones)."""
    token_counts: list[int] = field(default_factory=list)
    """Tokens entering each layer of the current call, then leaving the last (ints from shapes)."""
    frames: int = 0
    """Frames (batch) of the current call."""

    def start_call(self, x: torch.Tensor) -> None:
        """A new call of the tower with tokens x (B, n, C): every token stands for one patch again."""
        self.size = None
        self.frames = x.shape[0]
        self.token_counts = [x.shape[1]]


def tome_layer_forward(layer: nn.Module, x: torch.Tensor, merges: int, size: torch.Tensor | None = None,
                       class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One CLIP/SigLIP encoder layer with ToMe, on tokens x (B, n, C) of sizes (B, n) (None: all ones).

    Returns the layer output (B, n - r, C) and its sizes (B, n - r), r = ``min(merges,
    max_merges(n, class_token))``; when r is 0 nothing is merged or reordered and ``size`` is
    returned as given. Mirrors ``CLIPEncoderLayer.forward`` / ``SiglipEncoderLayer.forward``
    (transformers 4.46 to 5.24) through the layer's own ``layer_norm1``, ``self_attn.{q,k,v,out}_proj``,
    ``layer_norm2`` and ``mlp``, as ToMe's ``ToMeBlock`` / ``ToMeAttention`` do for timm.

    Modifications:
    - attention is ``F.scaled_dot_product_attention`` with the additive bias ``log(size)`` per key
      (proportional attention) once some token stands for several; with no bias (``size`` None)
      SDPA keeps its fused kernels, with one it falls back to kernels that accept a float mask;
    - between the attention and the MLP branch, the r best-matched tokens (bipartite soft matching
      on the keys averaged over heads) are merged as size-weighted averages; a CLS token (when
      ``class_token``) is never merged and stays first;
    - attention dropout is not applied (the layer is meant for eval) and no attention weights are
      returned.
    """
    attn = layer.self_attn
    batch, n, width = x.shape
    heads = attn.num_heads
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, n, heads, head_dim).transpose(1, 2)                   # (B, H, n, hd)

    h = layer.layer_norm1(x)                                                       # (B, n, C)
    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))  # (B, H, n, hd)
    # Proportional attention: a key that stands for s tokens counts s times in every softmax.
    bias = None if size is None else proportional_attention_bias(size, q.dtype)   # (B, 1, 1, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # (B, H, n, hd)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(batch, n, width))           # (B, n, C)
    if min(merges, max_merges(n, class_token)) > 0:   # skipping keeps the token order when nothing merges
        metric = k.mean(dim=1)                        # (B, n, hd): keys averaged over heads, as upstream
        x, size = merge_weighted_average(x, bipartite_soft_matching(metric, merges, class_token), size)  # (B, n - r, C)
    return x + layer.mlp(layer.layer_norm2(x)), size


def _check_call(args: tuple, kwargs: dict) -> None:
    """Refuse what the ToMe layer cannot honour: attention masks and attention weights."""
    if any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
        raise ToMePatchError("ToMe got an attention mask; vision towers run unmasked and merged tokens cannot "
                             "follow a mask: detach ToMe (leave the tome_attached block) to run this call")
    if kwargs.get("output_attentions"):
        raise ToMePatchError("ToMe does not return attention weights: call without output_attentions=True")


def _make_forward(layer: nn.Module, index: int, state: ToMeState, returns_tuple: bool):
    """The instance-level forward of encoder layer ``index``: the ToMe layer on the shared state."""
    merges = state.schedule[index]

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        _check_call(args, kwargs)
        if index == 0:
            state.start_call(hidden_states)
        elif state.size is not None and state.size.shape != hidden_states.shape[:2]:
            raise ToMePatchError(f"ToMe layer {index} got {tuple(hidden_states.shape[:2])} (frames, tokens) but layer "
                                 f"{index - 1} left {tuple(state.size.shape)}: call the tower, not single layers")
        y, state.size = tome_layer_forward(layer, hidden_states, merges, state.size, state.class_token)
        state.token_counts.append(y.shape[1])
        return (y,) if returns_tuple else y   # transformers 4.x layers return a tuple, 5.x a tensor

    forward.__doc__ = f"""ToMe forward of encoder layer {index} (r = {merges}): ``tome_layer_forward`` in place
    of ``CLIPEncoderLayer.forward`` / ``SiglipEncoderLayer.forward`` (transformers 4.46 to 5.24).

    Modifications: see ``tome_layer_forward``; also, attention masks and ``output_attentions``
    are refused, and layer 0 starts a new call (all sizes one) on the shared ``ToMeState``.
    """
    return forward


class ToMeHandle(PatchHandle):
    """ToMe attached to a CLIP/SigLIP tower: the last call's token sizes and counts; ``detach()``
    restores the tower exactly (the bookkeeping of STC's own patches)."""

    def __init__(self, tower: nn.Module, state: ToMeState):
        super().__init__(tower)
        self._state = state

    @property
    def schedule(self) -> tuple[int, ...]:
        """Merges asked of each layer, r_0 .. r_{L-1}."""
        return self._state.schedule

    @property
    def class_token(self) -> bool:
        """Whether the tower's frames start with a CLS token (CLIP), which ToMe never merges."""
        return self._state.class_token

    @property
    def token_counts(self) -> tuple[int, ...]:
        """Tokens entering each layer in the last call, then leaving the tower (empty before a call)."""
        return tuple(self._state.token_counts)

    @property
    def sizes(self) -> torch.Tensor | None:
        """(B, n_out) float32: how many input tokens each output token of the last call stands for
        (they sum to the input count per frame); None before the first call; readable after detach."""
        state = self._state
        if not state.token_counts:
            return None
        if state.size is None:                        # nothing merged: every token is itself
            return torch.ones(state.frames, state.token_counts[-1])
        return state.size

    def __enter__(self) -> ToMeHandle:
        return self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"ToMeHandle({type(self.tower).__name__}, schedule={list(self.schedule)}, {state})"


def attach_tome(model: nn.Module, schedule: Sequence[int]) -> ToMeHandle:
    """Patch the CLIP/SigLIP vision tower in ``model`` with ToMe, layer l merging ``schedule[l]``
    tokens per frame, and return the handle that undoes it.

    Each encoder layer *instance* gets a ToMe forward (its ``_old_forward`` when accelerate hooked
    it); the classes are never touched, so hooks (transformers' output capturing included) still
    see every layer's output. The tower gets ``_stc_handle``. Raises ``ToMePatchError`` for a
    Qwen2-VL tower, a schedule whose length is not the layer count or with a negative entry, or a
    tower already patched (by STC or ToMe); ``stc.UnsupportedModelError`` when ``model`` holds no
    supported vision tower.
    """
    from stc.integrations import find_vision_layers

    tower, layers, kind = find_vision_layers(model)
    if kind == _QWEN2_VL_BLOCK:
        raise ToMePatchError("ToMe cannot run inside a Qwen2-VL vision tower: its PatchMerger joins each 2x2 block "
                             "of the full patch grid, which merged tokens no longer form; use a CLIP/SigLIP tower")
    if kind not in _CLASS_TOKEN:
        raise ToMePatchError(f"ToMe supports CLIP and SigLIP encoder layers, not {kind}")
    schedule = tuple(int(r) for r in schedule)
    if len(schedule) != len(layers):
        raise ToMePatchError(f"the ToMe schedule has {len(schedule)} entries but {type(tower).__name__} has "
                             f"{len(layers)} encoder layers: give one merge count per layer (schedule_for_budget)")
    if any(r < 0 for r in schedule):
        raise ToMePatchError(f"ToMe schedule {list(schedule)}: merge counts must be >= 0")
    existing = tower.__dict__.get(HANDLE_ATTRIBUTE)
    if existing is not None:
        raise ToMePatchError(f"{type(tower).__name__} is already patched ({existing!r}): detach that patch before "
                             "attaching ToMe (one patch per tower at a time)")
    state = ToMeState(schedule, _CLASS_TOKEN[kind])
    handle = ToMeHandle(tower, state)
    try:
        for i, layer in enumerate(layers):
            name = forward_attribute(layer)
            returns_tuple = "output_attentions" in inspect.signature(getattr(layer, name)).parameters  # 4.x layers
            handle._replace(layer, name, _make_forward(layer, i, state, returns_tuple))
        handle._install()
    except BaseException:
        handle.detach()                               # leave the model as it was
        raise
    return handle


@contextlib.contextmanager
def tome_attached(model: nn.Module, schedule: Sequence[int]) -> Iterator[ToMeHandle]:
    """``with tome_attached(tower, schedule) as handle:`` ``attach_tome`` for the block, then restore
    the tower exactly (also when the block raises)."""
    handle = attach_tome(model, schedule)
    try:
        yield handle
    finally:
        handle.detach()


def schedule_for_budget(tokens: int, layers: int, tokens_per_frame: int, class_token: bool) -> list[int]:
    """Merges per layer so that a frame of ``tokens`` tokens (CLS included) leaves a tower of
    ``layers`` layers with ``tokens_per_frame`` patch tokens.

    The budget counts patch tokens, as ``--tokens-per-frame`` does for every arm (the CLS token is
    dropped by feature selection before the LLM), so with ``class_token`` the tower keeps
    ``tokens_per_frame + 1`` tokens. A budget at or above the patch count merges nothing. Raises
    ValueError when the budget is below what ``layers`` layers can reach (half per layer).
    """
    target = tokens_per_frame + int(class_token)
    if target >= tokens:
        return [0] * layers
    return merge_schedule(tokens, layers, target, class_token)


def tome_tower_macs(tokens: int, width: int, mlp_width: int, schedule: Sequence[int], frames: int,
                    *, class_token: bool = False) -> int:
    """Multiply-adds of a ToMe tower on ``frames`` frames of ``tokens`` tokens, in the terms of
    ``stc.flops.vit_layer_macs``: layer l, entered by n_l tokens and left by n_{l+1}, costs
    ``4 n_l d^2 + 2 n_l^2 d`` (projections and attention on n_l tokens) ``+ 2 n_{l+1} d f`` (the
    MLP after the merge). With an all-zero schedule this equals the baseline tower.

    The matching (cosines of n_l/2 by n_l/2 head-averaged keys, a few sorts) and the weighted
    average are left out, as ``stc.flops`` leaves STC's token scoring out.
    """
    counts = layer_token_counts(tokens, list(schedule), class_token)
    d, f = width, mlp_width
    per_frame = sum(4 * n * d * d + 2 * n * n * d + 2 * after * d * f for n, after in zip(counts, counts[1:]))
    return frames * per_frame


# --- ToMe as an arm of stc-bench -----------------------------------------------------------------


def budget_schedule(tokens: int, layers: int, tokens_per_frame: int, class_token: bool) -> list[int]:
    """``schedule_for_budget``, or, when ``layers`` layers cannot merge down to the budget (a
    shallow test tower), the schedule that merges the most they can (the tokens that reach the
    LLM are counted from the tensors, so reports show what really happened)."""
    fewest = fewest_tokens(tokens, layers, class_token) - int(class_token)
    return schedule_for_budget(tokens, layers, max(tokens_per_frame, fewest), class_token)


class ToMeStream(MethodStream):
    """One video under ToMe: the tower's layers merge tokens down to the per-frame budget."""

    patches_tower = True

    def __init__(self, arm: Arm, site: HookSite):
        self._tower = site.tower
        self._schedule = budget_schedule(site.tower_tokens, site.tower_layers, arm.knob("tokens_per_frame"), site.class_token)

    def tower(self):
        """ToMe patched into every encoder layer for the stream."""
        return tome_attached(self._tower, self._schedule)


def _tower_macs(arm: Arm, shape, frames: int) -> int:
    class_token = shape.prefix_tokens > 0
    schedule = budget_schedule(shape.tokens, shape.layers, arm.knob("tokens_per_frame"), class_token)
    return tome_tower_macs(shape.tokens, shape.width, shape.mlp_width, schedule, frames, class_token=class_token)


def _unavailable(site: HookSite) -> str | None:
    if site.tower_kind == "Qwen2VLVisionBlock":
        return "Qwen2-VL's 2x2 PatchMerger needs every token of the grid, so ToMe cannot merge inside its tower"
    return None


METHOD = MethodSpec(
    name="tome",
    summary="ToMe inside the ViT: bipartite soft matching, size-weighted merges and proportional attention, "
            "merged down to the per-frame budget (LLaVA-OV: its tokens skip the 2x2 pooling, which needs the grid)",
    knobs=(Knob("tokens_per_frame", int, 64, "tokens per frame leaving the tower (CLS not counted)", "k", at_least_one),),
    hooks=frozenset({TOWER}),
    stream=ToMeStream,
    tower_macs=_tower_macs,
    unavailable=_unavailable,
    report_note="ToMe merges inside every encoder layer (at most half the tokens per layer) down to the per-frame "
                "budget; where the framework pools a token grid (LLaVA-OV's 2x2 pooling), merged tokens have no grid, "
                "so they reach the projector unpooled. A tower too shallow for the budget leaves as few tokens as it can "
                "(the token columns count what was really sent).",
)
