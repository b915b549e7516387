"""Steady host settings of a run: glibc's malloc thresholds (applied, or not and why), torch's
thread count, the CPU's frequency facts, and the page faults recorded per timed stream."""

from __future__ import annotations

import json

import pytest
import torch

from stc_bench import allocator, device, env
from stc_bench.errors import BenchUsageError


@pytest.fixture
def glibc(monkeypatch):
    """A glibc process with nothing preloaded, whose ``mallopt`` calls are recorded (and refused by name)."""
    calls, refuse = [], set()

    def fake_mallopt(parameter, value):
        calls.append((parameter, value))
        return parameter not in refuse

    monkeypatch.setattr(allocator, "glibc_version", lambda: "2.36")
    monkeypatch.setattr(allocator, "loaded_libraries", lambda: "7f00-7f01 r-xp 0 0 0 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    monkeypatch.setattr(allocator, "mallopt", fake_mallopt)
    return calls, refuse


def test_a_cpu_run_on_glibc_sets_every_threshold_and_records_it(glibc):
    calls, _ = glibc
    settings = allocator.steady_allocator(True, {})
    assert settings.applied and settings.allocator == "glibc 2.36"
    assert calls == [(parameter, value) for _, parameter, value in allocator.MALLOPT_SETTINGS]
    block = settings.to_dict()
    assert block["settings"] == {"M_MMAP_THRESHOLD": 2**30, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 64 * 2**20}
    json.dumps(block)


def test_a_value_glibc_refuses_is_named_and_the_rest_recorded(glibc):
    calls, refuse = glibc
    refuse.add(allocator.M_TOP_PAD)
    settings = allocator.steady_allocator(True, {})
    assert settings.applied and "refused M_TOP_PAD" in settings.reason
    assert "M_TOP_PAD" not in dict(settings.settings) and "M_MMAP_THRESHOLD" in dict(settings.settings)


@pytest.mark.parametrize("variables, reason", [
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "tcmalloc is preloaded"),
    ({"STCBENCH_ALLOCATOR": "system"}, "STCBENCH_ALLOCATOR=system"),
    ({"MALLOC_ARENA_MAX": "2"}, "configured through MALLOC_ARENA_MAX: left as set"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4194304"}, "configured through GLIBC_TUNABLES"),
])
def test_settings_someone_else_chose_are_left_alone(glibc, variables, reason):
    calls, _ = glibc
    settings = allocator.steady_allocator(True, variables)
    assert not settings.applied and reason in settings.reason and calls == []


def test_a_gpu_run_keeps_the_host_allocator(glibc):
    calls, _ = glibc
    settings = allocator.steady_allocator(False, {})
    assert not settings.applied and "GPU run" in settings.reason and calls == []


def test_without_glibc_nothing_is_applied_and_the_run_goes_on(monkeypatch):
    def no_mallopt(*_):
        raise AssertionError("mallopt must not be called without glibc")

    monkeypatch.setattr(allocator, "glibc_version", lambda: None)
    monkeypatch.setattr(allocator, "loaded_libraries", lambda: "")
    monkeypatch.setattr(allocator, "mallopt", no_mallopt)
    settings = allocator.steady_allocator(True, {})
    assert not settings.applied and settings.allocator == "not glibc" and "not glibc" in settings.reason
    assert settings.to_dict()["settings"] == {}


def test_an_allocator_preloaded_without_ld_preload_is_seen_in_the_memory_map():
    assert allocator.preloaded_allocator(None, "7f00 r-xp /opt/lib/libjemalloc.so.2\n") == "jemalloc"
    assert allocator.preloaded_allocator("", "7f00 r-xp /usr/lib/libc.so.6\n") is None


def test_a_bad_allocator_choice_is_a_usage_error_naming_the_choices():
    with pytest.raises(BenchUsageError, match="must be tuned .* or system"):
        allocator.steady_allocator(True, {"STCBENCH_ALLOCATOR": "jemalloc"})


def test_host_usage_counts_the_faults_of_fresh_pages():
    if allocator.host_usage() is None:
        pytest.skip("no getrusage here")
    before = allocator.host_usage()
    buffer = bytearray(16 * 2**20)  # 16 MiB of fresh, zeroed pages: one fault per page touched
    buffer[:: 4096] = b"\x01" * len(buffer[:: 4096])
    spent = allocator.host_usage() - before
    assert spent.minor_faults + spent.major_faults > 1000 and spent.system_ms >= 0


def test_threads_are_pinned_to_the_least_of_the_default_and_the_cpus_allowed(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(device, "affinity_cpus", lambda: 1)
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: None)
    try:
        settings = device.pin_cpu_threads()
        assert settings.threads == 1 == torch.get_num_threads() and settings.torch_default == before
        assert "affinity mask 1" in settings.reason and settings.interop_threads == torch.get_num_interop_threads()
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(device, "affinity_cpus", lambda: 64)
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: 0.5)
    try:
        assert device.pin_cpu_threads().threads == 1  # half a CPU of quota still gets one thread
    finally:
        torch.set_num_threads(before)


