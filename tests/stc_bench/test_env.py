"""The environment block: torch's switches and CUDA variables on any machine; on a GPU, nvidia-smi
facts and snapshots, here driven on CPU through the same code path with a faked GPU (torch's
device properties) and a faked nvidia-smi (the function that runs it, or a script on PATH)."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import pytest
import torch

from stc_bench import env
from stc_bench.device import Device

TORCH_UUID = "8d5a1c2e-0b1f-4c3d-9e8f-0123456789ab"
GPU_UUID = f"GPU-{TORCH_UUID}"
OTHER_UUID = "GPU-11111111-2222-3333-4444-555555555555"

STATIC_ROW = "00000000:1B:00.0, 550.54.15, Enabled, [N/A], 1980, 2619, 700.00"
STATE_ROW = f"{GPU_UUID}, 1755, 2619, 41, 118.52, P0, 3, 1024"
APPS = f"{GPU_UUID}, 4242, 1000, /usr/bin/python3\n{OTHER_UUID}, 77, 500, other\n{GPU_UUID}, {os.getpid()}, [N/A], stc-bench, a, b\n"


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda:1 on this CPU-only machine: torch answers for it as for an H100 whose UUID is TORCH_UUID."""
    props = SimpleNamespace(total_memory=80 * 2**30, major=9, minor=0, uuid=TORCH_UUID)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    for name in env.RECORDED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return SimpleNamespace(device=Device(torch.device("cuda", 1)), props=props)


class FakeSmi:
    """Stands in for ``env._run_nvidia_smi``: answers by query kind, refuses some ``-i`` names, records calls."""

    def __init__(self, static=STATIC_ROW, state=STATE_ROW, apps=APPS, refuse=()):
        self.answers = {"static": static, "state": state, "apps": apps}
        self.refuse, self.calls = set(refuse), []

    def __call__(self, args):
        self.calls.append(args)
        if "-i" in args and args[args.index("-i") + 1] in self.refuse:
            raise env.NvidiaSmiRefused("nvidia-smi exited with 6: No devices were found")
        kind = "apps" if args[0].startswith("--query-compute-apps") else "static" if "driver_version" in args[0] else "state"
        answer = self.answers[kind]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def selectors(self):
        return [args[args.index("-i") + 1] for args in self.calls if "-i" in args]


