"""Environment capture: what machine and software produced a result, so that runs from
different nights can be compared (``compare`` refuses runs whose GPU model, driver major
version or torch differ) and a slow night can be explained (clocks, temperature, power, other
processes on the GPU).

GPU facts come from ``nvidia-smi``, run with a timeout; when it is missing, hangs, fails or
answers something unexpected, the block records why and the run goes on: nothing here raises.

Which GPU ``nvidia-smi`` is asked about: torch's ``cuda:N`` counts only the GPUs in
``CUDA_VISIBLE_DEVICES``, in CUDA's order (fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``),
while ``nvidia-smi -i N`` counts every GPU in PCI bus order. So the GPU is named by its UUID
(``torch.cuda.get_device_properties(N).uuid``, as ``GPU-<uuid>``), which is the same physical
GPU whatever the ordering. Only where torch gives no UUID, or nvidia-smi does not know it (a MIG
slice), the ``N``-th entry of ``CUDA_VISIBLE_DEVICES`` is used (or ``N`` itself when it is
unset); that index is exact only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or a single GPU, and
the block then carries a warning saying so. ``nvidia_smi.selected_by`` records which was used.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stc_bench.allocator import ALLOCATOR_VARIABLES, AllocatorSettings
from stc_bench.device import Device, ThreadSettings, affinity_cpus, cpu_model

NVIDIA_SMI_TIMEOUT_S = 10.0
"""nvidia-smi hangs for minutes on a wedged driver; each query waits at most this long."""

RECORDED_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
"""Environment variables that change what a CUDA run measures; recorded, never set."""

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that size torch's CPU thread pools; recorded with the thread settings."""

CPUFREQ = Path("/sys/devices/system/cpu")
"""Where Linux exposes each CPU's frequency governor and clocks (absent in most containers and VMs)."""

SDPA_BACKENDS = ("flash", "mem_efficient", "math", "cudnn")
"""Scaled-dot-product-attention backends whose ``torch.backends.cuda.<name>_sdp_enabled()`` is recorded."""


@dataclass(frozen=True)
class SmiField:
    """One ``nvidia-smi --query-gpu`` field and the key it is recorded under."""

    query: str
    key: str
    numeric: bool = True


STATIC_GPU_FIELDS = (
    SmiField("pci.bus_id", "gpu_pci_bus_id", numeric=False),
    SmiField("driver_version", "driver_version", numeric=False),
    SmiField("persistence_mode", "gpu_persistence_mode", numeric=False),
    SmiField("mig.mode.current", "gpu_mig_mode", numeric=False),
    SmiField("clocks.max.sm", "gpu_sm_clock_max_mhz"),
    SmiField("clocks.max.memory", "gpu_memory_clock_max_mhz"),
    SmiField("power.limit", "gpu_power_limit_w"),
)
"""Facts of the GPU that hold for the whole run (top-level keys of the environment)."""

GPU_STATE_FIELDS = (
    SmiField("uuid", "gpu_uuid", numeric=False),
    SmiField("clocks.sm", "sm_clock_mhz"),
    SmiField("clocks.mem", "memory_clock_mhz"),
    SmiField("temperature.gpu", "temperature_c"),
    SmiField("power.draw", "power_draw_w"),
    SmiField("pstate", "performance_state", numeric=False),
    SmiField("utilization.gpu", "utilization_pct"),
    SmiField("memory.used", "memory_used_mib"),
)
"""What changes while a run goes on: one snapshot before it and one after (``gpu_state``)."""


class NvidiaSmiUnavailable(Exception):
    """nvidia-smi cannot answer at all (missing, hung, not runnable); the message is the reason recorded."""


class NvidiaSmiRefused(NvidiaSmiUnavailable):
    """nvidia-smi ran but failed or answered something unexpected for this query (another GPU name may work)."""


