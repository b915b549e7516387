"""The one device abstraction: choosing the device, synchronising it, reading its memory.

Everything CUDA-specific that is not a clock lives here (clocks live in ``timing``), so that
the CPU path exercises the same calls and the GPU-only branches stay few and short.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stc_bench.errors import BenchUsageError


class DeviceError(BenchUsageError):
    """The requested device does not exist here; the message says what to pass instead."""


@dataclass(frozen=True)
class Device:
    """A resolved torch device and what a report says about it."""

    torch_device: torch.device

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

    def synchronize(self) -> None:
        """Wait for all queued work on the device (a no-op on CPU, where ops are synchronous)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.torch_device)

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (CUDA only)."""
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory_mb(self) -> float | None:
        """Peak allocated memory since the last reset, in MiB; None on CPU."""
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


def host_resident(tensor: torch.Tensor) -> torch.Tensor:
    """Mark a CPU tensor as host metadata (e.g. Qwen2-VL's ``grid_thw``): it stays on the CPU in a
    GPU run too, so reading it is no device sync, and ``forbid_host_syncs`` lets it be read."""
    setattr(tensor, _HOST_RESIDENT, True)
    return tensor


@contextlib.contextmanager
def forbid_host_syncs(device: Device) -> Iterator[None]:
    """Fail on any host-device synchronisation inside the block.

    On CUDA this is ``torch.cuda.set_sync_debug_mode("error")``: every synchronising call
    (``.item()``, a device-to-host or pageable host-to-device copy, ``nonzero``...) raises. On a
    CPU nothing synchronises, so the same code is checked by proxy: the tensor methods that
    would read device memory on a GPU (``HOST_READS``) raise ``HostSyncError``, except on
    tensors marked ``host_resident``.
    """
    if device.is_cuda:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def guarded(name: str, original):
        def read(self, *args, **kwargs):
            if not getattr(self, _HOST_RESIDENT, False):
                raise HostSyncError(f"Tensor.{name}() inside a timed span: on a GPU this waits for the device")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


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


def resolve_dtype(spec: str, device: Device) -> torch.dtype:
    """``auto`` | ``float32`` | ``float16`` | ``bfloat16`` -> a torch dtype."""
    if spec == "auto":
        return device.default_dtype()
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec]
