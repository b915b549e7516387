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
    ax.set_xlabel(f"streaming step ({result.run.get('chunk_frames')} frame(s) each)")
    ax.set_ylabel("ViT ms (median over repeats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-chunk ViT latency, {frames} frames", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


KNOBS = {"ratio": "update ratio", "interval": "cache interval", "tokens_per_frame": "tokens per frame", "frames": "frames"}


def _knob_value(point, knob: str):
    return point.frames if knob == "frames" else getattr(point.point, knob)


def swept_knobs(result: RunResult) -> list[str]:
    """Knobs that take more than one value across the run's points."""
    return [k for k in KNOBS if len({_knob_value(p, k) for p in result.points}) > 1]


def _curves(result: RunResult, knob: str) -> dict[str, list]:
    """Points grouped by the values of every other swept knob, each group sorted along ``knob``."""
    others = [k for k in swept_knobs(result) if k != knob]
    groups: dict[str, list] = {}
    for p in result.points:
        label = ", ".join(f"{k.replace('tokens_per_frame', 'k')}={_knob_value(p, k):g}" for k in others) or "all"
        groups.setdefault(label, []).append(p)
    return {label: sorted(ps, key=lambda p: _knob_value(p, knob)) for label, ps in groups.items()}


def _legend_below(fig, ax) -> None:
    """One legend for the whole figure, under the subplots, so it never hides data."""
    handles, labels = ax.get_legend_handles_labels()
    rows = -(-len(labels) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))


def plot_reduction_vs_knob(result: RunResult, knob: str, path: Path) -> Path:
    """Measured median reduction (95% interval bars) against ``knob``, per stage, with the FLOP
    limit of the same settings dashed in the same colour; one curve per other-knob setting."""
    stages = result.stages
    fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for i, (label, points) in enumerate(_curves(result, knob).items()):
            colour = f"C{i}"
            xs, ys, lo, hi, flop = [], [], [], [], []
            for p in points:
                r = result.reduction(p, stage)
                if r is None:
                    continue
                xs.append(_knob_value(p, knob)); ys.append(100 * r.on_median)
                lo.append(100 * (r.on_median - r.ci_low)); hi.append(100 * (r.ci_high - r.on_median))
                flop.append(None if p.flop_reduction(stage) is None else 100 * p.flop_reduction(stage))
            ax.errorbar(xs, ys, yerr=[lo, hi], color=colour, marker="o", capsize=3, label=f"measured ({label})")
            if any(f is not None for f in flop):
                ax.plot(xs, flop, color=colour, ls="--", alpha=0.7, label=f"FLOP limit ({label})")
        ax.axhline(0, color="black", lw=0.8)
        if knob != "ratio":  # whole-number knobs: ticks at the swept values only
            ax.set_xticks(sorted({_knob_value(p, knob) for p in result.points}))
        ax.set_xlabel(KNOBS[knob])
        ax.set_ylabel("reduction vs baseline, %")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.config.framework} ({result.run['scale']}, {result.environment.get('device')}): "
                 f"reduction vs {KNOBS[knob]}", fontsize=10)
    _legend_below(fig, axes[0][0])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_vs_frames(result: RunResult, path: Path) -> Path:
    """Median latency per stage against the frame count, baseline and each +STC point."""
    stages = result.stages
    frames = sorted(set(result.config.frames))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages), 4), squeeze=False)
    labels = sorted({p.point for p in result.points}, key=lambda q: (q.ratio, q.interval, q.tokens_per_frame))
    for ax, stage in zip(axes[0], stages):
        base = [result.baseline(f, stage) for f in frames]
        ax.plot([f for f, m in zip(frames, base) if m], [m.median for m in base if m], marker="o", color="black", label="baseline")
        for i, q in enumerate(labels):
            ms = [result.stc(f, q, stage) for f in frames]
            ax.plot([f for f, m in zip(frames, ms) if m], [m.median for m in ms if m], marker="o", color=f"C{i}",
                    label=f"+STC {q.label}")
        ax.set_xlabel("frames")
        ax.set_ylabel("median ms per stream")
        ax.set_title(stage)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.config.framework}: median latency vs frames", fontsize=10)
    _legend_below(fig, axes[0][0])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fidelity_vs_ratio(result: RunResult, path: Path) -> Path:
    """The speed/fidelity trade-off: ViT feature cosine and query KL against the update ratio,
    one curve per other-knob setting."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for i, (label, points) in enumerate(_curves(result, "ratio").items()):
        xs = [p.point.ratio for p in points]
        left.plot(xs, [p.fidelity.get("vit_cosine_mean") for p in points], marker="o", color=f"C{i}", label=label)
        right.plot(xs, [p.fidelity.get("logits_kl_mean") for p in points], marker="o", color=f"C{i}", label=label)
    left.set_ylabel("ViT feature cosine vs baseline (mean over frames)")
    right.set_ylabel("query-logit KL vs baseline, nats")
    for ax in (left, right):
        ax.set_xlabel("update ratio")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    weights = "random weights" if result.run["weights"] == "random" else "checkpoint weights"
    fig.suptitle(f"Fidelity vs update ratio ({weights})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
