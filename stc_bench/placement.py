"""Placement of an LLM larger than one GPU across the visible GPUs (``--device-map auto``).

The LLM is built on the meta device (shapes only, nothing allocated); accelerate's
``infer_auto_device_map`` assigns whole decoder layers to GPUs, in order, under per-GPU budgets
balanced as ``from_pretrained(device_map="auto")`` balances them (``get_balanced_memory``):
embeddings on the first GPU, the final norm and the LM head after the last layer. Each
parameter is then created on its GPU and filled with random weights there, so nothing is ever
whole on one device, and ``dispatch_model`` installs the hooks that carry activations from one
GPU to the next. A ``--checkpoint`` is loaded by ``from_pretrained`` with the same map.

Nothing is offloaded to the CPU or the disk (a benchmark of offloading would time PCIe, not the
model): a model that does not fit the GPUs is refused, saying what it needs and what they
offer. Each GPU's budget is ``LLM_MEMORY_FRACTION`` of its free memory when the LLM is built
(after the vision tower and projector, which stay on the run's device).

How a span that runs on several GPUs is timed: ``stc_bench.timing``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from stc_bench.errors import BenchUsageError

M = TypeVar("M", bound=nn.Module)

LLM_MEMORY_FRACTION = 0.9
"""Share of each GPU's free memory the LLM's weights may take; the rest holds the KV cache,
activations and the clip (accelerate keeps the same 10 % free on a single GPU)."""


class PlacementError(BenchUsageError):
    """``--device-map auto`` cannot place the model on this machine; the message says why and what to do."""


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def gpu_budgets(free: dict[int, int]) -> dict[int, int]:
    """Bytes of weights each GPU may take (``LLM_MEMORY_FRACTION`` of its free bytes), by index."""
    return {index: int(bytes_free * LLM_MEMORY_FRACTION) for index, bytes_free in free.items()}


def decoder_layer_classes(model: nn.Module) -> list[str]:
    """The class names a device map must never split (transformers' ``_no_split_modules``: the
    decoder layer, whose residual stream must stay on one device)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def plan_device_map(model: nn.Module, budgets: dict[int, int], dtype: torch.dtype) -> dict[str, int]:
    """accelerate's device map of ``model`` (on the meta device or anywhere: only shapes are
    read) over the GPUs of ``budgets`` (index -> bytes), balanced across them, whole decoder
    layers per GPU: module name -> GPU index. ``PlacementError`` when any part would have to go
    to the CPU or the disk."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory

    if not budgets:
        raise PlacementError("--device-map auto: no CUDA GPU is visible; leave out --device-map, or run where GPUs are "
                             "(check CUDA_VISIBLE_DEVICES)")
    no_split = decoder_layer_classes(model)
    # accelerate checks the budget keys against torch.cuda.device_count() and warns about each
    # one it cannot see (the tests plan for GPUs this machine does not have): not the user's business.
    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        balanced = get_balanced_memory(model, max_memory=dict(budgets), no_split_module_classes=no_split, dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split, dtype=dtype)
    finally:
        quiet.setLevel(level)
    left_out = [name or "the whole model" for name, where in device_map.items() if not isinstance(where, int)]
    if left_out:
        needed = compute_module_sizes(model, dtype=dtype)[""]
        offered = ", ".join(f"cuda:{i} {_gib(b)}" for i, b in sorted(budgets.items()))
        raise PlacementError(
            f"--device-map auto: the LLM's weights need {_gib(needed)} in {str(dtype).removeprefix('torch.')}, the "
            f"{len(budgets)} visible GPU(s) offer {_gib(sum(budgets.values()))} for them ({offered}: "
            f"{LLM_MEMORY_FRACTION:.0%} of each one's free memory, the rest kept for the KV cache and activations), so "
            f"{len(left_out)} part(s) would not fit, from {left_out[0]} on; make more GPUs visible (CUDA_VISIBLE_DEVICES) "
            "or larger ones, or pass a smaller --scale"
        )
    return dict(device_map)


def _device_of(name: str, device_map: dict[str, Any]) -> Any:
    """Where the tensor ``name`` goes: the entry of its longest module prefix in ``device_map``."""
    best = None
    for key in device_map:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    if best is None:
        raise KeyError(f"{name} is not covered by the device map")
    return device_map[best]


def materialise(model: M, device_map: dict[str, Any], seed: int) -> M:
    """Create every meta parameter of ``model`` on its device of ``device_map``, move its buffers
    there, fill the weights as ``weights.fill_random_`` does (one seeded generator per device), and
    install accelerate's hooks that move each mapped module's inputs to its device (also when all
    of it lands on one device: a placed run takes the same path on one GPU as on eight)."""
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device

    from stc_bench.frameworks.weights import fill_random_

    for name, param in list(model.named_parameters()):
        where = _device_of(name, device_map)
        set_module_tensor_to_device(model, name, where, value=torch.empty(param.shape, dtype=param.dtype, device=where))
    for name, _ in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, _device_of(name, device_map))
    fill_random_(model, seed)
    main = next(iter(device_map.values()))  # the first mapped device: where inputs and outputs of the whole model meet
    dispatch_model(model, device_map=device_map, main_device=main, force_hooks=True,
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))  # the KV cache object stays put
    return model.eval()


def place_random(factory: Callable[[], M], dtype: torch.dtype, seed: int) -> M:
    """A random-weight ``factory()`` placed across every visible GPU (``--device-map auto``)."""
    from stc_bench.device import gpu_free_memory
    from stc_bench.frameworks.weights import build_empty

    model = build_empty(factory, dtype)
    return materialise(model, plan_device_map(model, gpu_budgets(gpu_free_memory()), dtype), seed)


def _qualified_names(root: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in root.named_modules()}


def checkpoint_device_map(root: nn.Module, decoder: nn.Module, lm_head: nn.Module, rest: int,
                          dtype: torch.dtype) -> dict[str, int]:
    """The device map to load a whole checkpoint model ``root`` (built on the meta device) with:
    its ``decoder`` and ``lm_head`` placed across the visible GPUs as ``plan_device_map`` places a
    random one, everything else (vision tower, projector) on GPU ``rest``, the run's device, whose
    budget is reduced by those parts' size first."""
    from accelerate.utils import compute_module_sizes

    from stc_bench.device import gpu_free_memory

    llm = nn.Module()
    llm.model, llm.lm_head = decoder, lm_head
    llm._no_split_modules = decoder_layer_classes(decoder)
    names = _qualified_names(root)
    prefix = {"model": names[id(decoder)], "lm_head": names[id(lm_head)]}
    device_map = {}
    budgets = gpu_budgets(gpu_free_memory())
    other = compute_module_sizes(root, dtype=dtype)[""] - compute_module_sizes(llm, dtype=dtype)[""]
    if rest in budgets:
        budgets[rest] = max(0, budgets[rest] - other)
    for name, where in plan_device_map(llm, budgets, dtype).items():
        head, _, tail = name.partition(".")
        for part in prefix.values() if name == "" else [prefix[head]]:  # "": all of it on one GPU
            device_map[".".join(p for p in (part, tail) if p)] = where
    _cover(root, "", set(device_map), device_map, rest)
    return device_map


