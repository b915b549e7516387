"""PNG plots of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stc_bench.report.tables import in_cell, throughput  # noqa: E402
from stc_bench.results import ArmResult, RunResult, arm_name  # noqa: E402

KIND_COLOURS = {"refresh": "tab:orange", "selective": "tab:green", "mixed": "tab:olive", "full": "tab:blue"}
METHOD_COLOURS = {"stc": "tab:green", "tome": "tab:purple", "visionzip": "tab:red", "vidcom2": "tab:brown"}


def plot_latency(result: RunResult, path: Path) -> Path:
    """Per stage, the raw samples of the baseline and every arm as box plots, per frame count."""
    stages = result.stages
    fig, axes = plt.subplots(1, len(stages), figsize=(max(4.2, 1.1 * len(result.arms)) * len(stages) / 1.4, 4.4),
                             squeeze=False)
    for ax, stage in zip(axes[0], stages):
        data, labels, colours = [], [], []
        for facts in result.arms:
            m = result.measurement(facts.frames, facts.arm, stage, facts.shard, facts.streams)
            if m is None:
                continue
            data.append(m.times_ms)
            labels.append(f"{facts.frames}f\n{facts.name}")
            colours.append("tab:blue" if facts.arm.is_baseline else METHOD_COLOURS.get(facts.arm.method, "tab:grey"))
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
                 "latency per repeat, every arm", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_frame_vit(result: RunResult, path: Path) -> Path | None:
    """ViT latency of each chunk (median over repeats) at the largest frame count: the baseline
    as a line, each arm as a line, with STC arms' points coloured by what the cacher did."""
    frames = max(result.frame_counts, default=None)
    compared = [a for a in result.compared if a.frames == frames]
    shard = compared[0].shard if compared else None
    streams = min((a.streams for a in compared), default=1)
    # a merged run: the arms beside one shard's own baseline; a serving run: at its fewest streams
    compared = [a for a in compared if a.shard == shard and a.streams == streams]
    base = result.baseline(frames, "vit", shard, streams) if frames is not None else None
    if base is None or not compared or not base.chunk_ms:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(base.chunk_ms[0]))
    ax.plot(x, np.median(np.asarray(base.chunk_ms), axis=0), color="tab:blue", marker="o", ms=3, label=arm_name("baseline", shard))
    for facts in compared[:6]:
        m = result.measurement(frames, facts.arm, "vit", facts.shard, facts.streams)
        med = np.median(np.asarray(m.chunk_ms), axis=0)
        colour = METHOD_COLOURS.get(facts.arm.method, "tab:grey")
        ax.plot(x[: len(med)], med, color=colour, alpha=0.4, lw=1, label=None if facts.recompute_fraction is not None
                else facts.arm.label)
        if facts.recompute_fraction is None:
            continue
        for kind in sorted(set(facts.chunk_kinds)):
            idx = [i for i, k in enumerate(facts.chunk_kinds) if k == kind]
            ax.scatter(idx, med[idx], color=KIND_COLOURS.get(kind, "grey"), s=22, zorder=3, label=f"{facts.arm.label}: {kind}")
    ax.set_xticks(x)
    ax.set_xlabel(f"streaming step ({result.run.get('chunk_frames')} frame(s) each)")
    ax.set_ylabel("ViT ms (median over repeats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Per-chunk ViT latency, {frames} frames", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


KNOBS = {"ratio": "update ratio", "interval": "cache interval", "tokens_per_frame": "tokens per frame", "frames": "frames"}
"""STC's knobs (and the frame count) that a sweep varies, with their axis labels."""


def _stc_arms(result: RunResult) -> list[ArmResult]:
    return [a for a in result.compared if a.arm.method == "stc"]


def _knob_value(facts: ArmResult, knob: str):
    return facts.frames if knob == "frames" else facts.arm.knob(knob)


def swept_knobs(result: RunResult) -> list[str]:
    """STC knobs (or the frame count) that take more than one value across the run's STC arms."""
    arms = _stc_arms(result)
    return [k for k in KNOBS if len({_knob_value(a, k) for a in arms}) > 1]


def _curves(result: RunResult, knob: str) -> dict[str, list[ArmResult]]:
    """STC arms grouped by the values of every other swept knob, each group sorted along ``knob``."""
    others = [k for k in swept_knobs(result) if k != knob]
    groups: dict[str, list] = {}
    for a in _stc_arms(result):
        label = ", ".join(f"{k.replace('tokens_per_frame', 'k')}={_knob_value(a, k):g}" for k in others) or "all"
        groups.setdefault(label, []).append(a)
    return {label: sorted(arms, key=lambda a: _knob_value(a, knob)) for label, arms in groups.items()}


def _save(fig, path: Path) -> Path:
    """Write the figure to ``path`` as PNG and free it (pyplot keeps every open figure)."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
                limit = result.flop_reduction(p, stage)
                xs.append(_knob_value(p, knob)); ys.append(100 * r.on_median)
                lo.append(100 * (r.on_median - r.ci_low)); hi.append(100 * (r.ci_high - r.on_median))
                flop.append(None if limit is None else 100 * limit)
            ax.errorbar(xs, ys, yerr=[lo, hi], color=colour, marker="o", capsize=3, label=f"measured ({label})")
            if any(f is not None for f in flop):
                ax.plot(xs, flop, color=colour, ls="--", alpha=0.7, label=f"FLOP limit ({label})")
        ax.axhline(0, color="black", lw=0.8)
        if knob != "ratio":  # whole-number knobs: ticks at the swept values only
            ax.set_xticks(sorted({_knob_value(p, knob) for p in _stc_arms(result)}))
        ax.set_xlabel(KNOBS[knob])
        ax.set_ylabel("reduction vs baseline, %")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.config.framework} ({result.run['scale']}, {result.environment.get('device')}): "
                 f"reduction vs {KNOBS[knob]}", fontsize=10)
    _legend_below(fig, axes[0][0])
    return _save(fig, path)


def plot_latency_vs_frames(result: RunResult, path: Path) -> Path:
    """Median latency per stage against the frame count, baseline and each other arm."""
    stages = result.stages
    frames = sorted(set(result.frame_counts))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.4 * len(stages), 4), squeeze=False)
    # a merged run: one baseline line per shard; a serving run: one line per number of streams
    arms = list(dict.fromkeys((a.arm, a.shard, a.streams) for a in result.arms))
    for ax, stage in zip(axes[0], stages):
        for i, (arm, shard, streams) in enumerate(arms):
            ms = [result.measurement(f, arm, stage, shard, streams) for f in frames]
            ax.plot([f for f, m in zip(frames, ms) if m], [m.median for m in ms if m], marker="o",
                    color="black" if arm.is_baseline else f"C{i}", label=arm_name(arm.label, shard, streams))
        ax.set_xlabel("frames")
        ax.set_ylabel("median ms per stream")
        ax.set_title(stage)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result.config.framework}: median latency vs frames", fontsize=10)
    _legend_below(fig, axes[0][0])
    return _save(fig, path)


def plot_fidelity_vs_ratio(result: RunResult, path: Path) -> Path:
    """The speed/fidelity trade-off: ViT feature cosine and query KL against the update ratio,
    one curve per other-knob setting."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for i, (label, points) in enumerate(_curves(result, "ratio").items()):
        xs = [p.arm.knob("ratio") for p in points]
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
    return _save(fig, path)


def plot_pareto(result: RunResult, path: Path) -> Path | None:
    """Latency reduction against fidelity, one labelled point per arm (and frame count): the
    end-to-end reduction of the summed stage medians against the query-logit KL (or, without an
    LLM, 1 - ViT feature cosine). Up and to the left is better. None when nothing is compared."""
    compared = result.compared
    if not compared:
        return None
    table = result.table()
    use_kl = "logits_kl_mean" in table and table.logits_kl_mean.notna().any()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for facts in compared:
        rows = table[(table.frames == facts.frames) & (table.arm == facts.arm.label) & (table.streams == facts.streams)]
        base = table[(table.frames == facts.frames) & (table.method == "baseline") & in_cell(table, facts.shard, facts.streams)]
        total = 1.0 - rows.median_ms.sum() / base.median_ms.sum()
        first = rows.iloc[0]
        x = first.logits_kl_mean if use_kl else 1.0 - first.vit_cosine_mean
        if x is None or x != x:
            continue
        colour = METHOD_COLOURS.get(facts.arm.method, "tab:grey")
        ax.scatter([x], [100 * total], color=colour, s=36, zorder=3)
        label = facts.name if len(result.frame_counts) == 1 else f"{facts.name}, {facts.frames}f"
        ax.annotate(label, (x, 100 * total), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    weights = "random weights" if result.run.get("weights") == "random" else "checkpoint weights"
    ax.set_xlabel(("query-logit KL vs baseline, nats" if use_kl else "1 - ViT feature cosine vs baseline") + f" ({weights})")
    ax.set_ylabel("end-to-end latency reduction vs baseline, %")
    ax.grid(alpha=0.3)
    ax.set_title(f"{result.config.framework} ({result.run['scale']}, {result.environment.get('device')}): "
                 "speed vs fidelity per arm", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_throughput_vs_streams(result: RunResult, path: Path) -> Path | None:
    """Frames per second over all timed stages against the number of concurrent streams, one line
    per arm, at the largest frame count (the serving view of ``--streams``); None with one S."""
    table = result.table()
    frames = max(result.frame_counts, default=None)
    if frames is None or table.streams.nunique() < 2:
        return None
    rows = table[table.frames == frames]
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, ((label, shard), group) in enumerate(rows.groupby(["arm", "shard"], sort=False, dropna=False)):
        points = [(int(s), throughput(g)) for s, g in group.groupby("streams")]
        points = [(s, fps) for s, fps in points if fps is not None]
        method = group.iloc[0].method
        ax.plot([s for s, _ in points], [fps for _, fps in points], marker="o", label=arm_name(label, shard),
                color="black" if method == "baseline" else METHOD_COLOURS.get(method, f"C{i}"))
    ax.set_xlabel("concurrent streams (one chunk of each per step)")
    ax.set_ylabel("frames / s over all timed stages")
    ax.set_xticks(sorted(int(s) for s in rows.streams.unique()))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{result.config.framework} ({result.run['scale']}, {result.environment.get('device')}): "
                 f"throughput vs streams, {frames} frames", fontsize=10)
    _legend_below(fig, ax)
    return _save(fig, path)
