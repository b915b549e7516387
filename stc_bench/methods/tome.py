"""ToMe, Token Merging (Bolya et al., ICLR 2023), as pure tensor functions.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
