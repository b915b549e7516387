"""The host memory allocator of a CPU run: steady glibc malloc settings, and the page-fault and
system-time counters that show whether an arm's memory churns.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at start, raised to the
size of each mapped block freed, up to 32 MiB on 64-bit) with a fresh ``mmap``, gives it back
with ``munmap`` on free, and returns the heap's free top to the kernel once it exceeds twice that
threshold. A CPU stream allocates and frees tensors of many MiB, some growing every step (the KV
cache), so a stream can map fresh pages and pay a page fault (and the kernel zeroing the page) per
4 KiB it touches: system time inside the timed spans, different per arm because the arms'
tensors differ in size, and varying from run to run with what the run freed before.
``steady_allocator`` fixes the thresholds once, before the model is built, so freed tensors stay
in the heap and the next stream reuses the same pages.

jemalloc, tcmalloc or mimalloc preloaded through ``LD_PRELOAD`` already keep freed memory for
reuse: they are detected and left alone. Where the C library is not glibc (macOS, musl) nothing
is applied and the reason is recorded; nothing here fails a run.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stc_bench.errors import BenchUsageError

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""

C_INT_MAX = 2**31 - 1
"""``mallopt`` takes a C int: the largest value any of its parameters can take."""

MALLOPT_SETTINGS = (
    # An allocation below this comes from the heap, where a freed block is reused by the next
    # stream instead of being unmapped and faulted in again. The largest tensors of a small-preset
    # CPU run are pre-fill's grouped-query key/value copies, which grow every step (26 MB at step
    # 64 of rekv). glibc's dynamic threshold only rises to the size of the last mapped block freed,
    # so a block that grows every step can be mapped afresh every step: ~170k faults per baseline
    # stream at 64 frames, or none, depending on what the run happened to free before (run-to-run
    # variance). A fixed threshold switches that dynamic rule off; 1 GiB covers those copies to
    # some 2,500 frames.
    ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, 2**30),
    # Never hand the heap's free top back to the kernel during a run: the next stream would fault
    # the same pages in again. The process's peak heap stays mapped until it exits.
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, C_INT_MAX),
    # Grow the heap in steps of at least 64 MiB, so a stream that needs a little more heap than
    # the last makes one brk call rather than one per allocation (pages still fault only when touched).
    ("M_TOP_PAD", M_TOP_PAD, 64 * 2**20),
)
"""The ``mallopt`` settings a CPU run applies: (name, parameter, value)."""

PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
"""Allocators that replace malloc when preloaded; each keeps freed memory for reuse by itself."""

ALLOCATOR_VARIABLE = "STCBENCH_ALLOCATOR"
"""``tuned`` (the default) applies ``MALLOPT_SETTINGS`` on CPU runs; ``system`` keeps the C
library's defaults (to measure what the settings change). Named outside ``STC_*``, which
belongs to ``stc.STCConfig.from_env``."""
ALLOCATOR_CHOICES = ("tuned", "system")

ALLOCATOR_VARIABLES = (ALLOCATOR_VARIABLE, "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
"""Environment variables that decide which allocator runs and how (read by ``stc_bench.env``)."""


@dataclass(frozen=True)
class AllocatorSettings:
    """Which allocator a run used and what stc-bench set on it: ``applied`` says whether the
    ``settings`` (``mallopt`` name -> value) were set, ``reason`` why or why not."""

    allocator: str
    applied: bool
    reason: str
    settings: tuple[tuple[str, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for the environment block."""
        return {"allocator": self.allocator, "applied": self.applied, "reason": self.reason,
                "settings": dict(self.settings)}


def glibc_version() -> str | None:
    """The running glibc's version (``gnu_get_libc_version``), or None where the C library is not glibc."""
    if sys.platform == "win32":
        return None
    try:
        get = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_char_p
    return get().decode("ascii", "replace")


def loaded_libraries() -> str:
    """This process's memory map (``/proc/self/maps``), where a preloaded allocator shows; "" where unreadable."""
    try:
        return Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def preloaded_allocator(ld_preload: str | None, maps: str = "") -> str | None:
    """The malloc replacement in ``LD_PRELOAD`` (or mapped into the process), e.g. ``jemalloc``; None when glibc's own runs."""
    for name in PRELOADED_ALLOCATORS:
        if name in (ld_preload or "") or f"lib{name}" in maps:
            return name
    return None


