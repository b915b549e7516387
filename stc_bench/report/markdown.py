"""report.md: what was run, on what, the results table, the plots, and the caveats."""

from __future__ import annotations

from stc_bench.env import environment_rows
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
from stc_bench.report.terminal import header_lines
from stc_bench.results import RunResult


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def caveats(result: RunResult) -> list[str]:
    """What a reader must keep in mind when quoting these numbers."""
    out = []
    if result.run["weights"] == "random":
        out.append("Weights are random: latency is representative of the architecture, but the fidelity "
                   "figures only show how much the computation changes, not task accuracy. Random logits have "
                   "no confident top-1 token, so top-1 agreement sits near chance for any change of the "
                   "visual context; the KL divergence is the comparable figure.")
    if result.environment.get("device") == "cpu":
        out.append("Measured on a CPU: ratios between arms carry over to GPUs only roughly (kernel-launch "
                   "overheads, which STC's many small ops pay on a GPU, do not show here).")
    if result.run["scale"] not in ("full", "checkpoint"):
        out.append(f"Scale '{result.run['scale']}' keeps the token counts but not the widths/depths of the real model; "
                   "absolute times are not the paper's.")
    out += result.run.get("notes", [])
    shards = result.run.get("merged_shards")
    if shards:
        where = "; ".join(f"shard {s['shard']} on {s.get('device')} ({s.get('device_name')}"
                          + (f", {s['gpu_uuid']})" if s.get("gpu_uuid") else ")") for s in shards)
        out.append(f"Merged from {len(shards)} shards by stc-bench merge ({where}). Each shard measured its own points "
                   "with its own baseline per frame count, interleaved in one process, and every reduction is against the "
                   "baseline of the arm's own shard: baselines of different shards are listed apart (\"(shard K)\"), never "
                   "pooled. Latencies of arms from different shards come from different processes (and maybe GPUs): compare "
                   "their reductions, not their milliseconds. The environment below is shard "
                   f"{shards[0]['shard']}'s; results.json keeps every shard's (run.merged_shards).")
    if result.config.cuda_graph:
        unused = sorted({f"{a.arm.label} ({(a.graphs or {}).get('disabled_reason') or 'no graph was replayed'})"
                         for a in result.compared if a.arm.method == "stc" and not (a.graphs or {}).get("replays")})
        if unused:
            out.append("--cuda-graph was asked for, but these arms ran eager: " + "; ".join(unused))
    first = result.environment.get("allocator", {}).get("applied"), result.environment.get("threads", {}).get("threads")
    changed = [h for h in result.run.get("resumed_host", []) if (h.get("applied"), h.get("threads")) != first]
    if changed and first != (None, None):  # a first run of an older stc-bench recorded neither
        out.append(f"Resumed with other host settings than the first run (allocator applied, threads: {first} first, then "
                   f"{', '.join(str((h.get('applied'), h.get('threads'))) for h in changed)}): rounds before and after the "
                   "resume may not be comparable.")
    if result.run.get("compile_failure"):
        out.append(f"--compile was asked for, but torch.compile failed and the STC arms ran eager: {result.run['compile_failure']}")
    out += [f"Page faults differ between arms: {w}." for frames in result.frame_counts for w in host_warnings(result, frames)]
    out += [f"Launches, {frames} frames: {line}." for frames in result.frame_counts for line in launch_lines(result, frames)]
    noisy = [w for m in result.measurements for w in m.warnings]
    if noisy:
        out.append("Noisy or small measurements (treat differences within their interval as no difference): "
                   + "; ".join(sorted(set(noisy))))
    if not result.complete:
        out.append("The run did not finish: " + "; ".join(result.errors or ["stopped early"]))
    return out


def render_markdown(result: RunResult, plots: list[str]) -> str:
    """The whole report.md text; ``plots`` are file names in the same folder."""
    c, env = result.config, result.environment
    parts = [f"# stc-bench: {c.framework}", ""]
    parts += [f"- {line}" for line in header_lines(result)]
    parts += ["", "## Results", ""]
    parts.append("Reductions are `1 - arm / baseline` (positive = faster), on the medians and on the minima of the "
                 "per-stream totals; the interval is a paired bootstrap over repeats. *FLOP limit* is the analytic "
                 "multiply-add reduction for the same settings; *efficiency* = measured median reduction / FLOP limit. "
                 "*Round IQR* is the interquartile range of the reductions of the single rounds (each round times every "
                 "arm once, interleaved): how much a single round's reduction moves. The run's median varies far less "
                 "than that; to tell whether two runs differ, use the intervals or stc-bench compare.")
    for frames in result.frame_counts:
        parts += ["", f"### {frames} frames", "", _table(arm_headers(result), arm_rows(result, frames))]
        if serving(result.table()):
            parts += ["", f"#### {frames} frames served concurrently", "",
                      f"Each step feeds one chunk of every stream ({result.run.get('chunk_frames')} frame(s) of each, "
                      "the framework's protocol) through one tower call and one batched pre-fill, so a frame waits for "
                      "its whole step: a stage's *step ms* is the latency it adds to each frame of the step (median and "
                      "p90 over every step of every timed pass). *frames/s* is streams x frames over the summed stage "
                      "medians; *vs baseline* is the throughput gain over the baseline serving as many streams.", "",
                      _table(serving_headers(result), serving_rows(result, frames))]
        for facts in (a for a in result.compared if a.frames == frames):
            label = facts.arm.label
            parts += ["", f"#### {facts.name}", "", _table(STAGE_HEADERS, stage_rows(result, frames, label, facts.streams)), "",
                      fidelity_line(result, frames, label, facts.streams) + "."]
        for line in (memory_line(result, frames), host_line(result, frames)):
            if line:
                parts += ["", line + "."]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    parts += ["", "## Caveats", ""] + [f"- {line}" for line in caveats(result)]
    parts += ["", "## Environment", "", _table(["key", "value"], [[k, f"`{v}`"] for k, v in environment_rows(env)])]
    arch = result.run.get("architecture", {})
    if arch:
        parts += ["", "## Architecture", "", _table(["part", "shape"], [[k, str(v)] for k, v in arch.items()])]
    parts += ["", "## Configuration", "", "```json", _json(c.to_dict()), "```", ""]
    return "\n".join(parts)


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=1)
