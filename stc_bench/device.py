"""The one device abstraction: choosing the device, synchronising it, reading its memory.

Everything CUDA-specific that is not a clock lives here (clocks live in ``timing``), so that
the CPU path exercises the same calls and the GPU-only branches stay few and short.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from stc_bench.errors import BenchUsageError


class DeviceError(BenchUsageError):
    """The requested device does not exist here; the message says what to pass instead."""


@dataclass(frozen=True)
class Device:
    """A resolved torch device and what a report says about it."""

    torch_device: torch.device
    peers: tuple[torch.device, ...] = ()
    """Other GPUs that the run's modules are placed on (``--device-map auto``): ``synchronize``
    waits for them too, and a timed span covers their work (``timing.StageTimer``). Empty for a
    run on one device."""

    @property
    def is_cuda(self) -> bool:
        """True for a CUDA device."""
        return self.torch_device.type == "cuda"

    @property
    def label(self) -> str:
        """Short label for folder names: ``cpu`` or ``cuda0``."""
        return "cpu" if not self.is_cuda else f"cuda{self.torch_device.index or 0}"

    @property
    def name(self) -> str:
        """Human name: the GPU model, or the CPU model."""
        if self.is_cuda:
            return torch.cuda.get_device_name(self.torch_device)
        return cpu_model()

    def activate(self) -> contextlib.AbstractContextManager:
        """Make this device current for the block (``torch.cuda.device``), so that every stream,
        event, graph and allocation that names no device lands on it; a no-op on CPU."""
        return torch.cuda.device(self.torch_device) if self.is_cuda else contextlib.nullcontext()

    def with_peers(self, devices) -> Device:
        """This device, with every other CUDA device among ``devices`` (e.g. where a built
        pipeline's parameters live) as its peers, in index order."""
        others = {d for d in map(torch.device, devices) if d.type == "cuda" and d != self.torch_device}
        return replace(self, peers=tuple(sorted(others, key=lambda d: d.index or 0)))

    def synchronize(self) -> None:
        """Wait for all queued work on the device and its peers (a no-op on CPU, where ops are
        synchronous)."""
        if self.is_cuda:
            for device in (self.torch_device, *self.peers):
                torch.cuda.synchronize(device)

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (CUDA only)."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory_mb(self) -> float | None:
        """Peak allocated memory on this device (not its peers) since the last reset, in MiB; None on CPU."""
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.torch_device) / 2**20
        return None

    def default_dtype(self) -> torch.dtype:
        """float16 on CUDA (the frameworks' inference dtype), float32 on CPU."""
        return torch.float16 if self.is_cuda else torch.float32


class HostSyncError(RuntimeError):
    """A timed span synchronised the host with the device (or would on a GPU)."""


HOST_READS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
"""Tensor methods that read device memory on the host: on a GPU each one waits for the device."""

_HOST_RESIDENT = "_stc_bench_host_resident"
_INHERITED = object()


