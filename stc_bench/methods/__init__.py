"""Registry of compression methods (arms), by name; one module per method defines ``METHOD``.

Adding a method is one module here plus one line in ``METHOD_MODULES`` (and its help line).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stc_bench.methods.method import MethodSpec

METHOD_MODULES = {
    "baseline": "stc_bench.methods.baseline",
    "stc": "stc_bench.methods.stc",
    "tome": "stc_bench.methods.tome",
    "visionzip": "stc_bench.methods.visionzip",
    "vidcom2": "stc_bench.methods.vidcom2",
}
"""Method name -> module defining ``METHOD``; imported on first use (torch is heavy)."""

METHOD_HELP = {
    "baseline": "the framework as published: no compression (every other arm is compared with it)",
    "stc": "STC: STC-Cacher inside the ViT (--ratio, --interval) + STC-Pruner before the LLM (--tokens-per-frame)",
    "tome": "ToMe: token merging inside the ViT down to --tokens-per-frame tokens per frame",
    "visionzip": "VisionZip: dominant + contextual tokens before the LLM, --tokens-per-frame per frame",
    "vidcom2": "VidCom²: frame- and video-uniqueness token selection before the LLM, --tokens-per-frame per frame",
}
"""One line per method for --help and stc-bench list (kept here so --help imports no torch)."""


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; ``MethodError`` listing the choices otherwise."""
    if name not in METHOD_MODULES:
        from stc_bench.methods.method import MethodError

        raise MethodError(f"unknown method {name!r}: choose from {', '.join(METHOD_MODULES)}")
    return importlib.import_module(METHOD_MODULES[name]).METHOD
