"""Views of the results table (``RunResult.table()``): the CSVs and the formatted rows that the
terminal and report.md share. Every figure here is read from that one table."""

from __future__ import annotations

import pandas as pd

from stc_bench.results import RunResult, arm_name, is_missing

IDENTITY_COLUMNS = ["framework", "scale", "device", "frames", "method", "arm"]
STAT_COLUMNS = ["n", "min_ms", "median_ms", "mean_ms", "iqr_ms", "cv", "tokens"]
REDUCTION_COLUMNS = ["reduction_min", "reduction_median", "ci_low", "ci_high", "flop_reduction", "efficiency", "round_iqr"]
"""Columns of reductions.csv after the arm's identity, in order (new columns go at the end, so
scripts that read them by position keep working)."""
SAMPLE_COLUMNS = ["repeat", "time_ms"]
STAGE_NAMES = {"vit": "ViT", "compress": "compress", "prefill": "pre-fill"}


def merged(table: pd.DataFrame) -> bool:
    """True for the table of a merged run (``stc-bench merge``): its rows carry the shard that
    measured them, and the CSVs end with a shard column."""
    return "shard" in table and bool(table.shard.notna().any())


def in_shard(table: pd.DataFrame, shard) -> pd.Series:
    """Rows of ``table`` measured in ``shard`` (all rows of a run that is not merged): an arm's
    baseline is the baseline row of its own shard."""
    return table.shard.isna() if is_missing(shard) else table.shard == shard


def in_cell(table: pd.DataFrame, shard, streams) -> pd.Series:
    """Rows of ``table`` measured in ``shard`` serving ``streams`` videos: an arm's baseline is the
    baseline row of its own shard and number of streams."""
    return in_shard(table, shard) & (table.streams == streams)


def serving(table: pd.DataFrame) -> bool:
    """True for the table of a run that served several streams concurrently (``--streams``): its
    CSVs end with a streams column."""
    return "streams" in table and bool((table.streams != 1).any())


SERVING_COLUMNS = ["streams", "step_ms_median", "step_ms_p90", "frames_per_s"]
"""Columns summary.csv ends with in a serving run (``--streams``); the other CSVs end with streams."""


def _tail_columns(table: pd.DataFrame, serving_figures: bool = False) -> list[str]:
    """The columns CSVs end with, where the run has them: shard (merged runs), streams (serving
    runs), and with ``serving_figures`` the serving figures too."""
    tail = ["shard"] if merged(table) else []
    if serving(table):
        tail += SERVING_COLUMNS if serving_figures else ["streams"]
    return tail


def knob_columns(table: pd.DataFrame) -> list[str]:
    """The knob columns of a results table: between ``arm`` and ``stage``."""
    columns = list(table.columns)
    return columns[columns.index("arm") + 1 : columns.index("stage")] if "stage" in columns else []


def summary_table(result: RunResult) -> pd.DataFrame:
    """summary.csv: one row per frame count, arm and stage, with the sample statistics."""
    table = result.table()
    if table.empty:
        return pd.DataFrame(columns=IDENTITY_COLUMNS + ["stage"] + STAT_COLUMNS)
    return table[IDENTITY_COLUMNS + knob_columns(table) + ["stage"] + STAT_COLUMNS + _tail_columns(table, serving_figures=True)]


def reduction_table(result: RunResult) -> pd.DataFrame:
    """reductions.csv: one row per compared arm, frame count and stage, against the baseline."""
    table = result.table()
    if table.empty:
        return pd.DataFrame(columns=IDENTITY_COLUMNS + ["stage"] + REDUCTION_COLUMNS)
    compared = table[table.method != "baseline"]
    return compared[IDENTITY_COLUMNS + knob_columns(table) + ["stage"] + REDUCTION_COLUMNS + _tail_columns(table)].reset_index(drop=True)


def samples_table(result: RunResult) -> pd.DataFrame:
    """samples.csv: one row per raw sample."""
    table = result.table()
    knobs = knob_columns(table) if not table.empty else []
    shard = ["shard"] if merged(table) else []
    streams = ["streams"] if serving(table) else []
    rows = []
    for m in result.measurements:
        s = m.spec
        values = dict(s.arm.knobs)
        for i, t in enumerate(m.times_ms):
            rows.append([s.framework, s.scale, s.device, s.frames, s.arm.method, s.arm.label, *(values.get(k) for k in knobs),
                         s.stage, i, t, *([s.shard] if shard else []), *([s.streams] if streams else [])])
    return pd.DataFrame(rows, columns=IDENTITY_COLUMNS + knobs + ["stage"] + SAMPLE_COLUMNS + shard + streams)