def _run_nvidia_smi(args: list[str]) -> str:
    """The one place nvidia-smi runs: its stdout, or NvidiaSmiUnavailable/NvidiaSmiRefused with the reason."""
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except FileNotFoundError:
        raise NvidiaSmiUnavailable("nvidia-smi not found") from None
    except subprocess.TimeoutExpired:
        raise NvidiaSmiUnavailable(f"nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_S:g} s") from None
    except OSError as err:
        raise NvidiaSmiUnavailable(f"nvidia-smi could not run: {err.strerror or err}") from None
    if done.returncode != 0:
        # nvidia-smi prints some errors ("No devices were found") on stdout, others on stderr.
        message = (done.stderr.strip() or done.stdout.strip() or "no message").splitlines()[0]
        raise NvidiaSmiRefused(f"nvidia-smi exited with {done.returncode}: {message[:200]}")
    return done.stdout


def _unexpected(text: str) -> NvidiaSmiRefused:
    return NvidiaSmiRefused(f"unexpected nvidia-smi output: {text.strip()[:120]!r}")


def _parse_value(text: str, field: SmiField) -> str | int | float | None:
    """One CSV cell: None for [N/A]-style cells, a number for numeric fields, else the text."""
    text = text.strip()
    if text in ("", "N/A") or text.startswith("["):  # "[N/A]", "[Not Supported]", "[Unknown Error]"
        return None
    if not field.numeric:
        return text
    try:
        number = float(text)
    except ValueError:
        raise NvidiaSmiRefused(f"unexpected nvidia-smi value for {field.query}: {text[:60]!r}") from None
    return int(number) if number.is_integer() and "." not in text else number


def _parse_gpu_query(output: str, fields: tuple[SmiField, ...]) -> dict[str, Any]:
    """The one row of ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits -i <gpu>``
    as ``{field.key: value}``; NvidiaSmiRefused for anything but one row of ``len(fields)`` cells."""
    lines = [line for line in output.splitlines() if line.strip()]
    if len(lines) != 1:
        raise _unexpected(output) if lines else NvidiaSmiRefused("nvidia-smi answered nothing")
    cells = lines[0].split(",")
    if len(cells) != len(fields):
        raise _unexpected(lines[0])
    return {f.key: _parse_value(cell, f) for f, cell in zip(fields, cells)}


def _parse_compute_apps(output: str, gpu_uuid: str | None) -> list[dict[str, Any]]:
    """Rows of ``nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory,process_name`` that run
    on ``gpu_uuid``, as ``{pid, process_name, used_memory_mib, is_this_process}``.

    ``is_this_process`` compares with this process's id, which only means something outside a
    PID namespace: inside a container nvidia-smi shows host ids (or nothing).
    """
    memory = SmiField("used_memory", "used_memory_mib")
    processes = []
    for line in output.splitlines():
        if not line.strip():
            continue
        cells = line.split(",", 3)  # the name comes last: a path may hold commas
        if len(cells) != 4 or not cells[1].strip().isdigit():
            raise _unexpected(line)
        uuid, pid, used, name = (c.strip() for c in cells)
        if gpu_uuid is not None and uuid != gpu_uuid:
            continue
        processes.append({"pid": int(pid), "process_name": name, "used_memory_mib": _parse_value(used, memory),
                          "is_this_process": int(pid) == os.getpid()})
    return processes


def _nvidia_smi_selectors(torch_index: int, torch_uuid: str | None, visible_devices: str | None) -> list[tuple[str, str]]:
    """Ways to name torch's ``cuda:<torch_index>`` to ``nvidia-smi -i``, best first, each with how
    it was derived: the UUID from torch, then the matching ``CUDA_VISIBLE_DEVICES`` entry (an
    index, ``GPU-``/``MIG-`` UUID), or the torch index itself when that variable is unset."""
    selectors = []
    if torch_uuid:
        selectors.append((torch_uuid, "uuid from torch"))
    if visible_devices is None:
        selectors.append((str(torch_index), "torch index (CUDA_VISIBLE_DEVICES unset)"))
    else:
        entries = [entry.strip() for entry in visible_devices.split(",") if entry.strip()]
        if torch_index < len(entries) and entries[torch_index] != torch_uuid:
            selectors.append((entries[torch_index], f"CUDA_VISIBLE_DEVICES entry {torch_index}"))
    return selectors


