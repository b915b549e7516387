"""Fixtures for stc-bench tests: a CliRunner with stable output, and one tiny run shared by tests."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

TINY_RUN = ["rekv", "--scale", "tiny", "--frames", "4", "--repeats", "3", "--warmup", "1"]


@pytest.fixture
def cli(monkeypatch):
    """Invoke ``stc-bench`` in-process; exceptions propagate (catch_exceptions=False)."""
    from stc_bench.cli import app

    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_result():
    """A finished tiny ReKV run (4 frames, 3 repeats), measured once for the whole session."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import run_benchmark

    return run_benchmark(BenchConfig(scale="tiny", device="cpu", frames=(4,), repeats=3, warmup=1))
