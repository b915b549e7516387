"""The one place stc_bench adapts to the installed transformers version.

Tested range: ``SUPPORTED`` (4.46 to 5.24; the ``[hf]`` extra of pyproject.toml declares the
same). Importing this module imports transformers and checks its version: one older than 4.46
raises ``TransformersVersionError`` (the CLI prints it on one line and exits 2); one newer than
tested logs a warning once and runs. Framework modules import this instead of branching on
versions themselves. What differs across the range, and the name here that hides it:

=====================================  ==========================================  ======================
what                                   4.46 ... 4.57                               5.x
=====================================  ==========================================  ======================
``from_pretrained`` dtype keyword      ``torch_dtype`` (``dtype`` from 4.56)       ``dtype``
                                       -> ``from_pretrained_dtype``
LLaVA-OneVision module layout          before 4.52: ``vision_tower``,              ``model.model.*`` and
                                       ``multi_modal_projector`` and a causal LM   ``model.lm_head``
                                       ``language_model`` on the model itself
                                       -> ``llava_onevision_parts``
decoder KV-cache keyword               ``past_key_values``                         ``cache`` where the
                                       -> ``cache_keyword``                        forward takes it
Qwen2-VL vision tower output           merged tokens, a bare tensor                ``BaseModelOutputWith
                                       -> ``qwen2_vision_forward``                 Pooling``
precomputed Qwen2-VL rotary ids and    none (the tower computes them)              ``transformers.
attention boundaries                   -> ``vision_input_helpers``                 vision_utils``
``no_init_weights``                    ``transformers.modeling_utils``             ``transformers.
                                       -> ``no_init_weights``                      initialization``
=====================================  ==========================================  ======================

Where a feature can be detected (a keyword in a signature, a module that imports) it is;
version numbers decide only what cannot be seen from outside (a keyword swallowed by
``**kwargs``, a return type).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable

import torch
import transformers
from packaging.version import Version
from torch import nn

from stc_bench.errors import BenchUsageError

logger = logging.getLogger(__name__)

MINIMUM = Version("4.46")
"""The oldest transformers stc_bench runs on (ReKV's pin)."""
TESTED_BELOW = Version("5.25")
"""The first transformers version not tested (5.24 is the newest tested)."""
SUPPORTED = f">={MINIMUM},<{TESTED_BELOW}"
"""The tested range as a pip specifier; pyproject.toml's ``[hf]`` extra says the same."""

_DTYPE_KEYWORD_FROM = Version("4.56")      # from_pretrained(dtype=...); torch_dtype before
_TOWER_OUTPUT_FROM = Version("5.0")        # Qwen2-VL vision tower returns a ModelOutput


class TransformersVersionError(BenchUsageError):
    """The installed transformers cannot run stc_bench; the message names the supported range."""


def check_version(version: str) -> Version:
    """The parsed ``version``; ``TransformersVersionError`` below ``MINIMUM``, a warning at or
    above ``TESTED_BELOW``."""
    found = Version(version)
    if found.release < MINIMUM.release:
        raise TransformersVersionError(
            f"transformers {version} is too old for stc-bench: install a tested version, "
            f"pip install 'transformers{SUPPORTED}'"
        )
    if found.release >= TESTED_BELOW.release:
        logger.warning("transformers %s is newer than the tested range %s; results are unverified", version, SUPPORTED)
    return found


VERSION = check_version(transformers.__version__)
"""The installed transformers version (checked at import)."""


def from_pretrained_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword that sets the weights' dtype: ``dtype`` from 4.56,
    ``torch_dtype`` before (both arrive in ``**kwargs``, so the version decides)."""
    return {"dtype": dtype} if VERSION.release >= _DTYPE_KEYWORD_FROM.release else {"torch_dtype": dtype}


def llava_onevision_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(vision tower, projector, decoder, LM head) of a ``LlavaOnevisionForConditionalGeneration``.

    From 4.52 the parts live in ``model.model`` (the decoder is a ``Qwen2Model``) and the head in
    ``model.lm_head``; before, on the model itself, with ``language_model`` a causal LM that holds
    the decoder (``.model``) and the head.
    """
    inner = model.model if isinstance(getattr(model, "model", None), nn.Module) else model
    language_model = inner.language_model
    if isinstance(getattr(language_model, "lm_head", None), nn.Module):   # before 4.52
        decoder, lm_head = language_model.model, language_model.lm_head
    else:
        decoder, lm_head = language_model, model.lm_head
    return inner.vision_tower, inner.multi_modal_projector, decoder, lm_head


def cache_keyword(decoder: nn.Module) -> str:
    """The keyword a decoder's forward takes its KV cache by: ``cache`` where its signature has
    one (later 5.x, where ``past_key_values`` is deprecated), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


def qwen2_vision_forward(tower: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Qwen2-VL vision tower: (merged tokens (groups*m, C_out), the last block's output
    (groups*n, C), the input of the patch merger).

    5.x returns both (``pooler_output``, ``last_hidden_state``); 4.x returns only the merged
    tokens, so the merger's input is read by a forward pre-hook for the duration of the call (no
    copy, no device sync).
    """
    if VERSION.release >= _TOWER_OUTPUT_FROM.release:
        out = tower(pixels, grid_thw, **kwargs)
        return out.pooler_output, out.last_hidden_state
    seen: list[torch.Tensor] = []
    hook = tower.merger.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        merged = tower(pixels, grid_thw, **kwargs)
    finally:
        hook.remove()
    return merged, seen[-1]


def vision_input_helpers() -> tuple[Callable, Callable] | None:
    """``(get_vision_position_ids, get_vision_cu_seqlens)`` where transformers accepts a Qwen2-VL
    tower's rotary position ids and attention boundaries precomputed (``transformers.vision_utils``,
    later 5.x); None where the tower computes them itself."""
    try:
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids
    except ImportError:
        return None
    return get_vision_position_ids, get_vision_cu_seqlens


def no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' context that builds modules without initialising their weights."""
    try:  # 5.x
        from transformers.initialization import no_init_weights as context
    except ImportError:  # 4.x
        from transformers.modeling_utils import no_init_weights as context
    return context()