def host_resident(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a CPU tensor as host metadata (e.g. Qwen2-VL's ``grid_thw``): it stays on the CPU in a
    GPU run too, so reading it is no device sync, and ``forbid_host_syncs`` lets it be read."""
    setattr(tensor, _HOST_RESIDENT, True)
    return tensor


HOST_BLOCKING_CALLS = (
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "empty_cache"),
    ("torch.cuda.Event", "synchronize"),
    ("torch.cuda.Stream", "synchronize"),
    ("torch.cuda.CUDAGraph", "capture_begin"),
)
"""Explicit host-blocking CUDA calls that ``set_sync_debug_mode`` does not flag (it watches only
implicit syncs such as a device-to-host copy), so ``forbid_host_syncs`` makes each one raise.
``CUDAGraph.capture_begin`` stands for a graph capture: ``torch.cuda.graph`` synchronises and
empties the cache around it, and a capture inside a timed span would count all of that."""


def _owner(path: str):
    """``"torch.cuda.Event"`` -> the object ``torch.cuda.Event``."""
    obj = torch
    for part in path.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _patched(owner, name: str, replacement) -> Iterator[None]:
    """``owner.name = replacement`` for the block, restored exactly on exit, also after an error
    (an attribute the owner only inherited is deleted again rather than copied down)."""
    original = vars(owner).get(name, _INHERITED)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise HostSyncError(f"{what}() inside a timed span: it blocks the host until the device is idle "
                            "(graph captures, synchronize and empty_cache belong in the untimed prepare pass)")

    return refuse


def _guarded_read(name: str, original):
    def read(self, *args, **kwargs):
        if not getattr(self, _HOST_RESIDENT, False):
            raise HostSyncError(f"Tensor.{name}() inside a timed span: on a GPU this waits for the device")
        return original(self, *args, **kwargs)

    return read


@contextlib.contextmanager
def _sync_debug_errors() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def forbid_host_syncs(device: Device) -> Iterator[None]:
    """Fail on any host-device synchronisation inside the block.

    On every device the explicit blocking calls (``HOST_BLOCKING_CALLS``: ``torch.cuda.synchronize``,
    ``empty_cache``, ``Event.synchronize``, ``Stream.synchronize``, and a CUDA-graph capture, which
    synchronises and empties the cache) raise ``HostSyncError``: ``set_sync_debug_mode`` does not see
    them, and they are patched on a CPU too so the tests exercise the same guard. On CUDA,
    ``torch.cuda.set_sync_debug_mode("error")`` adds every implicitly synchronising op (``.item()``,
    a device-to-host or pageable host-to-device copy, ``nonzero``...). On a CPU nothing
    synchronises, so those are checked by proxy: the tensor methods that would read device memory
    on a GPU (``HOST_READS``) raise ``HostSyncError``, except on tensors marked ``host_resident``.
    Everything is restored on exit, also after an error.
    """
    with contextlib.ExitStack() as stack:
        for path, name in HOST_BLOCKING_CALLS:
            stack.enter_context(_patched(_owner(path), name, _refuse(f"{path}.{name}")))
        if device.is_cuda:
            stack.enter_context(_sync_debug_errors())
        else:
            for name in HOST_READS:
                stack.enter_context(_patched(torch.Tensor, name, _guarded_read(name, getattr(torch.Tensor, name))))
        yield


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time this process's cgroup may use (quota / period: ``cpu.max`` in cgroup v2,
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1); None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        return None if quota <= 0 else quota / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


def affinity_cpus() -> int | None:
    """How many CPUs this process may run on (its affinity mask); None where the OS does not say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


@dataclass(frozen=True)
class ThreadSettings:
    """torch's CPU threads for a run: ``threads`` intra-op threads, pinned; ``interop_threads``
    as found; and what the choice was made from."""

    threads: int
    interop_threads: int
    torch_default: int
    affinity_cpus: int | None
    cgroup_cpu_limit: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for the environment block."""
        return asdict(self)


def pin_cpu_threads() -> ThreadSettings:
    """Set torch's intra-op thread count explicitly, once at the start of a run, and say why.

    The count is torch's default (``OMP_NUM_THREADS`` where set, else MKL's count of physical
    cores), lowered to the CPUs this process may run on (affinity mask) and to its cgroup's CPU
    quota (rounded down): a container's quota or a ``taskset`` mask that torch's default does not
    see would otherwise oversubscribe the cores, and threads preempted mid-kernel are the largest
    run-to-run variance a CPU run has. It never raises the count, so a caller's own
    ``torch.set_num_threads`` stands, and a second run in the process keeps the first's count.
    Inter-op threads are recorded, not set: the pipelines never fork inter-op work, and torch
    lets that pool be sized once per process only.
    """
    default = torch.get_num_threads()
    cpus, quota = affinity_cpus(), cgroup_cpu_limit()
    limits = {"torch's default": default}
    if cpus is not None:
        limits["the CPUs of the affinity mask"] = cpus
    if quota is not None:
        limits["the cgroup's CPU quota"] = max(1, int(quota))
    threads = min(limits.values())
    torch.set_num_threads(threads)
    facts = ", ".join(f"{name} {value}" for name, value in limits.items())
    return ThreadSettings(threads, torch.get_num_interop_threads(), default, cpus, quota, f"the least of {facts}")


def resolve_device(spec: str) -> Device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a Device that exists on this machine."""
    spec = spec.strip().lower()
    if spec == "auto":
        return Device(torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if spec == "cpu":
        return Device(torch.device("cpu"))
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {spec}: write cuda:N with N a GPU index, e.g. cuda:0")
        index = int(index_text)
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--gpu/--device {spec}: CUDA is not available on this machine (torch {torch.__version__}); "
                "leave out --gpu or pass --device cpu"
            )
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"--gpu {index}: out of range, this machine has {count} CUDA device(s): 0..{count - 1}")
        return Device(torch.device("cuda", index))
    raise DeviceError(f"--device {spec}: must be auto, cpu, cuda or cuda:N")


def gpu_free_memory() -> dict[int, int]:
    """Free bytes on every visible CUDA device, by index (``torch.cuda.mem_get_info``, which
    starts a context on each); empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {index: torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())}


def resolve_dtype(spec: str, device: Device) -> torch.dtype:
    """``auto`` | ``float32`` | ``float16`` | ``bfloat16`` -> a torch dtype."""
    if spec == "auto":
        return device.default_dtype()
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec]
