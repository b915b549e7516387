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
    from stc_bench.frameworks.transformers_compat import no_init_weights

    return no_init_weights()


def build_random(factory: Callable[[], M], device: torch.device, dtype: torch.dtype, seed: int) -> M:
    """``factory()`` built on ``device`` in ``dtype`` without initialisation, then filled randomly."""
    with _no_init(), _default_dtype(dtype), device:
        module = factory()
    fill_random_(module, seed)
    return module.eval()


def build_empty(factory: Callable[[], M], dtype: torch.dtype) -> M:
    """``factory()`` with its parameters on the meta device in ``dtype`` (shapes only, no memory)
    and its buffers computed on the CPU as ever (a rotary embedding's frequencies are not
    weights: they must keep their values). ``fill_random_`` skips it until its parameters are
    created on real devices (``stc_bench.placement``)."""
    from accelerate import init_empty_weights

    with _no_init(), _default_dtype(dtype), init_empty_weights(include_buffers=False):
        module = factory()
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
    safetensors only, and return its config.json. Raises ``CheckpointError`` saying what is wrong.

    Nothing that could be unpickled reaches transformers: any other weight file (``*.bin``,
    ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``, ``*.pickle``) or an index naming a shard that is not a
    ``.safetensors`` file inside the folder is refused, and every safetensors file's header is
    read and checked against the file's size (a truncated download fails here, in one line).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory; pass a local HF checkpoint folder")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"--checkpoint {path}: no config.json inside; pass the folder that holds config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"--checkpoint {path}: config.json is unreadable ({err}); download the checkpoint again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"--checkpoint {path}: config.json holds a {type(config).__name__}, not an object; "
                              "download the checkpoint again")
    if config.get("model_type") not in model_types:
        raise CheckpointError(
            f"--checkpoint {path}: model_type is {config.get('model_type')!r}, expected "
            f"{' or '.join(model_types)} (e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf)"
        )
    unsafe = sorted(f.name for f in root.iterdir() if f.suffix.lower() in PICKLED_SUFFIXES or f.name.endswith(".bin.index.json"))
    if unsafe:
        raise CheckpointError(f"--checkpoint {path}: {unsafe[0]} is not safetensors (pickled weights can run code when "
                              "loaded); only safetensors are loaded: convert it, or move it out of the folder")
    for index in sorted(root.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"--checkpoint {path}: {index.name} is unreadable ({type(err).__name__}: {err}); "
                                  "download the checkpoint again") from None
        for shard in sorted(map(str, shards)):
            if not shard.endswith(".safetensors") or Path(shard).name != shard:
                raise CheckpointError(f"--checkpoint {path}: {index.name} names the shard {shard!r}, not a .safetensors "
                                      "file in the folder; only safetensors weights are loaded: fix or remove the index")
            if not (root / shard).is_file():
                raise CheckpointError(f"--checkpoint {path}: the shard {shard} named in {index.name} is missing; "
                                      "download the whole checkpoint")
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"--checkpoint {path}: no *.safetensors files; only safetensors weights are loaded")
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise CheckpointError(f"--checkpoint {path}: {file.name} is truncated or corrupt ({problem}); download it again")
    return config


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""Weight files that torch.load would unpickle: refused in a --checkpoint folder."""


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with a safetensors file's framing (8-byte header length, JSON header, tensor
    offsets within the file), or None; the tensors themselves are not read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if length > min(size - 8, 100_000_000):
                return f"its header claims {length:,} bytes, the file holds {size:,}"
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as err:
        return err.strerror or str(err)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end > size:
        return f"{size:,} bytes, but its tensors end at byte {8 + length + end:,}"
    return None


def refuse_checkpoint(framework: str, checkpoint: str | None) -> None:
    """Frameworks whose checkpoint loading is not written yet refuse --checkpoint, saying so."""
    if checkpoint is not None:
        raise CheckpointError(f"--checkpoint is supported for rekv only so far; run {framework} with random weights")
