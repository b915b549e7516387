"""Registry of the frameworks stc-bench can build, by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stc_bench.frameworks.framework import FrameworkSpec

FRAMEWORK_MODULES = {
    "rekv": "stc_bench.frameworks.rekv",
    "streamforest": "stc_bench.frameworks.streamforest",
    "dispider": "stc_bench.frameworks.dispider",
    "livecc": "stc_bench.frameworks.livecc",
}
"""Framework name -> module defining ``FRAMEWORK``; imported on first use (torch is heavy)."""

FRAMEWORK_HELP = {
    "rekv": "ReKV on LLaVA-OneVision-7B: SigLIP ViT encoding, projector/pooling/pruner, and visual-token pre-fill "
            "into a KV cache, baseline vs +STC (cacher + pruner).",
    "streamforest": "StreamForest-Qwen2-7B: SigLIP ViT frame by frame, ToMe memory, one pre-fill per query; "
                    "baseline vs +STC (cacher only).",
    "dispider": "Dispider: CLIP ViT-L/14 @ 224 px on clips of 16 frames; baseline vs +STC (cacher only).",
    "livecc": "LiveCC-7B: Qwen2-VL ViT per 2-frame step and pre-fill into a KV cache; baseline vs +STC "
              "(cacher only, Qwen2-VL adapter).",
}
"""The CLI's help text per framework command (kept here so --help imports no torch)."""


def get_framework(name: str) -> FrameworkSpec:
    """The registered framework ``name``; ValueError listing the choices otherwise."""
    if name not in FRAMEWORK_MODULES:
        raise ValueError(f"unknown framework {name!r}: choose one of {', '.join(sorted(FRAMEWORK_MODULES))}")
    return importlib.import_module(FRAMEWORK_MODULES[name]).FRAMEWORK
