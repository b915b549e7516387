"""Environment capture: what machine and software produced a result."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path
from typing import Any

from stc_bench.device import Device, cpu_model


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


def capture_environment(device: Device | None = None) -> dict[str, Any]:
    """Versions, device, threads and git commit, as a JSON-safe dict."""
    import torch
    import transformers

    import stc

    env: dict[str, Any] = {
        "captured_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stc_version": stc.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
    }
    if device is not None:
        env["device"] = device.label
        env["device_name"] = device.name
        if device.is_cuda:
            props = torch.cuda.get_device_properties(device.torch_device)
            env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            env["gpu_capability"] = f"{props.major}.{props.minor}"
            env["cudnn"] = torch.backends.cudnn.version()
    return env
