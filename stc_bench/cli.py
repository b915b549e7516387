"""``stc-bench``: measure what STC saves on streaming VideoLLMs, on this machine.

Commands are thin: they build a ``BenchConfig`` and hand it to the runner. Nothing heavy is
imported at module import time, so ``stc-bench --help`` is instant.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from stc_bench.config import DTYPES, METRICS, SCALES, SELECTIONS, BenchConfig

app = typer.Typer(
    name="stc-bench",
    help="Measure how much STC (Streaming Token Compression) cuts ViT-encoding and LLM pre-fill latency "
         "of streaming VideoLLMs against the baseline, on this machine's GPU or CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)  # plain output: wide enough for one-line rows
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


FramesOpt = Annotated[list[str], typer.Option("--frames", "-f", help="Frames per stream; repeat or comma-separate for several frame counts (e.g. -f 16 -f 32).", metavar="N[,N...]")]
ScaleOpt = Annotated[str, typer.Option(help=f"Model size: {', '.join(SCALES)}. auto = full (the exact architecture) on CUDA, small (same token counts, narrow towers) on CPU; tiny is for tests.")]
RepeatsOpt = Annotated[int, typer.Option(help="Timed streams per arm and frame count.")]
WarmupOpt = Annotated[int, typer.Option(help="Untimed streams per arm before timing.")]
RatioOpt = Annotated[float, typer.Option(help="STC-Cacher: fraction of tokens recomputed on selective frames, in (0, 1].")]
IntervalOpt = Annotated[int, typer.Option(help="STC-Cacher: a full refresh frame every N frames (N >= 1).")]
TokensOpt = Annotated[int, typer.Option("--tokens-per-frame", help="STC-Pruner: visual tokens kept per frame before pre-fill (the baseline keeps all).")]
ChunkOpt = Annotated[int, typer.Option(help="Frames per streaming step (ViT call + pre-fill call); STC streams 1.")]
MetricOpt = Annotated[str, typer.Option(help=f"STC-Cacher token-change metric: {', '.join(METRICS)}.")]
SelectionOpt = Annotated[str, typer.Option(help=f"STC-Cacher: {', '.join(SELECTIONS)} (shared = the first layer picks the tokens for all).")]
GraphOpt = Annotated[bool, typer.Option("--cuda-graph/--no-cuda-graph", help="Replay selective ViT layers from CUDA graphs (GPU only).")]
DtypeOpt = Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}. auto = float16 on CUDA, float32 on CPU.")]
GpuOpt = Annotated[Optional[int], typer.Option(help="Run on CUDA device N (same as --device cuda:N).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto = cuda:0 when CUDA is available, else cpu.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random weights and the synthetic clip.")]
VideoOpt = Annotated[Optional[str], typer.Option(help="Video file to stream (decoded with PyAV) instead of the built-in synthetic clip.")]
FpsOpt = Annotated[float, typer.Option(help="Sampling rate for --video, frames per second (STC's protocol: 0.5).")]
CheckpointOpt = Annotated[Optional[str], typer.Option(help="Local HF checkpoint folder (safetensors) to load instead of random weights; read offline.")]
OutOpt = Annotated[Path, typer.Option(help="Output root; each run writes a folder <UTC time>_<framework>_<device> inside.")]


def _framework_command(framework: str):
    def command(
        frames: FramesOpt = ["16"],  # noqa: B006 - typer reads the default, it is never mutated
        scale: ScaleOpt = "auto",
        repeats: RepeatsOpt = 20,
        warmup: WarmupOpt = 5,
        ratio: RatioOpt = 0.25,
        interval: IntervalOpt = 2,
        tokens_per_frame: TokensOpt = 64,
        chunk_frames: ChunkOpt = 1,
        metric: MetricOpt = "cosine",
        selection: SelectionOpt = "shared",
        cuda_graph: GraphOpt = False,
        dtype: DtypeOpt = "auto",
        gpu: GpuOpt = None,
        device: DeviceOpt = "auto",
        seed: SeedOpt = 0,
        video: VideoOpt = None,
        fps: FpsOpt = 0.5,
        checkpoint: CheckpointOpt = None,
        out: OutOpt = Path("reports"),
    ) -> None:
        if gpu is not None:
            if gpu < 0:
                raise fail(f"--gpu {gpu}: must be a GPU index >= 0")
            device = f"cuda:{gpu}"
        try:
            config = BenchConfig(
                framework=framework, scale=scale, device=device, dtype=dtype,
                frames=parse_list(frames, int, "--frames"), repeats=repeats, warmup=warmup,
                ratios=(ratio,), intervals=(interval,), tokens_per_frame=(tokens_per_frame,),
                chunk_frames=chunk_frames, metric=metric, selection=selection, cuda_graph=cuda_graph,
                seed=seed, video=video, fps=fps, checkpoint=checkpoint, out=str(out),
            )
        except ValueError as err:
            raise fail(str(err)) from None
        run_and_report(config)

    command.__doc__ = f"Benchmark {framework}: baseline vs +STC, interleaved, with a report folder."
    return command


def run_and_report(config: BenchConfig) -> Path:
    """Run ``config`` with a progress bar, write the run folder as results arrive, print the table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from stc_bench.device import resolve_device
    from stc_bench.errors import BenchUsageError
    from stc_bench.report import write_report
    from stc_bench.report.terminal import render_tables
    from stc_bench.runner import BenchmarkInterrupted, run_benchmark

    _setup_logging()
    try:
        device = resolve_device(config.device)
    except BenchUsageError as err:
        raise fail(str(err)) from None
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(config.out) / f"{stamp}_{config.framework}_{device.label}"
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except OSError as err:
        raise fail(f"--out {config.out}: cannot create {folder} ({err.strerror}); pass a writable --out") from None

    def save_partial(result) -> None:
        result.save(folder / "results.json")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        try:
            result = run_benchmark(config, progress=progress, on_point=save_partial)
        except BenchUsageError as err:
            _remove_if_empty(folder)
            raise fail(str(err)) from None
        except BenchmarkInterrupted as stop:
            bar.stop()
            written = write_report(stop.result, folder)
            render_tables(stop.result, console)
            raise fail(f"{stop}; what was measured before is in {written[-1].parent}", RUN_FAILED) from None
    write_report(result, folder)
    render_tables(result, console)
    console.print(f"report: {folder / 'report.md'}", highlight=False)
    return folder


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


app.command("rekv", help="ReKV on LLaVA-OneVision-7B: SigLIP ViT encoding, projector/pooling/pruner, and "
                         "visual-token pre-fill into a KV cache, baseline vs +STC (cacher + pruner).")(_framework_command("rekv"))


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
    """Print the environment block that every result records (versions, device, threads, commit)."""
    from rich.table import Table

    from stc_bench.device import resolve_device
    from stc_bench.env import capture_environment

    table = Table(show_header=False, box=None)
    for key, value in capture_environment(resolve_device("auto")).items():
        table.add_row(key, str(value))
    console.print(table)


@app.command("list")
def list_command() -> None:
    """List the frameworks and their presets (scales)."""
    from rich.table import Table

    from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework

    table = Table("framework", "STC", "preset", "architecture")
    for name in FRAMEWORK_MODULES:
        spec = get_framework(name)
        for i, preset in enumerate(spec.presets.values()):
            table.add_row(name if i == 0 else "", spec.stc_components if i == 0 else "", preset.name, preset.summary)
    console.print(table)


if __name__ == "__main__":
    app()
