"""The rich table printed at the end of a run (plain text when stdout is not a terminal)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stc_bench.report.tables import (
    STAGE_HEADERS,
    arm_headers,
    arm_rows,
    fidelity_line,
    host_line,
    host_warnings,
    launch_lines,
    memory_line,
    serving,
    serving_headers,
    serving_rows,
    stage_rows,
)
from stc_bench.results import RunResult


def header_lines(result: RunResult) -> list[str]:
    """What was run, in a few lines: framework, scale and why, device, weights, clip; and which
    shard (``--shard K/N``) it is, or which shards it was merged from."""
    c, run, env = result.config, result.run, result.environment
    weights = "random weights" if run["weights"] == "random" else f"checkpoint {c.checkpoint}"
    chunk = run.get("chunk_frames") or "default"  # None when the build failed before the protocol was known
    shards = run.get("merged_shards") or []
    merged = ([f"merged from {len(shards)} shards ({', '.join(s['shard'] for s in shards)}): each reduction is against "
               "its own shard's baseline"] if shards else [])
    shard = [f"shard {c.shard} of a sharded run: merge every shard's folder with stc-bench merge"] if c.shard else []
    streams = ([f"streams served concurrently: {', '.join(map(str, c.streams))} (each step feeds one chunk of every stream "
                "through one tower call and one batched pre-fill; stream s of S plays the clip from frame s*T/S on, wrapping "
                "around)"]
               if max(c.streams) > 1 else [])
    return [
        f"{c.framework} | scale {run['scale']} ({run['scale_reason']})",
        f"device {env.get('device')} ({env.get('device_name')}) | {run['dtype']} | {weights} | video: {run['video']}",
        f"{c.repeats} repeats after {c.warmup} warm-up, arms interleaved | {chunk} frame(s) per step | "
        f"arms: {', '.join(c.arms)} | cacher {c.metric}/{c.selection}{' + CUDA graphs' if c.cuda_graph else ''}{' + torch.compile' if c.compile else ''}",
    ] + merged + shard + streams


def text_table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    """A terminal table: the label column left, figures right; cells are text, never markup
    (arm labels and paths are the user's)."""
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(headers):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def render_tables(result: RunResult, console: Console) -> None:
    """Print, per frame count, one row per arm (the paper's table shape); where one arm is
    compared with the baseline, also its per-stage detail (with the round-to-round spread of each
    reduction) and fidelity; then memory, page faults per stream, and a warning where the arms'
    page faults differ (``host_warnings``)."""
    for line in header_lines(result):  # holds user text (video and checkpoint paths): printed as it is
        console.print(line, highlight=False, markup=False, emoji=False)
    for frames in result.frame_counts:
        console.print(text_table(f"{frames} frames: reductions = 1 - arm / baseline on medians", arm_headers(result),
                                 arm_rows(result, frames)))
        compared = [a for a in result.compared if a.frames == frames]
        if len(compared) == 1:
            label, streams = compared[0].arm.label, compared[0].streams
            console.print(text_table(f"{frames} frames, {compared[0].name} per stage", STAGE_HEADERS,
                                     stage_rows(result, frames, label, streams)))
            console.print(fidelity_line(result, frames, label, streams), highlight=False, markup=False, emoji=False)
        if serving(result.table()):
            console.print(text_table(f"{frames} frames served concurrently: per-frame latency and throughput",
                                     serving_headers(result), serving_rows(result, frames)))
        for line in (memory_line(result, frames), host_line(result, frames)):
            if line:
                console.print(line, highlight=False, markup=False, emoji=False)
        for warning in host_warnings(result, frames):
            console.print(f"[yellow]warning:[/] {escape(warning)}", emoji=False)
        for line in launch_lines(result, frames):
            console.print(f"[yellow]launches:[/] {frames} frames, {escape(line)}", emoji=False)
    for err in result.errors:  # the CLI prints the run's own error once, on stderr, as "error: ..."
        console.print(f"[red]recorded error:[/] {escape(err)}", emoji=False)
