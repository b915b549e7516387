"""Fast random weights for benchmark models, and offline checkpoint checks.

A 7B model initialised parameter by parameter on a CPU takes minutes; here modules are built
with initialisation switched off, directly on the target device and in the target dtype, then
filled in place from one seeded generator: small normals for weights (std 0.02, so fp16
activations stay finite), ones and zeros for norms and biases.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from stc_bench.errors import BenchUsageError

M = TypeVar("M", bound=nn.Module)

WEIGHT_STD = 0.02


class CheckpointError(BenchUsageError):
    """A --checkpoint directory cannot be used; the message says why and what is expected."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _no_init() -> contextlib.AbstractContextManager:
    try:  # transformers >= 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_random(factory: Callable[[], M], device: torch.device, dtype: torch.dtype, seed: int) -> M:
    """``factory()`` built on ``device`` in ``dtype`` without initialisation, then filled randomly."""
    with _no_init(), _default_dtype(dtype), device:
        module = factory()
    fill_random_(module, seed)
    return module.eval()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "RMSNorm" in type(module).__name__


@torch.no_grad()
def fill_random_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter in place, in registration order from one generator per device:
    norms 1 (bias 0), other biases 0, weights N(0, 0.02)."""
    generators: dict[torch.device, torch.Generator] = {}
    if any(p.is_meta for p in module.parameters()):
        return module  # shape-only model (tests of full-size token counts): nothing to fill
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if _is_norm(sub):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                param.zero_()
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, WEIGHT_STD, generator=generators[param.device])
    return module


def read_checkpoint_config(path: str, model_types: tuple[str, ...]) -> dict:
    """Check that ``path`` is a local HF checkpoint of one of ``model_types`` stored as
    safetensors, and return its config.json. Raises ``CheckpointError`` saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory; pass a local HF checkpoint folder")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"--checkpoint {path}: no config.json inside; pass the folder that holds config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"--checkpoint {path}: config.json is unreadable ({err})") from None
    if config.get("model_type") not in model_types:
        raise CheckpointError(
            f"--checkpoint {path}: model_type is {config.get('model_type')!r}, expected "
            f"{' or '.join(model_types)} (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf)"
        )
    if not any(root.glob("*.safetensors")):
        raise CheckpointError(f"--checkpoint {path}: no *.safetensors files; only safetensors weights are loaded")
    return config


def refuse_checkpoint(framework: str, checkpoint: str | None) -> None:
    """Frameworks whose checkpoint loading is not written yet refuse --checkpoint, saying so."""
    if checkpoint is not None:
        raise CheckpointError(f"--checkpoint is supported for rekv only so far; run {framework} with random weights")