def _cover(module: nn.Module, name: str, placed: set[str], device_map: dict[str, int], rest: int) -> None:
    """Map to ``rest`` every part of ``module`` (called ``name``) that holds no placed module: the
    direct parameters, buffers and children beside the paths to the placed ones."""
    inside = [p for p in placed if name == "" or p == name or p.startswith(name + ".")]
    if name in placed:
        return
    if not inside:
        device_map[name] = rest
        return
    for child, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        device_map[f"{name}.{child}" if name else child] = rest
    for child, sub in module.named_children():
        _cover(sub, f"{name}.{child}" if name else child, placed, device_map, rest)


def devices_of(modules: Iterable[nn.Module]) -> list[torch.device]:
    """Every device the parameters of ``modules`` live on, in first-seen order."""
    return list(dict.fromkeys(p.device for m in modules for p in m.parameters()))


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 6]`` -> ``"0-2, 5-6"``."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe_placement(modules: Iterable[nn.Module]) -> dict[str, Any]:
    """Where a built pipeline's weights live, for the run block: parameter bytes per device, and
    per device the layers it holds by class, e.g. ``{"cuda:1": ["Qwen2DecoderLayer 20-39"]}``
    (layers = the modules a device map never splits, numbered by their place in their stack)."""
    modules = list(modules)
    seen: set[int] = set()
    parameter_bytes: dict[str, int] = {}
    layers: dict[str, dict[str, list[int]]] = {}
    for module in modules:
        no_split = set(decoder_layer_classes(module))
        for name, sub in module.named_modules():
            index = name.rpartition(".")[2]
            params = list(sub.parameters())
            if type(sub).__name__ in no_split and index.isdigit() and params:
                where = str(params[0].device)
                layers.setdefault(where, {}).setdefault(type(sub).__name__, []).append(int(index))
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                where = str(param.device)
                parameter_bytes[where] = parameter_bytes.get(where, 0) + param.numel() * param.element_size()
    order = sorted(parameter_bytes, key=_device_order)
    return {
        "devices": order,
        "parameter_bytes": {d: parameter_bytes[d] for d in order},
        "layers": {d: [f"{cls} {_ranges(ix)}" for cls, ix in layers[d].items()] for d in order if d in layers},
    }


def _device_order(name: str) -> tuple[str, int]:
    """``cuda:10`` after ``cuda:9``."""
    match = re.fullmatch(r"(\w+)(?::(\d+))?", name)
    return (match.group(1), int(match.group(2) or 0)) if match else (name, 0)