def pct(x: float | None) -> str:
    """A signed percentage, or an em dash for a missing value."""
    return "—" if is_missing(x) else f"{x:+.1%}"


def ms(x: float) -> str:
    """Milliseconds with a precision that suits their size."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _interval(row) -> str:
    return "—" if is_missing(row.reduction_median) else f"{pct(row.reduction_median)} [{pct(row.ci_low)}, {pct(row.ci_high)}]"


def arm_headers(result: RunResult) -> list[str]:
    """Columns of the one-row-per-arm table (the paper's table shape)."""
    headers = ["arm"]
    for stage in result.stages:
        headers += [f"{STAGE_NAMES.get(stage, stage)} ms", f"{STAGE_NAMES.get(stage, stage)} reduction [95% CI]"]
    headers += ["LLM tokens" if "prefill" in result.stages else "ViT tokens", "FLOP limit"]
    return headers + ["fidelity vs baseline"]


def arm_rows(result: RunResult, frames: int) -> list[list[str]]:
    """One formatted row per arm at ``frames`` frames, the baseline first: median ms and paired
    reduction per stage, the tokens the LLM (or, without one, the tower) received, the FLOP
    limit per stage, and fidelity (query-logit KL; ViT feature cosine where the token count is
    unchanged; the cacher's recompute fraction). In a merged run, one baseline row per shard,
    and every arm named with its shard."""
    table = result.table()
    table = table[table.frames == frames]
    token_stage = "prefill" if "prefill" in result.stages else "vit"
    rows = []
    for (label, shard, streams), group in table.groupby(["arm", "shard", "streams"], sort=False, dropna=False):
        by_stage = {row.stage: row for row in group.itertuples()}
        row = [arm_name(label, shard, streams)]
        for stage in result.stages:
            r = by_stage.get(stage)
            if r is None:
                row += ["—", "—"]
                continue
            row += [f"{ms(r.median_ms)}{' noisy' if r.noisy else ''}", _interval(r)]
        first = next(iter(by_stage.values()))
        row.append(f"{int(by_stage[token_stage].tokens):,}" if token_stage in by_stage else "—")
        limits = [f"{STAGE_NAMES.get(s, s)} {pct(by_stage[s].flop_reduction)}" for s in result.stages
                  if s in by_stage and not is_missing(by_stage[s].flop_reduction)]
        row.append(", ".join(limits) or "—")
        row.append(fidelity_cell(first))
        rows.append(row)
    return rows


def fidelity_cell(row) -> str:
    """Fidelity of one arm against the baseline, compactly (— for the baseline itself)."""
    parts = []
    if not is_missing(row.logits_kl_mean):
        parts.append(f"KL {row.logits_kl_mean:.2e}")
    if not is_missing(row.vit_cosine_mean):
        parts.append(f"ViT cos {row.vit_cosine_mean:.4f}")
    if not is_missing(row.recompute_fraction):
        parts.append(f"recomputed {row.recompute_fraction:.0%}")
    return ", ".join(parts) or "—"


STAGE_HEADERS = ["stage", "baseline ms median (min)", "arm ms median (min)", "reduction median [95% CI]",
                 "round IQR", "reduction min", "FLOP limit", "efficiency", "tokens base → arm", "ops/frame base → arm"]


def points(x: float | None) -> str:
    """A spread of reductions in percentage points, or an em dash."""
    return "—" if is_missing(x) else f"{100 * x:.1f} pts"


def stage_rows(result: RunResult, frames: int, arm_label: str, streams: int = 1) -> list[list[str]]:
    """Formatted per-stage rows of one arm serving ``streams`` videos against the baseline serving
    as many at ``frames`` frames (in a merged run, the baseline of the arm's own shard)."""
    table = result.table()
    table = table[table.frames == frames]
    arm = table[(table.arm == arm_label) & (table.streams == streams)]
    if arm.empty:
        return []
    base = {r.stage: r for r in table[(table.method == "baseline") & in_cell(table, arm.iloc[0].shard, streams)].itertuples()}
    rows = []
    for r in arm.itertuples():
        b = base.get(r.stage)
        if b is None:
            continue
        rows.append([
            r.stage,
            f"{ms(b.median_ms)} ({ms(b.min_ms)}){' noisy' if b.noisy else ''}",
            f"{ms(r.median_ms)} ({ms(r.min_ms)}){' noisy' if r.noisy else ''}",
            _interval(r),
            points(r.round_iqr),
            pct(r.reduction_min),
            pct(r.flop_reduction),
            "—" if is_missing(r.efficiency) else f"{r.efficiency:.2f}",
            f"{int(b.tokens):,} → {int(r.tokens):,}",
            _operators(b, r),
        ])
    return rows


def _operators(base, row) -> str:
    """Operators dispatched per frame, baseline → arm (— where the run did not count them)."""
    if is_missing(base.operators_per_frame) or is_missing(row.operators_per_frame):
        return "—"
    return f"{base.operators_per_frame:,.0f} → {row.operators_per_frame:,.0f}"


def launch_lines(result: RunResult, frames: int) -> list[str]:
    """One line per stage and arm a GPU run judged launch-bound at ``frames`` frames, with what
    to do; one line for all that could not be judged (a pass whose launches fill the GPU's queue
    before its head start ends)."""
    table = result.table()
    if "launch_verdict" not in table:
        return []
    rows = table[(table.frames == frames) & table.launch_verdict.notna()]
    lines = [f"{arm_name(r.arm, r.shard, r.streams)}, {r.stage}: {r.launch_verdict}" for r in rows.itertuples()
             if r.launch_verdict.startswith("launch-bound")]
    unjudged = sorted({f"{arm_name(r.arm, r.shard, r.streams)} {r.stage}" for r in rows.itertuples()
                       if r.launch_verdict.startswith("no verdict")})
    if unjudged:
        lines.append(f"no launch-bound verdict for {', '.join(unjudged)}: the host could not queue the pass ahead of the "
                     "GPU (see stc-bench doctor's spans vs wall)")
    return lines


def fidelity_line(result: RunResult, frames: int, arm_label: str, streams: int = 1) -> str:
    """One sentence of an arm's fidelity figures, labelled with the kind of weights they come from
    (serving several streams: the first stream's, against the baseline's first stream)."""
    table = result.table()
    rows = table[(table.frames == frames) & (table.arm == arm_label) & (table.streams == streams)]
    label = "random weights" if result.run.get("weights") == "random" else "checkpoint weights"
    if streams > 1:
        label += f"; of the first of {streams} streams, against the baseline's first"
    if rows.empty:
        return f"fidelity ({label}): —"
    r = next(rows.itertuples())
    parts = []
    if not is_missing(r.vit_cosine_mean):
        parts.append(f"ViT feature cosine mean {r.vit_cosine_mean:.4f} (min {r.vit_cosine_min:.4f})")
    if not is_missing(r.logits_kl_mean):
        parts.append(f"query logits after the stream: top-1 agreement {r.logits_top1_agreement:.1%}, "
                     f"mean KL {r.logits_kl_mean:.2e} nats")
    if not is_missing(r.recompute_fraction):
        parts.append(f"ViT tokens recomputed {r.recompute_fraction:.1%}")
    return f"fidelity ({label}): " + ("; ".join(parts) or "—")


def memory_line(result: RunResult, frames: int) -> str | None:
    """Peak CUDA memory of each arm at ``frames`` frames (None on a CPU, where it is not measured)."""
    table = result.table()
    rows = table[(table.frames == frames) & (table.stage == "vit")]
    peaks = [f"{arm_name(r.arm, r.shard, r.streams)} {r.peak_memory_mb:,.0f} MiB" for r in rows.itertuples() if not is_missing(r.peak_memory_mb)]
    return "peak CUDA memory: " + ", ".join(peaks) if peaks else None


PAGE_FAULT_GAP = 10_000
"""Median page faults per timed stream that two arms of one frame count may differ by before the
report flags it. A minor fault costs a few microseconds of system time (the trap and zeroing a
4 KiB page: 1.2 us in a tight loop, 4 us within a stream, on a 2-core Xeon), so 10,000 more faults
per stream put 10-40 ms of kernel work into one arm's timings alone: 1 % or more of a small-preset
stream. Below it the difference is lost in the noise; above it the allocator is mapping one arm's
tensors afresh every stream, and the reduction measures that too."""


def host_line(result: RunResult, frames: int) -> str | None:
    """Median page faults and system time per timed stream of each arm at ``frames`` frames
    (None where the run did not record them)."""
    table = result.table()
    rows = table[table.frames == frames].drop_duplicates(["arm", "shard", "streams"])
    if "page_faults_median" not in rows or rows.page_faults_median.isna().all():
        return None
    parts = [f"{arm_name(r.arm, r.shard, r.streams)} {r.page_faults_median:,.0f} ({r.system_ms_median:,.0f} ms)" for r in rows.itertuples()
             if not is_missing(r.page_faults_median)]
    return "page faults per stream, median (system time): " + ", ".join(parts)


def host_warnings(result: RunResult, frames: int) -> list[str]:
    """One warning per arm whose median page faults per stream differ from the baseline's by more
    than ``PAGE_FAULT_GAP`` at ``frames`` frames, saying what to do about it. CPU runs only: there
    the faults are the timed work's own; on a GPU the host's memory is not what the spans time."""
    table = result.table()
    rows = table[table.frames == frames].drop_duplicates(["arm", "shard", "streams"])
    if "page_faults_median" not in rows or rows.empty or not str(rows.iloc[0].device).startswith("cpu"):
        return []
    allocator = result.environment.get("allocator") or {}
    if allocator.get("applied"):
        advice = ("the allocator settings were applied and still do not hold its memory: preload jemalloc or tcmalloc "
                  "(LD_PRELOAD=/path/to/libjemalloc.so.2) and run again")
    else:
        why = allocator.get("reason") or "this run did not record its allocator"
        advice = (f"stc-bench's allocator settings were not applied ({why}): on glibc, run again with STCBENCH_ALLOCATOR "
                  "and glibc's MALLOC_*/GLIBC_TUNABLES variables unset, or preload jemalloc or tcmalloc")
    out = []
    for r in rows[rows.method != "baseline"].itertuples():
        base = rows[(rows.method == "baseline") & in_cell(rows, r.shard, r.streams)]  # its own shard's and streams' baseline
        if base.empty or is_missing(base.iloc[0].page_faults_median):
            continue
        reference = base.iloc[0].page_faults_median
        if not is_missing(r.page_faults_median) and abs(r.page_faults_median - reference) > PAGE_FAULT_GAP:
            out.append(f"{frames} frames, {arm_name(r.arm, r.shard, r.streams)}: {r.page_faults_median:,.0f} page faults per stream against the baseline's "
                       f"{reference:,.0f} (more than {PAGE_FAULT_GAP:,} apart): one arm's memory is mapped afresh every "
                       f"stream and its times include that kernel work; {advice}")
    return out


def serving_headers(result: RunResult) -> list[str]:
    """Columns of the serving table (``--streams``): per stage the per-frame latency, then the
    throughput over all timed stages and its gain over the baseline serving as many streams."""
    headers = ["arm", "streams"]
    headers += [f"{STAGE_NAMES.get(stage, stage)} step ms median / p90" for stage in result.stages]
    return headers + ["frames/s", "vs baseline"]


def serving_rows(result: RunResult, frames: int) -> list[list[str]]:
    """One formatted row per arm and number of streams at ``frames`` frames: each stage's step
    time, median and p90 over every step of every timed pass (all S streams advance together, so
    a frame waits for its whole step), and frames/s over all timed stages (S x frames over the
    summed stage medians), with the throughput gain over the baseline at the same S."""
    table = result.table()
    table = table[table.frames == frames]
    rows = []
    for (label, shard, streams), group in table.groupby(["arm", "shard", "streams"], sort=False, dropna=False):
        by_stage = {r.stage: r for r in group.itertuples()}
        row = [arm_name(label, shard), str(int(streams))]
        for stage in result.stages:
            r = by_stage.get(stage)
            row.append("—" if r is None or is_missing(r.step_ms_median) else f"{ms(r.step_ms_median)} / {ms(r.step_ms_p90)}")
        fps = throughput(group)
        row.append("—" if fps is None else f"{fps:,.1f}")
        base = table[(table.method == "baseline") & in_cell(table, shard, streams)]
        base_fps = throughput(base)
        first = next(iter(by_stage.values()))
        gain = None if first.method == "baseline" or fps is None or not base_fps else fps / base_fps
        row.append("—" if gain is None else f"x{gain:.2f}")
        rows.append(row)
    order = list(dict.fromkeys(r[0] for r in rows))  # arms in run order (the baseline first), each S ascending
    return sorted(rows, key=lambda r: (order.index(r[0]), int(r[1])))


def throughput(rows: pd.DataFrame) -> float | None:
    """Frames per second over all timed stages of one arm's rows (one frame count, one number of
    streams): streams x frames over the sum of the stage medians; None without samples."""
    if rows.empty or rows.median_ms.isna().any() or rows.median_ms.sum() <= 0:
        return None
    first = rows.iloc[0]
    return float(first.streams * first.frames / (rows.median_ms.sum() / 1000.0))
