"""The one device abstraction: choosing the device, synchronising it, reading its memory.

Everything CUDA-specific that is not a clock lives here (clocks live in ``timing``), so that
the CPU path exercises the same calls and the GPU-only branches stay few and short.
"""

from __future__ import annotations

import platform
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
