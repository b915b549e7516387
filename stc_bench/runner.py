"""Arms x repeats x frame counts -> measurements.

For each frame count, the baseline and every other arm (STC at each point of its knobs, the
peer methods) stream the same frames, interleaved (one round = every arm once; odd rounds run
the arms in reverse order) so slow drift of the machine hits every arm alike, and the baseline
is measured once for all arms. Each pass starts a fresh stream (new KV cache, new method state:
pruner memory, a freshly attached cacher). A shard (``--shard K/N``) measures only its slice of
the (frame count, arm) points, each frame count it touches with its own baseline, interleaved
as ever (``stc_bench.shard``).

Before any timed pass, one untimed *prepare* pass per arm captures features and logits for
the fidelity figures and does every one-time thing a stream shape needs (CUDA-graph capture,
index tensors on the device, the timer's events, allocator growth), so no timed span pays for
them, whatever ``--warmup`` is. Then one more untimed pass per arm counts the operators each
stage dispatches per frame, and on CUDA a pass pre-queued behind a sleep kernel tells whether a
stage is launch-bound (``stc_bench.launches``). The warm-up rounds that follow run the timed rounds' exact
passes (same clip, shapes and arm order), so they reach the state the timed rounds run in. The
run's device is the current CUDA device throughout.

Before anything is built, a run fixes what would otherwise vary from run to run on the host:
glibc's malloc thresholds on a CPU run (``allocator.steady_allocator``: freed tensors are reused
instead of unmapped and faulted in again) and torch's intra-op thread count
(``device.pin_cpu_threads``); both are recorded in the environment block. Around every timed
stream the process's page faults and system time are read (``getrusage``), outside the timed
spans, and kept per arm as raw samples, so the report can show an arm whose memory churns.

With a ``RunFolder``, the raw samples are saved after every measured round and each finished
frame count goes to results.json at once, so an interrupted run keeps what it measured and
``resume`` continues it: finished frame counts are skipped, and the frame count in progress
re-runs its warm-up and then measures only the rounds still missing. What it reads back is
checked against the run first (``RunFolder.read_progress``).

A frame count that runs out of memory is recorded in results.json (``run.failed_frames``) and
the run goes on with the other frame counts; a resume skips recorded failures unless asked to
retry them. Before building the clip, the memory it needs is compared with what is available,
and every arm's token budget with the tokens a frame has, so a run that cannot work fails at
once, naming the limit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stc.cacher.compiled import compile_failure
from stc_bench.allocator import HOST_USAGE_KEYS, AllocatorSettings, host_usage, steady_allocator
from stc_bench.config import BenchConfig, parse_arm_override
from stc_bench.device import Device, ThreadSettings, pin_cpu_threads, resolve_device, resolve_dtype
from stc_bench.env import allocator_variables, capture_environment, gpu_state
from stc_bench.errors import BenchUsageError
from stc_bench.fidelity import compare_streams
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.frameworks.framework import FrameworkSpec, Pipeline, StreamOutput
from stc_bench.frameworks.parts import attention_implementations
from stc_bench.launches import profile_launches
from stc_bench.measurement import BASELINE, Measurement
from stc_bench.methods import get_method
from stc_bench.methods.method import COMPRESS, Arm, HookSite, MethodError
from stc_bench.placement import describe_placement, devices_of
from stc_bench.results import ArmResult, RunResult, arm_name, stage_spec
from stc_bench.run_folder import Progress, RunFolder
from stc_bench.shard import plan_points, shard_block
from stc_bench.timing import StageTimer
from stc_bench.video import VideoSource, load_clip, resolve_video

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""progress(description, done, total)"""


class BenchmarkInterrupted(RuntimeError):
    """A run stopped before the end, or ended with failed frame counts; ``result`` holds every
    finished frame count. ``by_user``: Ctrl-C; ``failed_frames``: frame counts that failed and are
    recorded as such (a resume retries them only when asked)."""

    def __init__(self, message: str, result: RunResult, by_user: bool = False, failed_frames: tuple[int, ...] = ()):
        super().__init__(message)
        self.result = result
        self.by_user = by_user
        self.failed_frames = failed_frames


