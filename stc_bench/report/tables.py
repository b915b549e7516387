"""Tidy tables derived from a ``RunResult``; the CSV columns are an interface (keep them stable)."""

from __future__ import annotations

import pandas as pd

from stc_bench.measurement import Arm
from stc_bench.results import RunResult

SUMMARY_COLUMNS = ["framework", "scale", "device", "frames", "ratio", "interval", "tokens_per_frame", "stage",
                   "arm", "n", "min_ms", "median_ms", "mean_ms", "iqr_ms", "cv", "tokens"]
REDUCTION_COLUMNS = ["framework", "scale", "device", "frames", "ratio", "interval", "tokens_per_frame", "stage",
                     "reduction_min", "reduction_median", "ci_low", "ci_high", "flop_reduction", "efficiency"]
SAMPLE_COLUMNS = ["framework", "scale", "device", "frames", "ratio", "interval", "tokens_per_frame", "stage",
                  "arm", "repeat", "time_ms"]


def samples_table(result: RunResult) -> pd.DataFrame:
    """One row per raw sample (baseline rows leave the STC knobs empty)."""
    rows = []
    for m in result.measurements:
        s = m.spec
        for i, t in enumerate(m.times_ms):
            rows.append([s.framework, s.scale, s.device, s.frames, s.ratio, s.interval, s.tokens_per_frame,
                         s.stage, s.arm, i, t])
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def summary_table(result: RunResult) -> pd.DataFrame:
    """One row per point, stage and arm; the baseline row of a point is the shared baseline."""
    rows = []
    for p in result.points:
        for stage in result.stages:
            for arm, m in ((Arm.BASELINE.value, result.baseline(p.frames, stage)),
                           (Arm.STC.value, result.stc(p.frames, p.point, stage))):
                if m is None:
                    continue
                rows.append([m.spec.framework, m.spec.scale, m.spec.device, p.frames, p.point.ratio, p.point.interval,
                             p.point.tokens_per_frame, stage, arm, m.n, m.min, m.median, m.mean, m.iqr, m.cv,
                             p.tokens[arm][stage]])
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def reduction_table(result: RunResult) -> pd.DataFrame:
    """One row per point and stage: measured reductions (fractions), interval, FLOP limit, efficiency."""
    rows = []
    for p in result.points:
        for stage in result.stages:
            r = result.reduction(p, stage)
            if r is None:
                continue
            flop = p.flop_reduction(stage)
            efficiency = r.on_median / flop if flop else None
            spec = result.baseline(p.frames, stage).spec
            rows.append([spec.framework, spec.scale, spec.device, p.frames, p.point.ratio, p.point.interval,
                         p.point.tokens_per_frame, stage, r.on_min, r.on_median, r.ci_low, r.ci_high, flop, efficiency])
    return pd.DataFrame(rows, columns=REDUCTION_COLUMNS)


def pct(x: float | None) -> str:
    """A signed percentage, or an em dash for a missing value."""
    return "—" if x is None else f"{x:+.1%}"


def ms(x: float) -> str:
    """Milliseconds with a precision that suits their size."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


COMPARISON_HEADERS = ["stage", "baseline ms median (min)", "+STC ms median (min)", "reduction median [95% CI]",
                      "reduction min", "FLOP limit", "efficiency", "tokens base → STC"]


def comparison_rows(result: RunResult, point) -> list[list[str]]:
    """Formatted rows of the per-point comparison table (terminal and Markdown share them)."""
    rows = []
    for stage in result.stages:
        base, new = result.baseline(point.frames, stage), result.stc(point.frames, point.point, stage)
        r = result.reduction(point, stage)
        if base is None or new is None or r is None:
            continue
        flop = point.flop_reduction(stage)
        rows.append([
            stage,
            f"{ms(base.median)} ({ms(base.min)}){' noisy' if base.noisy else ''}",
            f"{ms(new.median)} ({ms(new.min)}){' noisy' if new.noisy else ''}",
            f"{pct(r.on_median)} [{pct(r.ci_low)}, {pct(r.ci_high)}]",
            pct(r.on_min),
            pct(flop),
            f"{r.on_median / flop:.2f}" if flop else "—",
            f"{point.tokens['baseline'][stage]:,} → {point.tokens['stc'][stage]:,}",
        ])
    return rows


def memory_line(result: RunResult, point) -> str | None:
    """Peak CUDA memory of each arm at a point (None on a CPU, where it is not measured)."""
    peaks = []
    for arm, m in (("baseline", result.baseline(point.frames, "vit")), ("+STC", result.stc(point.frames, point.point, "vit"))):
        if m is not None and "peak_memory_mb" in m.metadata:
            peaks.append(f"{arm} {m.metadata['peak_memory_mb']:,.0f} MiB")
    return "peak CUDA memory: " + ", ".join(peaks) if peaks else None


def fidelity_line(result: RunResult, point) -> str:
    """One sentence of fidelity figures, labelled with the kind of weights they come from."""
    f = point.fidelity
    label = "random weights" if result.run["weights"] == "random" else "checkpoint weights"
    parts = []
    if "vit_cosine_mean" in f:
        parts.append(f"ViT feature cosine mean {f['vit_cosine_mean']:.4f} (min {f['vit_cosine_min']:.4f})")
    if "logits_top1_agreement" in f:
        parts.append(f"query logits after the stream: top-1 agreement {f['logits_top1_agreement']:.1%}, "
                     f"mean KL {f['logits_kl_mean']:.2e} nats")
    if point.recompute_fraction is not None:
        parts.append(f"ViT tokens recomputed {point.recompute_fraction:.1%}")
    return f"fidelity ({label}): " + "; ".join(parts)


def sweep_headers(result: RunResult) -> list[str]:
    """Columns of the one-line-per-point sweep table."""
    headers = ["frames", "ratio", "interval", "k/frame"]
    for stage in result.stages:
        headers.append(f"{stage} % [95% CI]")
        if any(p.flop_reduction(stage) is not None for p in result.points):
            headers.append(f"{stage} FLOP %")
    return headers + ["ViT cos (min)", "query KL", "ViT recomputed"]


def sweep_rows(result: RunResult) -> list[list[str]]:
    """One formatted row per (frame count, STC point); reductions in percent, 1 - STC / baseline."""
    rows = []
    for p in result.points:
        row = [str(p.frames), f"{p.point.ratio:g}", str(p.point.interval), str(p.point.tokens_per_frame)]
        for stage in result.stages:
            r = result.reduction(p, stage)
            row.append("—" if r is None else f"{100 * r.on_median:+.1f} [{100 * r.ci_low:+.1f}, {100 * r.ci_high:+.1f}]")
            if any(q.flop_reduction(stage) is not None for q in result.points):
                flop = p.flop_reduction(stage)
                row.append("—" if flop is None else f"{100 * flop:+.1f}")
        f = p.fidelity
        row.append(f"{f['vit_cosine_mean']:.4f} ({f['vit_cosine_min']:.4f})" if "vit_cosine_mean" in f else "—")
        row.append(f"{f['logits_kl_mean']:.2e}" if "logits_kl_mean" in f else "—")
        row.append("—" if p.recompute_fraction is None else f"{p.recompute_fraction:.1%}")
        rows.append(row)
    return rows