def install_script(tmp_path, monkeypatch, body: str) -> None:
    """Put an executable ``nvidia-smi`` shell script with ``body`` first on PATH (the real subprocess path)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_cpu_environment_records_switches_and_variables_but_no_gpu(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    cpu = Device(torch.device("cpu"))
    block = env.capture_environment(cpu)
    assert {"device", "device_name", "torch", "transformers", "cuda_version", "git_commit"} <= set(block)
    assert block["environment_variables"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                              "CUDA_VISIBLE_DEVICES": None, "CUDA_DEVICE_ORDER": None}
    assert block["cudnn_benchmark"] is True
    assert block["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert block["tf32_matmul"] is torch.backends.cuda.matmul.allow_tf32
    assert set(block["sdpa_backends"]) <= set(env.SDPA_BACKENDS) and "math" in block["sdpa_backends"]
    assert "gpu_state_before" not in block and "driver_version" not in block
    assert env.gpu_state(cpu) is None
    json.dumps(block)


def test_gpu_environment_parses_nvidia_smi(fake_gpu, monkeypatch):
    smi = FakeSmi()
    monkeypatch.setattr(env, "_run_nvidia_smi", smi)
    block = env.capture_environment(fake_gpu.device)
    assert block["device"] == "cuda1" and block["device_name"] == "NVIDIA H100 80GB HBM3"
    assert block["gpu_uuid"] == GPU_UUID and block["gpu_memory_gb"] == 80.0 and block["cudnn"] == 90100
    assert block["driver_version"] == "550.54.15" and block["gpu_pci_bus_id"] == "00000000:1B:00.0"
    assert block["gpu_persistence_mode"] == "Enabled" and block["gpu_mig_mode"] is None  # [N/A]
    assert (block["gpu_sm_clock_max_mhz"], block["gpu_memory_clock_max_mhz"], block["gpu_power_limit_w"]) == (1980, 2619, 700.0)
    assert block["nvidia_smi"] == {"available": True, "selected_by": f"uuid from torch {GPU_UUID}"}
    state = block["gpu_state_before"]
    assert state["available"] is True and state["gpu_uuid"] == GPU_UUID
    assert (state["sm_clock_mhz"], state["memory_clock_mhz"], state["temperature_c"]) == (1755, 2619, 41)
    assert (state["power_draw_w"], state["performance_state"], state["utilization_pct"], state["memory_used_mib"]) == \
        (118.52, "P0", 3, 1024)
    # only this GPU's processes; a name with commas stays whole; this process is marked
    assert state["compute_processes"] == [
        {"pid": 4242, "process_name": "/usr/bin/python3", "used_memory_mib": 1000, "is_this_process": False},
        {"pid": os.getpid(), "process_name": "stc-bench, a, b", "used_memory_mib": None, "is_this_process": True},
    ]
    assert state["other_process_count"] == 1
    assert set(smi.selectors()) == {GPU_UUID}  # the physical GPU, whatever CUDA_VISIBLE_DEVICES says
    json.dumps(block)


@pytest.mark.parametrize("visible, order, expected, warns", [
    ("3,5", "PCI_BUS_ID", "5", False),            # cuda:1 is the second visible GPU
    ("3,5", None, "5", True),                     # CUDA's default order is not nvidia-smi's
    (None, None, "1", True),                      # nothing hidden: torch's index
    ("GPU-aaaa,GPU-bbbb", None, "GPU-bbbb", False),
])
def test_without_a_torch_uuid_the_gpu_is_mapped_through_cuda_visible_devices(fake_gpu, monkeypatch, visible, order, expected, warns):
    del fake_gpu.props.uuid
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if order is not None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    smi = FakeSmi()
    monkeypatch.setattr(env, "_run_nvidia_smi", smi)
    state = env.gpu_state(fake_gpu.device)
    assert state["available"] is True and smi.selectors() == [expected]
    assert ("warning" in state) is warns and (not warns or "CUDA_DEVICE_ORDER=PCI_BUS_ID" in state["warning"])


def test_a_uuid_nvidia_smi_does_not_know_falls_back_to_cuda_visible_devices(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    smi = FakeSmi(refuse={GPU_UUID})  # e.g. torch gives a MIG slice's UUID
    monkeypatch.setattr(env, "_run_nvidia_smi", smi)
    state = env.gpu_state(fake_gpu.device)
    assert state["available"] is True and state["selected_by"] == "CUDA_VISIBLE_DEVICES entry 1 2"
    assert smi.selectors() == [GPU_UUID, "2"]


def test_when_no_name_works_the_reasons_are_recorded(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    monkeypatch.setattr(env, "_run_nvidia_smi", FakeSmi(refuse={GPU_UUID, "2"}))
    block = env.capture_environment(fake_gpu.device)
    reason = block["nvidia_smi"]["reason"]
    assert block["nvidia_smi"]["available"] is False and block["driver_version"] is None
    assert f"uuid from torch {GPU_UUID}: nvidia-smi exited with 6" in reason and "CUDA_VISIBLE_DEVICES entry 1 2:" in reason
    assert block["gpu_state_before"]["available"] is False


@pytest.mark.parametrize("answer, reason", [
    ("hello world", "unexpected nvidia-smi output: 'hello world'"),
    ("", "nvidia-smi answered nothing"),
    (STATE_ROW + "\n" + STATE_ROW, "unexpected nvidia-smi output"),
    (STATE_ROW.replace("1755", "fast"), "unexpected nvidia-smi value for clocks.sm: 'fast'"),
])
def test_garbage_output_is_recorded_not_raised(fake_gpu, monkeypatch, answer, reason):
    monkeypatch.setattr(env, "_run_nvidia_smi", FakeSmi(state=answer))
    state = env.gpu_state(fake_gpu.device)
    assert state["available"] is False and reason in state["reason"]


def test_a_failing_process_query_keeps_the_rest_of_the_snapshot(fake_gpu, monkeypatch):
    monkeypatch.setattr(env, "_run_nvidia_smi", FakeSmi(apps="4242 python"))
    state = env.gpu_state(fake_gpu.device)
    assert state["available"] is True and state["sm_clock_mhz"] == 1755
    assert state["compute_processes"] is None and "unexpected nvidia-smi output" in state["compute_processes_reason"]


def test_torch_errors_are_recorded_not_raised(fake_gpu, monkeypatch):
    def broken(device=None):
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    state = env.gpu_state(fake_gpu.device)
    assert state == {"available": False, "reason": "RuntimeError: CUDA error: unknown error", "captured_utc": state["captured_utc"]}


def test_missing_nvidia_smi(fake_gpu, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi anywhere
    block = env.capture_environment(fake_gpu.device)
    assert block["nvidia_smi"] == {"available": False, "reason": "nvidia-smi not found"}
    assert block["gpu_state_before"]["reason"] == "nvidia-smi not found"
    assert block["gpu_uuid"] == GPU_UUID  # torch still knows it


def test_a_real_script_is_parsed(fake_gpu, tmp_path, monkeypatch):
    install_script(tmp_path, monkeypatch, f"""case "$1" in
  --query-compute-apps*) printf '%s\\n' '{GPU_UUID}, 4242, 1000, python3' ;;
  *driver_version*) echo '{STATIC_ROW}' ;;
  *) echo '{STATE_ROW}' ;;
esac""")
    block = env.capture_environment(fake_gpu.device)
    assert block["driver_version"] == "550.54.15" and block["gpu_state_before"]["temperature_c"] == 41
    assert block["gpu_state_before"]["compute_processes"][0]["pid"] == 4242


def test_a_failing_nvidia_smi_is_recorded_with_its_message(fake_gpu, tmp_path, monkeypatch):
    install_script(tmp_path, monkeypatch, "echo 'No devices were found'; exit 6")
    state = env.gpu_state(fake_gpu.device)
    assert state["available"] is False and "nvidia-smi exited with 6: No devices were found" in state["reason"]


def test_a_hanging_nvidia_smi_is_cut_off(fake_gpu, tmp_path, monkeypatch):
    install_script(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(env, "NVIDIA_SMI_TIMEOUT_S", 0.2)
    state = env.gpu_state(fake_gpu.device)
    assert state == {"available": False, "reason": "nvidia-smi did not answer within 0.2 s", "captured_utc": state["captured_utc"]}


def test_driver_cuda_version(fake_gpu, monkeypatch):
    class LibCuda:
        def cuDriverGetVersion(self, pointer):  # noqa: N802 - the CUDA driver API's name
            pointer._obj.value = 12040
            return 0

    monkeypatch.setattr(env, "_run_nvidia_smi", FakeSmi())
    monkeypatch.setattr(env.ctypes, "CDLL", lambda name: LibCuda())
    assert env.capture_environment(fake_gpu.device)["cuda_driver_version"] == "12.4"

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(env.ctypes, "CDLL", no_driver)
    assert env.capture_environment(fake_gpu.device)["cuda_driver_version"] is None
