"""Reports of a run: CSV tables, Markdown, PNG plots and the terminal table."""

from __future__ import annotations

from pathlib import Path

from stc_bench.results import RunResult


def write_report(result: RunResult, folder: Path, plots: bool = True) -> list[Path]:
    """Write results.json, samples.csv, summary.csv, reductions.csv, the PNGs and report.md
    into ``folder``; returns the paths written."""
    from stc_bench.report.markdown import render_markdown
    from stc_bench.report.plots import (
        plot_fidelity_vs_ratio,
        plot_latency,
        plot_latency_vs_frames,
        plot_pareto,
        plot_per_frame_vit,
        plot_reduction_vs_knob,
        swept_knobs,
    )
    from stc_bench.report.tables import reduction_table, samples_table, summary_table

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json"]
    result.save(written[0])
    for name, table in (("samples.csv", samples_table), ("summary.csv", summary_table), ("reductions.csv", reduction_table)):
        table(result).to_csv(folder / name, index=False)
        written.append(folder / name)
    images = []
    if plots and result.measurements:
        images.append(plot_latency(result, folder / "latency.png"))
        per_frame = plot_per_frame_vit(result, folder / "per_frame_vit.png")
        if per_frame is not None:
            images.append(per_frame)
        knobs = swept_knobs(result)
        for knob in knobs:
            images.append(plot_reduction_vs_knob(result, knob, folder / f"reduction_vs_{knob}.png"))
        if "frames" in knobs:
            images.append(plot_latency_vs_frames(result, folder / "latency_vs_frames.png"))
        if "ratio" in knobs:
            images.append(plot_fidelity_vs_ratio(result, folder / "fidelity_vs_ratio.png"))
        if len(result.compared) > 1:  # one arm is a single point: the tables say it all
            pareto = plot_pareto(result, folder / "pareto.png")
            if pareto is not None:
                images.append(pareto)
    written += images
    (folder / "report.md").write_text(render_markdown(result, [p.name for p in images]), encoding="utf-8")
    written.append(folder / "report.md")
    return written
