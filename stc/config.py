"""Frozen, validated configuration of STC-Cacher and STC-Pruner.

Configs are cheap, pure and picklable: validation happens in ``__post_init__`` and touches no
device, file or environment variable. ``STCConfig.from_env`` is the one place that reads the
``STC_*`` variables used by the original STC evaluation scripts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from stc.errors import ConfigError

Metric = Literal["cosine", "l1", "l2"]
Selection = Literal["shared", "per_layer"]
Strategy = Literal["gaussian", "dual_anchor"]

METRICS: tuple[str, ...] = ("cosine", "l1", "l2")
SELECTIONS: tuple[str, ...] = ("shared", "per_layer")
STRATEGIES: tuple[str, ...] = ("gaussian", "dual_anchor")


def _is_number(value: object) -> bool:
    # bool is a subclass of int: True would pass as 1 and False as 0 without this.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_number(name: str, value: object, in_range: Callable[[float], bool], allowed: str, example: float) -> None:
    """A number (not a bool) for which ``in_range`` holds, or a ``ConfigError`` naming the field,
    the value, what is allowed and, for a value of the wrong type, an example."""
    if not _is_number(value):
        raise ConfigError(f"{name}={value!r} is not a number: {name} must be a number {allowed}, e.g. {example!r}", allowed)
    if not in_range(value):  # NaN fails every comparison, so it lands here
        raise ConfigError(f"{name}={value!r} is out of range: {name} must be {allowed}", allowed)


def _require_integer(name: str, value: object, minimum: int, example: int) -> None:
    allowed = f"an integer >= {minimum}"
    if not _is_integer(value):
        raise ConfigError(f"{name}={value!r} is not an integer: {name} must be {allowed}, e.g. {example!r}", allowed)
    if value < minimum:
        raise ConfigError(f"{name}={value!r} is out of range: {name} must be {allowed}", allowed)


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    allowed = "one of " + ", ".join(repr(c) for c in choices)
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not a valid choice: {name} must be {allowed}", allowed)


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a boolean: {name} must be True or False", "True or False")


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
    compile: bool = False
    """Run selective layers through ``torch.compile`` (mode "reduce-overhead" on CUDA): fewer,
    fused kernels, after a one-time compilation of seconds to a minute on the first frames."""

    def __post_init__(self) -> None:
        _require_number("update_ratio", self.update_ratio, lambda r: 0.0 < r <= 1.0, "in (0, 1]", 0.25)
        _require_integer("cache_interval", self.cache_interval, 1, 2)
        _require_choice("metric", self.metric, METRICS)
        _require_choice("selection", self.selection, SELECTIONS)
        _require_bool("cuda_graph", self.cuda_graph)
        _require_bool("compile", self.compile)
        if self.cuda_graph and self.compile:
            raise ConfigError(
                "cuda_graph=True and compile=True are two ways to cut the same launches: choose one "
                "(compile on CUDA replays CUDA graphs of its own)", "at most one of cuda_graph and compile")


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
        _require_integer("tokens_per_frame", self.tokens_per_frame, 1, 64)
        _require_choice("strategy", self.strategy, STRATEGIES)
        _require_number("channel_keep_ratio", self.channel_keep_ratio, lambda r: 0.0 < r <= 1.0, "in (0, 1]", 0.5)
        _require_number("alpha", self.alpha, lambda a: 0.0 <= a <= 1.0, "in [0, 1]", 0.5)
        scales = self.gaussian_scales
        # A tuple, not a list: the config must stay hashable.
        if not (isinstance(scales, tuple) and scales and all(_is_number(s) and s > 0 for s in scales)):
            allowed = "a non-empty tuple of positive widths"
            raise ConfigError(
                f"gaussian_scales={scales!r} is invalid: gaussian_scales must be {allowed}, "
                "e.g. (0.125, 0.25, 0.5, 1.0, 2.0)", allowed,
            )


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

_ENV_EXAMPLES = {
    "STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "0.25", "STC_CACHE_INTERVAL": "2",
    "STC_CUDA_GRAPH": "1", "STC_SHARE_SELECTION": "0", "STC_TOKEN_PER_FRAME": "64",
}
"""A valid value of every variable ``from_env`` reads, shown in its error messages."""


def _env_raw(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    if raw is not None and not isinstance(raw, str):
        raise TypeError(f"{name}={raw!r} is not a string: environment values are strings, e.g. {name}='{_ENV_EXAMPLES[name]}'")
    return raw


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _env_raw(env, name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: set it to 1 or 0, e.g. {name}={_ENV_EXAMPLES[name]}", "1 or 0")


def _env_number(env: Mapping[str, str], name: str, kind: type, default, check: Callable[[object], object]):
    """The variable ``name`` parsed as ``kind`` (``default`` when unset or empty), validated by
    ``check`` (a config built from that one value) so that an error names the variable."""
    raw = _env_raw(env, name)
    if raw is None or raw.strip() == "":
        return default
    example = f"e.g. {name}={_ENV_EXAMPLES[name]}"
    try:
        value = kind(raw.strip())
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={raw!r} is not {noun}: set it to {noun}, {example}", noun) from None
    try:
        check(value)
    except ConfigError as err:
        raise ConfigError(f"{name}={raw!r} is out of range: it must be {err.allowed}, {example}", err.allowed) from None
    return value


@dataclass(frozen=True)
class STCConfig:
    """Both components; ``None`` switches a component off (the baseline is ``STCConfig()``)."""

    cacher: CacherConfig | None = None
    pruner: PrunerConfig | None = None

    def __post_init__(self) -> None:
        for name, value, kind in (("cacher", self.cacher, CacherConfig), ("pruner", self.pruner, PrunerConfig)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a stc.{kind.__name__} or None (off), got {type(value).__name__}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> STCConfig:
        """Build a config from the original STC scripts' environment variables.

        ``STC_PATCH_VISION`` (0/1) switches the cacher on, tuned by ``STC_UPDATE_TOKEN_RATIO``,
        ``STC_CACHE_INTERVAL``, ``STC_CUDA_GRAPH`` and ``STC_SHARE_SELECTION`` (1 = shared,
        0 = per layer). ``STC_TOKEN_PER_FRAME`` switches the pruner on with that budget.
        ``env`` defaults to ``os.environ``; this is the only reader of ``STC_*`` variables.
        A bad value raises ``stc.errors.ConfigError`` (a ``ValueError``) naming the variable, its value and a valid example.
        """
        env = os.environ if env is None else env
        if not isinstance(env, Mapping):
            raise TypeError(f"env must be a mapping of variable names to strings, such as os.environ; got {type(env).__name__}")
        defaults = CacherConfig()
        cacher = None
        if _env_bool(env, "STC_PATCH_VISION", False):
            shared = _env_bool(env, "STC_SHARE_SELECTION", defaults.selection == "shared")
            cacher = CacherConfig(
                update_ratio=_env_number(env, "STC_UPDATE_TOKEN_RATIO", float, defaults.update_ratio,
                                         lambda v: CacherConfig(update_ratio=v)),
                cache_interval=_env_number(env, "STC_CACHE_INTERVAL", int, defaults.cache_interval,
                                           lambda v: CacherConfig(cache_interval=v)),
                cuda_graph=_env_bool(env, "STC_CUDA_GRAPH", defaults.cuda_graph),
                selection="shared" if shared else "per_layer",
            )
        budget = _env_number(env, "STC_TOKEN_PER_FRAME", int, None, lambda v: PrunerConfig(tokens_per_frame=v))
        pruner = None if budget is None else PrunerConfig(tokens_per_frame=budget)
        return cls(cacher=cacher, pruner=pruner)


__all__ = ["CacherConfig", "PrunerConfig", "STCConfig", "METRICS", "SELECTIONS", "STRATEGIES"]
