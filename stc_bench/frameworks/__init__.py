"""Registry of the frameworks stc-bench can build, by name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stc_bench.frameworks.framework import FrameworkSpec

FRAMEWORK_MODULES = {"rekv": "stc_bench.frameworks.rekv"}
"""Framework name -> module defining ``FRAMEWORK``; imported on first use (torch is heavy)."""


def get_framework(name: str) -> FrameworkSpec:
    """The registered framework ``name``; ValueError listing the choices otherwise."""
    if name not in FRAMEWORK_MODULES:
        raise ValueError(f"unknown framework {name!r}: choose one of {', '.join(sorted(FRAMEWORK_MODULES))}")
    return importlib.import_module(FRAMEWORK_MODULES[name]).FRAMEWORK