def allocator_choice(variables: Mapping[str, str | None]) -> str:
    """``STCBENCH_ALLOCATOR`` as one of ``ALLOCATOR_CHOICES`` (unset or empty: ``tuned``);
    ``BenchUsageError`` for anything else, before anything is built."""
    raw = (variables.get(ALLOCATOR_VARIABLE) or "").strip().lower()
    if raw in ("", "tuned"):
        return "tuned"
    if raw not in ALLOCATOR_CHOICES:
        raise BenchUsageError(f"{ALLOCATOR_VARIABLE}={variables.get(ALLOCATOR_VARIABLE)!r}: must be tuned (steady glibc "
                              "malloc settings, the default) or system (the C library's defaults); unset it or pick one")
    return raw


def mallopt(parameter: int, value: int) -> bool:
    """glibc's ``mallopt(parameter, value)``: True when glibc took the value."""
    function = ctypes.CDLL(None).mallopt
    function.argtypes = (ctypes.c_int, ctypes.c_int)
    return function(parameter, value) == 1  # 1 on success, 0 for a value glibc refuses


def steady_allocator(is_cpu: bool, variables: Mapping[str, str | None]) -> AllocatorSettings:
    """Apply ``MALLOPT_SETTINGS`` once, at the start of a CPU run on glibc, and say what was done.

    ``variables``: ``ALLOCATOR_VARIABLES`` as read by ``stc_bench.env``. Not applied (with the
    reason) on a GPU run (its tensors live in torch's CUDA caching allocator), with
    ``STCBENCH_ALLOCATOR=system``, under a preloaded jemalloc/tcmalloc/mimalloc, where glibc's
    malloc was configured through its own variables (``GLIBC_TUNABLES``, ``MALLOC_*_``: the
    user's settings win), and where the C library is not glibc. Process-wide and idempotent:
    applying twice sets the same values. Never raises but for a bad ``STCBENCH_ALLOCATOR``.
    """
    choice = allocator_choice(variables)
    libc_version = glibc_version()
    preloaded = preloaded_allocator(variables.get("LD_PRELOAD"), loaded_libraries())
    name = f"{preloaded} (preloaded)" if preloaded else f"glibc {libc_version}" if libc_version else "not glibc"
    if not is_cpu:
        return AllocatorSettings(name, False, "GPU run: tensors live in torch's CUDA caching allocator")
    if choice == "system":
        return AllocatorSettings(name, False, f"{ALLOCATOR_VARIABLE}=system: the C library's defaults were kept")
    if preloaded:
        return AllocatorSettings(name, False, f"{preloaded} is preloaded (LD_PRELOAD): it keeps freed memory for reuse itself")
    if libc_version is None:
        return AllocatorSettings(name, False, f"the C library is not glibc ({sys.platform}): no mallopt thresholds to set")
    tuned = [key for key in ALLOCATOR_VARIABLES if key.startswith("MALLOC_") and variables.get(key)]
    if "glibc.malloc." in (variables.get("GLIBC_TUNABLES") or ""):
        tuned.append("GLIBC_TUNABLES")
    if tuned:
        return AllocatorSettings(name, False, f"glibc's malloc was configured through {', '.join(tuned)}: left as set")
    refused = [key for key, parameter, value in MALLOPT_SETTINGS if not mallopt(parameter, value)]
    settings = tuple((key, value) for key, _, value in MALLOPT_SETTINGS if key not in refused)
    if refused:
        return AllocatorSettings(name, bool(settings), f"glibc refused {', '.join(refused)}", settings)
    return AllocatorSettings(name, True, "CPU run on glibc: freed tensors stay in the heap for the next stream", settings)


@dataclass(frozen=True)
class HostUsage:
    """The process's page faults and system CPU time so far (``getrusage(RUSAGE_SELF)``, every
    thread); the difference of two is what happened in between."""

    minor_faults: int
    major_faults: int
    system_ms: float

    def __sub__(self, earlier: HostUsage) -> HostUsage:
        return HostUsage(self.minor_faults - earlier.minor_faults, self.major_faults - earlier.major_faults,
                         self.system_ms - earlier.system_ms)


HOST_USAGE_KEYS = ("minor_faults", "major_faults", "system_ms")
"""The counters of a ``HostUsage``, as recorded per timed stream."""


def host_usage() -> HostUsage | None:
    """The counters now; None where ``resource`` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return HostUsage(usage.ru_minflt, usage.ru_majflt, usage.ru_stime * 1e3)