def _index_warning(selector: str, device_order: str | None) -> str | None:
    """Why a numeric selector may name another GPU than torch's (None when it is exact or a UUID)."""
    if selector.isdigit() and device_order != "PCI_BUS_ID":
        return ("nvidia-smi counts GPUs in PCI bus order, CUDA fastest first: with several GPUs this may be another GPU "
                "(set CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    return None


def _variables(names: tuple[str, ...]) -> dict[str, str | None]:
    """The values of ``names`` (None when unset): the one place stc_bench reads environment variables."""
    return {name: os.environ.get(name) for name in names}


def _recorded_variables() -> dict[str, str | None]:
    """The values of ``RECORDED_VARIABLES`` (None when unset)."""
    return _variables(RECORDED_VARIABLES)


def allocator_variables() -> dict[str, str | None]:
    """The values of ``ALLOCATOR_VARIABLES``: what ``allocator.steady_allocator`` decides from."""
    return _variables(ALLOCATOR_VARIABLES)


def _torch_gpu_uuid(device: Device) -> str | None:
    """The GPU's UUID as nvidia-smi writes it (``GPU-...``), from torch; None where torch has none."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device.torch_device), "uuid", None)
    if uuid is None or not str(uuid).strip():
        return None
    text = str(uuid).strip()  # torch prints the bare 8-4-4-4-12 hex form
    return text if text.upper().startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _query_gpu(device: Device, fields: tuple[SmiField, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``fields`` of ``device`` from nvidia-smi, and how the GPU was named: ``{"selected_by", "warning"?}``."""
    variables = _recorded_variables()
    index = device.torch_device.index or 0
    refusals = []
    for selector, how in _nvidia_smi_selectors(index, _torch_gpu_uuid(device), variables["CUDA_VISIBLE_DEVICES"]):
        query = [f"--query-gpu={','.join(f.query for f in fields)}", "--format=csv,noheader,nounits", "-i", selector]
        try:
            row = _parse_gpu_query(_run_nvidia_smi(query), fields)
        except NvidiaSmiRefused as err:  # NvidiaSmiUnavailable (missing, hung) propagates: no selector helps
            refusals.append(f"{how} {selector}: {err}")
            continue
        selection: dict[str, Any] = {"selected_by": f"{how} {selector}"}
        warning = _index_warning(selector, variables["CUDA_DEVICE_ORDER"])
        if warning:
            selection["warning"] = warning
        return row, selection
    raise NvidiaSmiUnavailable("; ".join(refusals) or f"no way to name cuda:{index} to nvidia-smi")


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def gpu_state(device: Device) -> dict[str, Any] | None:
    """A snapshot of what changes during a run: current SM and memory clocks, temperature, power
    draw, performance state, utilisation, memory used, and the compute processes on this GPU.

    None on CPU. Never raises: when nvidia-smi cannot answer, ``{"available": False, "reason": ...}``.
    The runner takes one at the start (``gpu_state_before``) and one at the end (``gpu_state_after``).
    """
    if not device.is_cuda:
        return None
    snapshot: dict[str, Any] = {"captured_utc": _utc_now()}
    try:
        row, selection = _query_gpu(device, GPU_STATE_FIELDS)
    except NvidiaSmiUnavailable as err:
        return {"available": False, "reason": str(err), **snapshot}
    except Exception as err:  # a diagnostic snapshot must never end a benchmark
        return {"available": False, "reason": f"{type(err).__name__}: {err}", **snapshot}
    snapshot = {"available": True, **snapshot, **row, **selection}
    try:
        output = _run_nvidia_smi(["--query-compute-apps=gpu_uuid,pid,used_memory,process_name", "--format=csv,noheader,nounits"])
        processes = _parse_compute_apps(output, row["gpu_uuid"])
    except NvidiaSmiUnavailable as err:
        snapshot.update(compute_processes=None, compute_processes_reason=str(err))
    else:
        snapshot.update(compute_processes=processes, other_process_count=sum(not p["is_this_process"] for p in processes))
    return snapshot


def _static_gpu_facts(device: Device) -> dict[str, Any]:
    """``STATIC_GPU_FIELDS`` (None where unknown) and an ``nvidia_smi`` block saying whether it answered."""
    facts: dict[str, Any] = {f.key: None for f in STATIC_GPU_FIELDS}
    try:
        row, selection = _query_gpu(device, STATIC_GPU_FIELDS)
    except NvidiaSmiUnavailable as err:
        facts["nvidia_smi"] = {"available": False, "reason": str(err)}
    except Exception as err:  # a missing fact must never end a benchmark
        facts["nvidia_smi"] = {"available": False, "reason": f"{type(err).__name__}: {err}"}
    else:
        facts.update(row)
        facts["nvidia_smi"] = {"available": True, **selection}
    return facts


def _driver_cuda_version() -> str | None:
    """The newest CUDA version the installed driver supports (``cuDriverGetVersion``), e.g. ``"12.4"``;
    None without an NVIDIA driver."""
    try:
        libcuda = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _read(flag: Callable[[], Any]) -> Any:
    """A torch flag's value, or None where this torch lacks it."""
    try:
        return flag()
    except (AttributeError, RuntimeError):
        return None


def _torch_flags() -> dict[str, Any]:
    """Global torch switches that change which kernels run: TF32, reduced-precision fp16
    reductions, cuDNN autotuning and determinism, and the SDPA backends enabled."""
    import torch

    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    sdpa = {}
    for name in SDPA_BACKENDS:
        enabled = getattr(cuda, f"{name}_sdp_enabled", None)
        if enabled is not None:
            sdpa[name] = _read(enabled)
    return {
        "tf32_matmul": _read(lambda: cuda.matmul.allow_tf32),
        "tf32_cudnn": _read(lambda: cudnn.allow_tf32),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "fp16_reduced_precision_reduction": _read(lambda: cuda.matmul.allow_fp16_reduced_precision_reduction),
        "cudnn_benchmark": _read(lambda: cudnn.benchmark),
        "cudnn_deterministic": _read(lambda: cudnn.deterministic),
        "deterministic_algorithms": _read(torch.are_deterministic_algorithms_enabled),
        "sdpa_backends": sdpa,
    }


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _read_text(path: Path) -> str | None:
    """A small sysfs/procfs file's stripped text; None where it cannot be read (containers hide many)."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _mhz(khz: list[str | None]) -> list[float]:
    """cpufreq's kHz readings as MHz, the unreadable ones left out."""
    return [int(k) / 1000 for k in khz if k is not None and k.isdigit()]


def cpu_frequency(root: Path = CPUFREQ, cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPUs' frequency scaling, over the CPUs this process may run on: governors, current
    and maximum clocks in MHz (lowest and highest across CPUs), and whether turbo/boost is on.
    ``available`` False (with ``reason``) where Linux's cpufreq is not exposed (containers, VMs):
    then ``cpuinfo_mhz`` (the clocks /proc/cpuinfo reports) is all there is. Never raises."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    governors = [_read_text(root / f"cpu{c}" / "cpufreq" / "scaling_governor") for c in cpus]
    current = _mhz([_read_text(root / f"cpu{c}" / "cpufreq" / "scaling_cur_freq") for c in cpus])
    maximum = _mhz([_read_text(root / f"cpu{c}" / "cpufreq" / "cpuinfo_max_freq") for c in cpus])
    no_turbo, boost = _read_text(root / "intel_pstate" / "no_turbo"), _read_text(root / "cpufreq" / "boost")
    try:
        lines = cpuinfo.read_text(encoding="utf-8").splitlines()
        reported = [float(line.split(":", 1)[1]) for line in lines if line.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        reported = []
    block: dict[str, Any] = {
        "available": any(g is not None for g in governors),
        "governors": sorted({g for g in governors if g is not None}) or None,
        "current_mhz_min": min(current, default=None), "current_mhz_max": max(current, default=None),
        "max_mhz": max(maximum, default=None),
        "turbo": None if no_turbo is None and boost is None else (no_turbo == "0" if no_turbo is not None else boost == "1"),
        "cpuinfo_mhz": sorted(set(reported)) or None,
    }
    if not block["available"]:
        block["reason"] = f"no cpufreq under {root} (a container or VM hides it): governor and clocks unknown"
    return block


def capture_environment(device: Device | None = None, allocator: AllocatorSettings | None = None,
                        threads: ThreadSettings | None = None) -> dict[str, Any]:
    """Versions, device, threads, git commit, torch's kernel switches and the recorded
    environment variables, as a JSON-safe dict; on CUDA also the GPU's identity and limits
    (``gpu_uuid``, ``driver_version``, ``cuda_driver_version``, max clocks, power limit,
    persistence and MIG mode) and a ``gpu_state_before`` snapshot (see ``gpu_state``); for a run
    placed across GPUs, ``peer_devices``: the name and memory of each other GPU it uses.
    ``cuda_version`` is the CUDA runtime torch was built with. Never raises on a missing fact.

    Host facts that move CPU timings: ``allocator`` (what ``allocator.steady_allocator`` did at the
    start of the run, with the variables it read; without a run, only the variables),
    ``threads`` (``device.pin_cpu_threads``: intra-op threads pinned, inter-op threads, the
    limits they came from; without a run, the counts as found) and ``cpu_frequency``."""
    import torch
    import transformers

    import stc

    env: dict[str, Any] = {
        "captured_utc": _utc_now(),
        "stc_version": stc.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "threads": {**(threads.to_dict() if threads else {"threads": torch.get_num_threads(),
                                                          "interop_threads": torch.get_num_interop_threads(),
                                                          "affinity_cpus": affinity_cpus()}),
                    "variables": _variables(THREAD_VARIABLES)},
        "allocator": {**(allocator.to_dict() if allocator else {"applied": False, "reason": "no run: stc-bench sets "
                                                                "the allocator when a CPU run starts"}),
                      "variables": allocator_variables()},
        "cpu_frequency": cpu_frequency(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        **_torch_flags(),
        "environment_variables": _recorded_variables(),
    }
    if device is not None:
        env["device"] = device.label
        env["device_name"] = device.name
        if device.is_cuda:
            props = torch.cuda.get_device_properties(device.torch_device)
            env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["cudnn"] = torch.backends.cudnn.version()
            env["cuda_driver_version"] = _driver_cuda_version()
            env["gpu_uuid"] = _torch_gpu_uuid(device)
            env.update(_static_gpu_facts(device))
            env["gpu_state_before"] = gpu_state(device)
        if device.peers:  # --device-map auto: the other GPUs the LLM is placed on (run.placement says what each holds)
            env["peer_devices"] = [{"device": str(peer), "device_name": torch.cuda.get_device_name(peer),
                                    "gpu_memory_gb": round(torch.cuda.get_device_properties(peer).total_memory / 2**30, 1)}
                                   for peer in device.peers]
    return env


def environment_rows(block: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """The environment block as (dotted key, text) rows, nested blocks flattened
    (``gpu_state_before.sm_clock_mhz``): how ``stc-bench env`` and report.md show it."""
    for key, value in block.items():
        if isinstance(value, dict) and value:
            yield from environment_rows(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", str(value)
