"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stc_bench.results import RunResult  # noqa: E402

KIND_COLOURS = {"refresh": "tab:orange", "selective": "tab:green", "mixed": "tab:olive", "full": "tab:blue"}


def plot_latency(result: RunResult, path: Path) -> Path:
    """Per stage, the raw samples of the baseline and each +STC point as box plots, per frame count."""
    stages = result.stages
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 4.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        data, labels, colours = [], [], []
        for frames in result.config.frames:
            base = result.baseline(frames, stage)
            if base is None:
                continue
            data.append(base.times_ms); labels.append(f"{frames}f\nbaseline"); colours.append("tab:blue")
            for p in (p for p in result.points if p.frames == frames):
                m = result.stc(frames, p.point, stage)
                data.append(m.times_ms); labels.append(f"{frames}f\n+STC {p.point.label}"); colours.append("tab:green")
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, colour in zip(box["boxes"], colours):
            patch.set_facecolor(colour); patch.set_alpha(0.45)
        for i, samples in enumerate(data, start=1):
            ax.scatter(np.full(len(samples), i) + np.linspace(-0.12, 0.12, len(samples)), samples, s=6, color="black", alpha=0.5)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=0 if len(labels) <= 4 else 45)
        ax.set_title(f"{stage}: total per stream")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{result.config.framework} ({result.run['scale']}, {result.environment.get('device')}): "
                 "latency per repeat, baseline vs +STC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_frame_vit(result: RunResult, path: Path) -> Path | None:
    """ViT latency of each chunk (median over repeats) at the largest frame count: the baseline
    as a line, +STC as points coloured by what the cacher did (refresh / selective)."""
    frames = max(result.config.frames)
    base = result.baseline(frames, "vit")
    points = [p for p in result.points if p.frames == frames]
    if base is None or not points or not base.chunk_ms:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(base.chunk_ms[0]))
    ax.plot(x, np.median(np.asarray(base.chunk_ms), axis=0), color="tab:blue", marker="o", ms=3, label="baseline")
    for p in points[:4]:
        m = result.stc(frames, p.point, "vit")
        med = np.median(np.asarray(m.chunk_ms), axis=0)
        ax.plot(x, med, color="tab:green", alpha=0.4, lw=1)
        for kind in sorted(set(p.chunk_kinds)):
            idx = [i for i, k in enumerate(p.chunk_kinds) if k == kind]
            ax.scatter(idx, med[idx], color=KIND_COLOURS.get(kind, "grey"), s=22, zorder=3, label=f"+STC {p.point.label}: {kind}")
    ax.set_xticks(x)
    ax.set_xlabel(f"chunk ({result.config.chunk_frames} frame(s) each)")
    ax.set_ylabel("ViT ms (median over repeats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-chunk ViT latency, {frames} frames", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
