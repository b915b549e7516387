"""Fixtures for stc-bench tests: a CliRunner with stable output, one tiny run shared by tests,
and the toy framework (tests/stc_bench/toy_framework.py) registered for a test."""

from __future__ import annotations

import functools

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

TINY_RUN = ["rekv", "--scale", "tiny", "--frames", "4", "--repeats", "3", "--warmup", "1"]

TOY_MODULE = "tests.stc_bench.toy_framework"
TOY = ["sweep", "toy", "--ratio", "0.25", "--scale", "tiny", "--repeats", "3", "--warmup", "1", "--video", "synthetic"]
"""TINY_RUN's settings, without --frames, on the toy framework (the ``toy`` fixture registers it).
The framework commands are made from the registry when the CLI is imported, so the toy is reached
through ``sweep toy``: the same run as a framework command's, given one --ratio (sweep's default
is three)."""
TOY_RUN = [*TOY, "--frames", "4"]


_click_command = functools.cache(typer.main.get_command)
"""The click command of a Typer app, built once: typer's CliRunner builds it afresh on every invoke
(about 5 ms, half of what a usage-error case costs), and stc-bench's commands are fixed at import.
The ``cli`` fixture puts it in place of typer.testing's ``_get_command``; should typer rename that,
monkeypatch fails every CLI test at once instead of going slow unnoticed."""


@pytest.fixture
def cli(monkeypatch):
    """Invoke ``stc-bench`` in-process; exceptions propagate (catch_exceptions=False)."""
    from stc_bench.cli import app

    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr(typer.testing, "_get_command", _click_command)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def toy(monkeypatch) -> str:
    """The toy framework, registered as ``toy`` for one test (its runs, resumes and the loading of its
    results files need it); returns its name. Only for the test: the registry's own tests and
    ``stc-bench list`` see the real frameworks alone. The module is imported by name, as the tests
    import each other: from the repository root, which ``python -m pytest`` puts on sys.path."""
    from stc_bench.frameworks import FRAMEWORK_HELP, FRAMEWORK_MODULES

    monkeypatch.setitem(FRAMEWORK_MODULES, "toy", TOY_MODULE)
    monkeypatch.setitem(FRAMEWORK_HELP, "toy", "the toy framework of the tests")
    return "toy"


@pytest.fixture
def no_plots(monkeypatch) -> None:
    """Run folders written without their PNGs (tables and report.md as ever), for tests of what runs
    and resumes measure and keep that write several reports: drawing the plots would be most of
    their time, and the tests of reports and sweeps check the plots."""
    import stc_bench.report

    monkeypatch.setattr(stc_bench.report, "write_report", functools.partial(stc_bench.report.write_report, plots=False))


@pytest.fixture(scope="session")
def tiny_result():
    """A finished tiny ReKV run (4 frames, 3 repeats), measured once for the whole session."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import run_benchmark

    return run_benchmark(BenchConfig(scale="tiny", device="cpu", frames=(4,), repeats=3, warmup=1))