HOST_CLIP_COPIES = 3
"""Copies of the float32 clip alive at once while it is made (frames, noise, their sum)."""


def available_host_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by a cgroup v2
    limit (less the cgroup's reclaimable page cache); None where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
            available = min(available, int(limit) - used + int(stat.get("file", 0)))
    except (OSError, ValueError):
        pass
    return max(available, 0)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_clip_memory(frames: int, size: int, device: Device, dtype: torch.dtype, copies: int = 1) -> None:
    """Refuse, before allocating it, a clip of ``frames`` frames of size x size that cannot fit:
    on the host (float32, ``HOST_CLIP_COPIES`` copies while it is made) and on a CUDA device (the
    frames in the compute dtype, ``copies`` times: the clip and its arrangements for --streams,
    besides the model already built and its activations, which come on top). ``BenchUsageError``
    gives the figure, the limit and the most --frames that fit."""
    per_frame = 3 * size * size
    host = per_frame * 4 * HOST_CLIP_COPIES
    available = available_host_memory()
    if available is not None and frames * host > available:
        raise BenchUsageError(f"--frames {frames}: the clip needs {_gib(frames * host)} of host memory ({frames} frames x 3 x {size} "
                              f"x {size} float32, {HOST_CLIP_COPIES} copies while it is made), {_gib(available)} is available; "
                              f"pass --frames {available // host} or fewer")
    if device.is_cuda:
        free, _ = torch.cuda.mem_get_info(device.torch_device)
        on_device = per_frame * dtype.itemsize * copies
        if frames * on_device > free:
            held = f" x {copies} (the clip and one arrangement per --streams S above 1)" if copies > 1 else ""
            raise BenchUsageError(f"--frames {frames}: the clip alone needs {_gib(frames * on_device)} on {device.label} ({frames} "
                                  f"frames x 3 x {size} x {size} {str(dtype).removeprefix('torch.')}{held}), {_gib(free)} is "
                                  f"free there after the build; pass --frames {free // on_device} or fewer")


def check_token_budgets(config: BenchConfig, arms: list[Arm], site: HookSite) -> None:
    """Refuse a per-frame token budget above the tokens a frame has where the budget applies: at
    the compression hook (after the framework's pooling) where the framework has one, else
    leaving the tower (CLS not counted). STC without a compression hook keeps no budget."""
    patches = site.tower_tokens - int(site.class_token)
    if COMPRESS in site.hooks:
        per_frame = site.pool(torch.zeros(1, patches, 1)).shape[1]
        where = "where the budget applies (the compression hook)"
    else:
        per_frame, where = patches, "leaving the vision tower (CLS not counted)"
    for arm in arms:
        if arm.is_baseline or (arm.method == "stc" and COMPRESS not in site.hooks):
            continue
        budget = dict(arm.knobs).get("tokens_per_frame")
        if budget is None or budget <= per_frame:
            continue
        overridden = any(parse_arm_override(o)[:2] == (arm.method, "tokens_per_frame") for o in config.arm_overrides)
        option = f"--arm {arm.method}:tokens_per_frame={budget}" if overridden else f"--tokens-per-frame {budget}"
        raise BenchUsageError(f"{option}: a frame has {per_frame} tokens on {config.framework} {where}, so {arm.method} "
                              f"would keep them all; pass {per_frame} or fewer")


def choose_scale(config: BenchConfig, device: Device) -> tuple[str, str]:
    """The scale to build and why: a checkpoint fixes it; auto is full on CUDA, small on CPU."""
    if config.checkpoint:
        return "checkpoint", f"architecture read from --checkpoint {config.checkpoint}"
    if config.scale != "auto":
        return config.scale, f"--scale {config.scale} was requested"
    if device.is_cuda:
        return "full", "auto: CUDA device found, building the exact architecture"
    return "small", "auto: no CUDA device, so a narrower model with the same token counts (full needs a GPU)"


def choose_builder(config: BenchConfig, framework: FrameworkSpec, scale: str, device: Device) -> Callable[..., Pipeline]:
    """How to build ``framework`` at ``scale``: its ``build``, or with ``--device-map auto`` its
    ``build_across_gpus``. ``BenchUsageError`` naming the fix for a scale the framework has no
    preset of, and for ``--device-map auto`` without CUDA or on a framework that cannot place its LLM."""
    if scale != "checkpoint" and scale not in framework.presets:
        raise BenchUsageError(f"--scale {scale}: {config.framework} has no such preset; pass one of {', '.join(framework.presets)}")
    if config.device_map == "none":
        return framework.build
    if not device.is_cuda:
        raise BenchUsageError(f"--device-map {config.device_map}: it places the LLM across CUDA GPUs, and this run is on the "
                              f"{device.label} (no CUDA device here); leave out --device-map")
    if framework.build_across_gpus is None:
        able = [name for name in FRAMEWORK_MODULES if get_framework(name).build_across_gpus is not None]
        raise BenchUsageError(f"--device-map {config.device_map}: {config.framework} cannot place its LLM across GPUs (only "
                              f"{', '.join(able)} can); leave out --device-map")
    return framework.build_across_gpus


def arms_of(config: BenchConfig, site: HookSite) -> list[Arm]:
    """The arms of a run, baseline first: STC at every point of its knobs, then each peer method
    at every ``--tokens-per-frame`` with its ``--arm`` knob settings. Raises ``MethodError``
    (a usage error) naming the fix when an arm cannot run on this framework."""
    uses_pruner = COMPRESS in site.hooks
    if "stc" in config.arms and not uses_pruner and len(config.tokens_per_frame) > 1:
        raise BenchUsageError(f"--tokens-per-frame: STC uses no pruner on {config.framework}, so sweeping it "
                              "measures the same thing twice; give one value")
    overrides: dict[str, dict[str, str]] = {}
    for text in config.arm_overrides:
        method, knob, value = parse_arm_override(text)
        overrides.setdefault(method, {})[knob] = value
    arms = [BASELINE]
    for name in config.arms:
        spec = get_method(name)
        if name == "baseline":
            continue
        problem = spec.why_not(site)
        if problem:
            raise MethodError(f"--arms {name}: not available on {config.framework} ({problem}); leave it out of --arms")
        if name == "stc":
            arms += [spec.arm(ratio=p.ratio, interval=p.interval, tokens_per_frame=p.tokens_per_frame, metric=config.metric,
                              selection=config.selection, cuda_graph=config.cuda_graph,
                              compile=config.compile) for p in config.points]
            continue
        knobs = {k.name: k for k in spec.knobs}
        given = {}
        for knob, value in overrides.get(name, {}).items():
            if knob not in knobs:
                raise MethodError(f"--arm {name}:{knob}=...: {name} has no knob {knob!r} (its knobs: {', '.join(knobs) or 'none'})")
            given[knob] = knobs[knob].parse(value, name)
        for budget in config.tokens_per_frame:
            values = {"tokens_per_frame": budget, **given} if "tokens_per_frame" in knobs else given
            arms.append(spec.arm(**values))
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise MethodError("two arms have the same label (" + ", ".join(sorted({x for x in labels if labels.count(x) > 1}))
                          + "): give them different knobs")
    return list(dict.fromkeys(arms))


def _empty_host() -> dict[str, list]:
    """No host-usage samples yet: one empty list per ``getrusage`` figure."""
    return {key: [] for key in HOST_USAGE_KEYS}


@dataclass(frozen=True)
class Cell:
    """What one timed pass measures at a frame count: an arm serving ``streams`` videos."""

    arm: Arm
    streams: int = 1

    @property
    def key(self) -> str:
        """Its name in the raw samples and partial.json: the arm's label for one stream, as ever."""
        return arm_name(self.arm.label, None, self.streams)


def cells_of(arms: list[Arm], streams: tuple[int, ...]) -> list[Cell]:
    """Every arm at every number of streams, the baseline first at each."""
    return [Cell(arm, count) for count in streams for arm in arms]


def serving_clip(clip: torch.Tensor, streams: int) -> torch.Tensor:
    """The clip (T, 3, H, W) of one pass as it is for one stream; for S streams (S, T, 3, H, W),
    stream s playing it from frame ``s * T // S`` on and wrapping around to its start (a cut, as
    live streams have), so the streams show different frames at every step, while stream 0 plays
    exactly what a one-stream run plays. Made once per frame count, outside every timed span."""
    if streams == 1:
        return clip
    frames = clip.shape[0]
    order = [(s * frames // streams + i) % frames for s in range(streams) for i in range(frames)]
    return clip[torch.tensor(order, device=clip.device)].unflatten(0, (streams, frames))       # (S, T, 3, H, W)


def _empty_samples(cells: list[Cell], stages: tuple[str, ...]) -> dict[str, Any]:
    """JSON-safe raw samples: cell key -> totals/chunks per stage, peak memory, and per timed
    stream the host's page faults and system time (``host``)."""
    return {c.key: {"totals": {s: [] for s in stages}, "chunks": {s: [] for s in stages}, "peak_mb": None,
                    "host": _empty_host()} for c in cells}


def _timed_pass(pipeline: Pipeline, clip: torch.Tensor, arm: Arm, device: Device, chunk_frames: int,
                timer: StageTimer):
    """One timed stream: its spans, peak device memory, and the host usage (page faults, system
    time) of the whole stream, read outside its timed spans (None where unavailable)."""
    device.reset_peak_memory()
    before = host_usage()
    pipeline.stream(clip, arm, timer, chunk_frames)
    spans = timer.finish()
    after = host_usage()
    return spans, device.peak_memory_mb(), (after - before if before is not None and after is not None else None)


def prepare_arms(pipeline: Pipeline, clips: dict[int, torch.Tensor], cells: list[Cell], timer: StageTimer,
                 chunk_frames: int) -> dict[str, StreamOutput]:
    """One untimed pass per cell, capturing what fidelity needs; everything a stream does once
    (graph capture, device index tensors, the timer's events) happens here, not in a timed span."""
    captured = {}
    for cell in cells:
        captured[cell.key] = pipeline.stream(clips[cell.streams], cell.arm, timer, chunk_frames, capture=True)
        timer.finish()
    return captured


def check_streams(config: BenchConfig, framework: FrameworkSpec) -> None:
    """``--streams`` above 1 only where the framework serves concurrent streams; ``BenchUsageError`` otherwise."""
    if max(config.streams) > 1 and not framework.serves_streams:
        serving = ", ".join(name for name in FRAMEWORK_MODULES if get_framework(name).serves_streams)
        raise BenchUsageError(
            f"--streams {','.join(map(str, config.streams))}: {framework.name} serves one stream per pass (its memory is "
            f"built per query, of a content-dependent size, so S streams cannot pre-fill as one batch); drop --streams, "
            f"or use a framework that serves several: {serving}")


def measure_frame_count(
    pipeline: Pipeline,
    config: BenchConfig,
    run: dict,
    device: Device,
    clip: torch.Tensor,
    arms: list[Arm],
    tick: Callable[[], None],
    folder: RunFolder | None = None,
    progress: Progress | None = None,
) -> tuple[list[Measurement], list[ArmResult]]:
    """All arms at one frame count, at each ``config.streams``: interleaved timed rounds (every
    arm at every number of streams once per round), then fidelity and exact counts. ``clip``
    (T, 3, H, W) is every stream's video (``serving_clip``). ``progress``: rounds of this frame
    count measured before (read and checked from partial.json)."""
    frames = clip.shape[0]
    chunk_frames = run["chunk_frames"]
    cells = cells_of(arms, config.streams)
    clips = {count: serving_clip(clip, count) for count in config.streams}
    if progress is not None and progress.frames == frames:
        first = next(iter(progress.samples.values()))
        if set(first["totals"]) != set(pipeline.stages):
            raise BenchUsageError(f"partial.json of --frames {frames} holds stages {', '.join(first['totals'])}, this "
                                  f"{config.framework} times {', '.join(pipeline.stages)}; delete it to measure --frames "
                                  f"{frames} again from its first round")
        done, samples = progress.rounds, progress.samples
        for s in samples.values():  # a partial.json of an older stc-bench has no (or not every) host figure
            for key, values in _empty_host().items():
                s.setdefault("host", {}).setdefault(key, values)
    else:
        done, samples = 0, _empty_samples(cells, pipeline.stages)
    if done:
        logger.warning("resuming %d frames: %d of %d rounds already measured", frames, done, config.repeats)
    timer = StageTimer(device)
    captured = prepare_arms(pipeline, clips, cells, timer, chunk_frames)
    launches = {c.key: profile_launches(pipeline, clips[c.streams], c.arm, device, chunk_frames) for c in cells}
    tick(1)
    for repeat in range(config.warmup + config.repeats):
        measured = repeat >= config.warmup
        if measured and repeat - config.warmup < done:
            tick(len(cells))
            continue
        for cell in cells if repeat % 2 == 0 else cells[::-1]:
            spans, peak, usage = _timed_pass(pipeline, clips[cell.streams], cell.arm, device, chunk_frames, timer)
            tick(1)
            if not measured:
                continue
            s = samples[cell.key]
            for stage in pipeline.stages:
                per_chunk = [sp.ms for sp in spans if sp.stage == stage]
                s["totals"][stage].append(sum(per_chunk))
                s["chunks"][stage].append(per_chunk)
            if peak is not None:
                s["peak_mb"] = max(peak, s["peak_mb"] or 0.0)
            if usage is not None:
                for key in HOST_USAGE_KEYS:
                    s["host"][key].append(getattr(usage, key))
        if measured and folder is not None:
            folder.save_progress(frames, repeat - config.warmup + 1, samples)

    measurements = []
    for cell in cells:
        s, out = samples[cell.key], captured[cell.key]
        for stage in pipeline.stages:
            meta: dict[str, Any] = {"tokens": out.tokens[stage], "chunk_frames": chunk_frames}
            if stage == "vit":
                meta["chunk_kinds"] = out.chunk_kinds
            if s["peak_mb"] is not None:
                meta["peak_memory_mb"] = s["peak_mb"]
            spec = dataclasses.replace(stage_spec(config, run, device.label, frames, stage, cell.arm), streams=cell.streams)
            measurements.append(Measurement(spec, s["totals"][stage], config.warmup, s["chunks"][stage], meta))
    facts = []
    for cell in cells:
        out, host = captured[cell.key], samples[cell.key]["host"]
        base = captured[Cell(BASELINE, cell.streams).key]
        facts.append(ArmResult(
            frames=frames,
            arm=cell.arm,
            macs=pipeline.macs(frames, cell.arm, chunk_frames, out),
            tokens=out.tokens,
            fidelity={} if cell.arm.is_baseline else compare_streams(base, out),
            chunk_kinds=out.chunk_kinds,
            recompute_fraction=out.cacher_stats.recompute_fraction if out.cacher_stats is not None else None,
            graphs=dataclasses.asdict(out.graph_stats) if out.graph_stats is not None else None,
            # a stream's usage for every timed stream or none (a partial.json of an older stc-bench has none)
            host_usage=({key: list(host[key]) for key in HOST_USAGE_KEYS}
                        if all(len(host[key]) == config.repeats for key in HOST_USAGE_KEYS) else None),
            launches={stage: figures.to_dict() for stage, figures in launches[cell.key].items()},
            streams=cell.streams,
        ))
    return measurements, facts


def run_benchmark(config: BenchConfig, progress: ProgressCallback | None = None,
                  folder: RunFolder | None = None, resume: RunResult | None = None,
                  retry_failed: bool = False) -> RunResult:
    """Build the framework, then measure every frame count; returns the complete result.

    With ``folder``, results.json is written at the start and after every frame count, and raw
    samples after every round. ``resume`` (a partial result read from that folder) skips the
    frame counts it already holds, and those recorded as failed unless ``retry_failed``. A frame
    count that runs out of memory is recorded as failed and the others are still measured; then
    ``BenchmarkInterrupted`` carries the result. Out of memory while building, or Ctrl-C, raise it
    at once. ``BenchUsageError`` (raised before anything is written): a setting that cannot work
    here (token budget, clip memory, arms, video, partial.json, ``STCBENCH_ALLOCATOR``). The run's
    device is the current CUDA device from start to end, so ``--gpu N`` builds, times and captures
    on GPU N. Before the build, a CPU run fixes glibc's malloc thresholds and every run pins
    torch's intra-op threads (both process-wide, recorded in the environment block).
    """
    device = resolve_device(config.device)
    allocator = steady_allocator(not device.is_cuda, allocator_variables())
    threads = pin_cpu_threads()
    with device.activate():
        return _run(config, device, progress or (lambda *_: None), folder, resume, retry_failed, allocator, threads)


def _note_compile_failure(config: BenchConfig, result: RunResult, frames: int | None = None) -> None:
    """Record, before the result is saved, that --compile fell back to eager in this process, and
    at which frame count it was first seen (frame counts before it ran compiled)."""
    if config.compile and compile_failure() is not None and "compile_failure" not in result.run:
        where = f" (first seen at --frames {frames})" if frames is not None else ""
        result.run["compile_failure"] = compile_failure() + where


def _out_of_memory(err: BaseException, what: str, settings: str, advice: str) -> str:
    """One line: which memory ran out, where, with which settings, and what to try."""
    kind = "CUDA" if isinstance(err, torch.cuda.OutOfMemoryError) else "host"
    return f"{kind} out of memory {what} ({settings}); {advice}"


def _run_block(config: BenchConfig, framework: FrameworkSpec, scale: str, reason: str, dtype_name: str,
               pipeline: Pipeline | None, video: VideoSource) -> dict[str, Any]:
    """How the run was built, for the report (``pipeline`` None: the build itself failed)."""
    return {
        "scale": scale, "scale_reason": reason, "dtype": dtype_name,
        "weights": "checkpoint" if config.checkpoint else "random",
        "video": video.label,
        "architecture": pipeline.description if pipeline else {},
        "stc_components": framework.stc_components,
        "chunk_frames": config.chunk_frames or (pipeline.default_chunk_frames if pipeline else None),
        "attn_implementation": attention_implementations(pipeline.modules()) if pipeline else {},
        "placement": describe_placement(pipeline.modules()) if pipeline else {},
        "notes": (list(pipeline.notes) if pipeline else [])
                 + [note for note in (get_method(name).report_note for name in config.arms) if note],
    }


def _free_memory(device: Device) -> None:
    """Give back what a failed frame count held, before the next one."""
    gc.collect()
    if device.is_cuda:
        torch.cuda.empty_cache()


def _run(config: BenchConfig, device: Device, report: ProgressCallback, folder: RunFolder | None,
         resume: RunResult | None, retry_failed: bool, allocator: AllocatorSettings, threads: ThreadSettings) -> RunResult:
    dtype = resolve_dtype(config.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    scale, reason = choose_scale(config, device)
    torch.manual_seed(config.seed)
    framework = get_framework(config.framework)
    build = choose_builder(config, framework, scale, device)
    arms = arms_of(config, framework.site())
    plan = plan_points(config.frames, arms, config.shard)  # frame count -> its arms, baseline first (a shard: its points)
    check_streams(config, framework)
    video = resolve_video(config.video, max(config.frames), config.fps)  # before the build: a bad --video fails at once
    finished = set(resume.frame_counts) if resume is not None else set()
    skipped = set() if resume is None or retry_failed else set(resume.failed_frames)
    saved = (folder.read_progress(tuple(plan), finished, {f: [c.key for c in cells_of(at, config.streams)] for f, at in plan.items()},
                                  config.repeats)
             if folder is not None else None)  # checked before the build: a bad partial.json fails at once
    report(f"building {config.framework} ({scale}) on {device.label}", 0, 1)
    try:
        pipeline = build(scale, device.torch_device, dtype, config.seed, config.checkpoint)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        message = _out_of_memory(err, f"while building {config.framework}", f"scale {scale}, dtype {dtype_name}, on {device.label}",
                                 "try a smaller --scale, --dtype float16, or a device with more free memory")
        result = resume or RunResult(config=config, environment=capture_environment(device, allocator, threads),
                                     run=_run_block(config, framework, scale, reason, dtype_name, None, video))
        result.errors.append(message)
        if folder is not None:
            folder.save_result(result)
        raise BenchmarkInterrupted(message, result) from None
    device = device.with_peers(devices_of(pipeline.modules()))  # a placed LLM's GPUs: timed spans cover them too
    check_token_budgets(config, arms, pipeline.site)
    todo = [f for f in plan if f not in finished and f not in skipped]
    # on the device: the clip, and each S > 1 streams' arrangement of it (``serving_clip``)
    check_clip_memory(max(config.frames), pipeline.image_size, device, dtype,
                      copies=1 + sum(count for count in config.streams if count > 1))
    if resume is not None:
        result = resume
        result.run.setdefault("resumed_utc", []).append(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        # What this process fixed on the host, beside what the first one did (the environment
        # block): rounds measured before and after a resume are comparable only if they agree.
        result.run.setdefault("resumed_host", []).append({"applied": allocator.applied, "threads": threads.threads})
    else:
        result = RunResult(config=config, environment=capture_environment(device, allocator, threads),
                           run=_run_block(config, framework, pipeline.scale, reason, dtype_name, pipeline, video))
        if config.shard is not None:
            result.run["shard"] = shard_block(config.shard, plan)
    if folder is not None:
        folder.save_result(result)
    try:
        clip_all = load_clip(max(config.frames), pipeline.image_size, video, config.fps, config.seed,  # the same clip as ever
                             mean=pipeline.mean, std=pipeline.std)
    except MemoryError as err:
        result.errors.append(_out_of_memory(err, f"while making the clip of --frames {max(config.frames)}",
                                            f"{pipeline.image_size} px", "pass fewer --frames"))
        if folder is not None:
            folder.save_result(result)
        raise BenchmarkInterrupted(result.errors[-1], result) from None
    def passes_at(frames: int) -> int:
        return (config.warmup + config.repeats) * len(plan[frames]) * len(config.streams) + 1

    passes = sum(passes_at(f) for f in todo)
    done = 0
    description = f"{config.framework}: {len(arms)} arms x {config.repeats} repeats"
    report(description, done, passes)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        report(description, done, passes)

    failures: list[str] = []
    for frames in todo:
        before = done
        try:
            clip = clip_all[:frames].to(device.torch_device, dtype)
            with torch.inference_mode():
                measurements, facts = measure_frame_count(pipeline, config, result.run, device, clip, plan[frames], tick,
                                                          folder, saved)
        except (torch.cuda.OutOfMemoryError, MemoryError) as err:
            settings = f"scale {pipeline.scale}, dtype {dtype_name}, --chunk-frames {result.run['chunk_frames']}"
            message = _out_of_memory(err, f"at --frames {frames}", settings, "try fewer frames, a smaller --scale or another GPU")
            result.errors.append(message)
            result.run["failed_frames"] = [f for f in result.run.get("failed_frames", []) if f.get("frames") != frames] + [
                {"frames": frames, "error": message}]
            failures.append(message)
            clip = None
            _free_memory(device)
            tick(before + passes_at(frames) - done)
            if folder is not None:
                folder.clear_progress()  # its rounds are not resumed: a retry measures it afresh
                folder.save_result(result)
            continue
        except KeyboardInterrupt:
            raise BenchmarkInterrupted(f"interrupted during --frames {frames}", result, by_user=True) from None
        _note_compile_failure(config, result, frames)
        result.measurements.extend(measurements)
        result.arms.extend(facts)
        result.run["failed_frames"] = [f for f in result.run.get("failed_frames", []) if f.get("frames") != frames]
        if not result.run["failed_frames"]:
            del result.run["failed_frames"]
        if folder is not None:
            folder.save_result(result)
            folder.clear_progress()
    result.complete = set(plan) <= set(result.frame_counts)
    _note_compile_failure(config, result)
    result.environment["gpu_state_after"] = gpu_state(device)
    if folder is not None:
        folder.save_result(result)
    failed = tuple(sorted(result.failed_frames))
    if not result.complete:
        skipped_now = sorted(set(failed) & skipped)
        earlier = (f"; --frames {','.join(map(str, skipped_now))} failed before and was skipped" if skipped_now else "")
        measured = [f for f in todo if f in result.frame_counts]
        also = f"; measured --frames {','.join(map(str, measured))}" if measured and failures else ""
        raise BenchmarkInterrupted("; ".join(failures) + also + earlier if failures else earlier.removeprefix("; "),
                                   result, failed_frames=failed)
    return result
