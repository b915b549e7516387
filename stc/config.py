"""Frozen, validated configuration of STC-Cacher and STC-Pruner.

Configs are cheap, pure and picklable: validation happens in ``__post_init__`` and touches no
device, file or environment variable. ``STCConfig.from_env`` is the one place that reads the
``STC_*`` variables used by the original STC evaluation scripts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Metric = Literal["cosine", "l1", "l2"]
Selection = Literal["shared", "per_layer"]
Strategy = Literal["gaussian", "dual_anchor"]

METRICS: tuple[str, ...] = ("cosine", "l1", "l2")
SELECTIONS: tuple[str, ...] = ("shared", "per_layer")
STRATEGIES: tuple[str, ...] = ("gaussian", "dual_anchor")


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range: {name} must be {allowed}")


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    _require(value in choices, name, value, "one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class CacherConfig:
    """Knobs of STC-Cacher (stc-algorithm.md, "STC-Cacher")."""

    update_ratio: float = 0.25
    """Fraction of (patch) tokens recomputed on a selective frame, in (0, 1]."""
    cache_interval: int = 2
    """Frame i is a refresh (full) frame when i % cache_interval == 0; >= 1."""
    metric: Metric = "cosine"
    """How a token's key is compared with its reference key: cosine, negative L1 or L2."""
    selection: Selection = "shared"
    """"shared": the first layer picks the dynamic tokens for all layers; "per_layer": each layer."""
    cuda_graph: bool = False
    """Replay selective layers from CUDA graphs (GPU only; falls back to eager elsewhere)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.update_ratio, (int, float)) and 0.0 < self.update_ratio <= 1.0,
            "update_ratio", self.update_ratio, "in (0, 1]",
        )
        _require(
            isinstance(self.cache_interval, int) and not isinstance(self.cache_interval, bool)
            and self.cache_interval >= 1,
            "cache_interval", self.cache_interval, "an integer >= 1",
        )
        _require_choice("metric", self.metric, METRICS)
        _require_choice("selection", self.selection, SELECTIONS)
        _require(isinstance(self.cuda_graph, bool), "cuda_graph", self.cuda_graph, "True or False")


@dataclass(frozen=True)
class PrunerConfig:
    """Knobs of STC-Pruner (stc-algorithm.md, "STC-Pruner")."""

    tokens_per_frame: int = 64
    """Visual tokens kept per frame; a budget >= the frame's token count keeps them all."""
    strategy: Strategy = "gaussian"
    """"gaussian" (released default) or "dual_anchor" (the paper's formulation)."""
    channel_keep_ratio: float = 0.5
    """Fraction of channels (lowest variance) used for scoring, in (0, 1]."""
    alpha: float = 0.5
    """dual_anchor only: weight of the temporal anchor against the frame mean, in [0, 1]."""
    gaussian_scales: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
    """gaussian only: the kernel widths alpha of G(x, c) = sum exp(-|x - c|^2 / (2 alpha))."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.tokens_per_frame, int) and not isinstance(self.tokens_per_frame, bool)
            and self.tokens_per_frame >= 1,
            "tokens_per_frame", self.tokens_per_frame, "an integer >= 1",
        )
        _require_choice("strategy", self.strategy, STRATEGIES)
        _require(
            isinstance(self.channel_keep_ratio, (int, float)) and 0.0 < self.channel_keep_ratio <= 1.0,
            "channel_keep_ratio", self.channel_keep_ratio, "in (0, 1]",
        )
        _require(
            isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0,
            "alpha", self.alpha, "in [0, 1]",
        )
        _require(
            len(self.gaussian_scales) > 0 and all(s > 0 for s in self.gaussian_scales),
            "gaussian_scales", self.gaussian_scales, "a non-empty tuple of positive widths",
        )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: set it to 1 or 0")


def _env_number(env: Mapping[str, str], name: str, kind: type, default):
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not {noun}: set it to {noun}, e.g. {default!r}") from None


@dataclass(frozen=True)
class STCConfig:
    """Both components; ``None`` switches a component off (the baseline is ``STCConfig()``)."""

    cacher: CacherConfig | None = None
    pruner: PrunerConfig | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> STCConfig:
        """Build a config from the original STC scripts' environment variables.

        ``STC_PATCH_VISION`` (0/1) switches the cacher on, tuned by ``STC_UPDATE_TOKEN_RATIO``,
        ``STC_CACHE_INTERVAL``, ``STC_CUDA_GRAPH`` and ``STC_SHARE_SELECTION`` (1 = shared,
        0 = per layer). ``STC_TOKEN_PER_FRAME`` switches the pruner on with that budget.
        ``env`` defaults to ``os.environ``; this is the only reader of ``STC_*`` variables.
        """
        env = os.environ if env is None else env
        defaults = CacherConfig()
        cacher = None
        if _env_bool(env, "STC_PATCH_VISION", False):
            shared = _env_bool(env, "STC_SHARE_SELECTION", defaults.selection == "shared")
            try:
                cacher = CacherConfig(
                    update_ratio=_env_number(env, "STC_UPDATE_TOKEN_RATIO", float, defaults.update_ratio),
                    cache_interval=_env_number(env, "STC_CACHE_INTERVAL", int, defaults.cache_interval),
                    cuda_graph=_env_bool(env, "STC_CUDA_GRAPH", defaults.cuda_graph),
                    selection="shared" if shared else "per_layer",
                )
            except ValueError as err:
                raise ValueError(f"{err} (read from STC_* environment variables)") from None
        pruner = None
        budget = _env_number(env, "STC_TOKEN_PER_FRAME", int, None)
        if budget is not None:
            try:
                pruner = PrunerConfig(tokens_per_frame=budget)
            except ValueError as err:
                raise ValueError(f"{err} (read from STC_TOKEN_PER_FRAME)") from None
        return cls(cacher=cacher, pruner=pruner)


__all__ = ["CacherConfig", "PrunerConfig", "STCConfig", "METRICS", "SELECTIONS", "STRATEGIES"]
