"""stc-bench: measure what STC saves on streaming VideoLLMs.

The command line (``stc-bench``) is the main interface. For notebooks::

    from stc_bench import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(framework="rekv", scale="small", frames=(16,)))
    result.measurements[0].median

Names are imported lazily, so ``import stc_bench`` (and ``stc-bench --help``) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stc_bench.config import BenchConfig
    from stc_bench.measurement import Measurement
    from stc_bench.runner import run_benchmark

__all__ = ["BenchConfig", "Measurement", "run_benchmark"]

_HOMES = {"BenchConfig": "stc_bench.config", "Measurement": "stc_bench.measurement", "run_benchmark": "stc_bench.runner"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'stc_bench' has no attribute {name!r}")
