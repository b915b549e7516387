"""Reports of a run: CSV tables, Markdown, PNG plots and the terminal table.

Every file is written through a temp file and a rename, so a full disk or a crash leaves each
file as it was or whole, never torn.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from stc_bench.results import RunResult, write_atomically


def write_report(result: RunResult, folder: Path, plots: bool = True, results: bool = True) -> list[Path]:
    """Write results.json (unless ``results`` is False: re-rendering never rewrites a results
    file), samples.csv, summary.csv, reductions.csv, the PNGs and report.md into ``folder``;
    returns the paths written."""
    from stc_bench.report.markdown import render_markdown
    from stc_bench.report.plots import (
        plot_fidelity_vs_ratio,
        plot_latency,
        plot_latency_vs_frames,
        plot_pareto,
        plot_per_frame_vit,
        plot_reduction_vs_knob,
        plot_throughput_vs_streams,
        swept_knobs,
    )
    from stc_bench.report.tables import reduction_table, samples_table, summary_table

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if results:
        written.append(folder / "results.json")
        result.save(written[0])
    for name, table in (("samples.csv", samples_table), ("summary.csv", summary_table), ("reductions.csv", reduction_table)):
        frame = table(result)
        written.append(write_atomically(folder / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False)))
    images = []

    def plot(draw: Callable[..., Path | None], name: str, *args) -> None:
        path = write_atomically(folder / name, lambda tmp: draw(result, *args, tmp) is not None)  # None: nothing to draw
        if path is not None:
            images.append(path)

    if plots and result.measurements:
        plot(plot_latency, "latency.png")
        plot(plot_per_frame_vit, "per_frame_vit.png")
        knobs = swept_knobs(result)
        for knob in knobs:
            plot(plot_reduction_vs_knob, f"reduction_vs_{knob}.png", knob)
        if "frames" in knobs:
            plot(plot_latency_vs_frames, "latency_vs_frames.png")
        if "ratio" in knobs:
            plot(plot_fidelity_vs_ratio, "fidelity_vs_ratio.png")
        if len(result.compared) > 1:  # one arm is a single point: the tables say it all
            plot(plot_pareto, "pareto.png")
        if len(result.stream_counts) > 1:
            plot(plot_throughput_vs_streams, "throughput_vs_streams.png")
    written += images
    markdown = render_markdown(result, [p.name for p in images])
    written.append(write_atomically(folder / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8")))
    return written
