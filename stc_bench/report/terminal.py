"""The rich table printed at the end of a run (plain text when stdout is not a terminal)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from stc_bench.report.tables import COMPARISON_HEADERS, comparison_rows, fidelity_line, memory_line, sweep_headers, sweep_rows
from stc_bench.results import RunResult


def header_lines(result: RunResult) -> list[str]:
    """What was run, in a few lines: framework, scale and why, device, weights, clip."""
    c, run, env = result.config, result.run, result.environment
    weights = "random weights" if run["weights"] == "random" else f"checkpoint {c.checkpoint}"
    chunk = run.get("chunk_frames") or "default"  # None when the build failed before the protocol was known
    return [
        f"{c.framework} | scale {run['scale']} ({run['scale_reason']})",
        f"device {env.get('device')} ({env.get('device_name')}) | {run['dtype']} | {weights} | video: {run['video']}",
        f"{c.repeats} repeats after {c.warmup} warm-up, arms interleaved | {chunk} frame(s) per step | "
        f"cacher {c.metric}/{c.selection}{' + CUDA graphs' if c.cuda_graph else ''}",
    ]


def render_tables(result: RunResult, console: Console) -> None:
    """Print one table per point: per stage, baseline vs +STC, reductions, FLOP limit, tokens."""
    for line in header_lines(result):
        console.print(line, highlight=False)
    if len(result.points) > 1:  # a sweep: one line per point (per-point detail is in summary.csv)
        table = Table(title=f"{len(result.points)} points, reductions = 1 - STC / baseline on medians", title_justify="left")
        for i, col in enumerate(sweep_headers(result)):
            table.add_column(col, justify="right", no_wrap=True)
        for row in sweep_rows(result):
            table.add_row(*row)
        console.print(table)
        console.print("fidelity: " + ("random weights" if result.run["weights"] == "random" else "checkpoint weights"))
    for p in result.points if len(result.points) == 1 else ():
        table = Table(title=f"{p.frames} frames, +STC {p.point.label}", title_justify="left")
        for i, col in enumerate(COMPARISON_HEADERS):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in comparison_rows(result, p):
            table.add_row(*row)
        console.print(table)
        console.print(fidelity_line(result, p), highlight=False)
        if memory_line(result, p):
            console.print(memory_line(result, p), highlight=False)
    for err in result.errors:
        console.print(f"[red]error:[/] {err}")