def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert device.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert device.cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert device.cgroup_cpu_limit(v1) == 2.0
    assert device.cgroup_cpu_limit(tmp_path / "missing") is None


def test_cpu_frequency_is_recorded_where_readable_and_none_where_not(tmp_path, monkeypatch):
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Xeon\ncpu MHz\t\t: 2600.000\ncpu MHz\t\t: 2600.000\n")
    absent = env.cpu_frequency(tmp_path / "none", cpuinfo)
    assert absent["available"] is False and absent["governors"] is None and absent["current_mhz_max"] is None
    assert absent["cpuinfo_mhz"] == [2600.0] and "container or VM" in absent["reason"]
    for cpu, (governor, khz) in enumerate((("performance", "3000000"), ("powersave", "1200000"))):
        folder = tmp_path / "sys" / f"cpu{cpu}" / "cpufreq"
        folder.mkdir(parents=True)
        (folder / "scaling_governor").write_text(governor + "\n")
        (folder / "scaling_cur_freq").write_text(khz + "\n")
        (folder / "cpuinfo_max_freq").write_text("3500000\n")
    (tmp_path / "sys" / "intel_pstate").mkdir()
    (tmp_path / "sys" / "intel_pstate" / "no_turbo").write_text("1\n")
    block = env.cpu_frequency(tmp_path / "sys", cpuinfo)
    assert block["available"] and block["governors"] == ["performance", "powersave"] and "reason" not in block
    assert (block["current_mhz_min"], block["current_mhz_max"], block["max_mhz"], block["turbo"]) == (1200.0, 3000.0, 3500.0, False)


def test_a_run_records_its_allocator_threads_and_faults_per_stream(tiny_result):
    environment = tiny_result.environment
    block = environment["allocator"]
    assert set(block["variables"]) == set(allocator.ALLOCATOR_VARIABLES) and isinstance(block["reason"], str)
    if allocator.glibc_version() and not any(block["variables"].values()):
        assert block["applied"] and block["settings"]["M_MMAP_THRESHOLD"] == 2**30
    threads = environment["threads"]
    assert threads["threads"] == environment["torch_threads"] == torch.get_num_threads()
    assert threads["interop_threads"] == torch.get_num_interop_threads() and "OMP_NUM_THREADS" in threads["variables"]
    assert "available" in environment["cpu_frequency"]
    for facts in tiny_result.arms:
        assert set(facts.host_usage) == set(allocator.HOST_USAGE_KEYS)
        assert all(len(values) == tiny_result.config.repeats for values in facts.host_usage.values())
        assert len(facts.page_faults) == tiny_result.config.repeats
    assert tiny_result.table().page_faults_median.notna().all()
    rows = dict(env.environment_rows(environment))
    assert "allocator.applied" in rows and "threads.threads" in rows
