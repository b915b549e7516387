"""Arms x repeats x frame counts -> measurements.

For each frame count, the baseline and every +STC point stream the same frames, interleaved
(A B, then B A, ...) so slow drift of the machine hits every arm alike. Each pass starts a
fresh stream (new KV cache, new pruner memory, a freshly attached cacher). After the timed
passes, one untimed pass per arm captures features and logits for the fidelity figures.
Each finished frame count is handed to ``on_point`` at once, so an interrupted or failed run
keeps what it measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stc import CacherConfig, PrunerConfig
from stc_bench.config import BenchConfig
from stc_bench.device import Device, resolve_device, resolve_dtype
from stc_bench.env import capture_environment
from stc_bench.fidelity import compare_streams
from stc_bench.frameworks import get_framework
from stc_bench.frameworks.framework import ArmSettings, Pipeline, StreamOutput
from stc_bench.measurement import Arm, Measurement
from stc_bench.results import PointResult, RunResult, stage_spec
from stc_bench.timing import StageTimer
from stc_bench.video import load_clip

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""progress(description, done, total)"""


class BenchmarkInterrupted(RuntimeError):
    """A run stopped before the end; ``result`` holds every finished frame count."""

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result


def choose_scale(config: BenchConfig, device: Device) -> tuple[str, str]:
    """The scale to build and why: a checkpoint fixes it; auto is full on CUDA, small on CPU."""
    if config.checkpoint:
        return "checkpoint", f"architecture read from --checkpoint {config.checkpoint}"
    if config.scale != "auto":
        return config.scale, f"--scale {config.scale} was requested"
    if device.is_cuda:
        return "full", "auto: CUDA device found, building the exact architecture"
    return "small", "auto: no CUDA device, so a narrower model with the same token counts (full needs a GPU)"


def arms_of(config: BenchConfig) -> list[ArmSettings]:
    """The baseline arm, then one +STC arm per point of the config."""
    arms = [ArmSettings(Arm.BASELINE.value)]
    for p in config.points:
        cacher = CacherConfig(update_ratio=p.ratio, cache_interval=p.interval, metric=config.metric,
                              selection=config.selection, cuda_graph=config.cuda_graph)
        arms.append(ArmSettings(Arm.STC.value, p, cacher, PrunerConfig(tokens_per_frame=p.tokens_per_frame)))
    return arms


@dataclass
class _Samples:
    totals: dict[str, list[float]]
    chunks: dict[str, list[list[float]]]
    peak_mb: float | None = None
    last: StreamOutput | None = None


def _timed_pass(pipeline: Pipeline, clip: torch.Tensor, arm: ArmSettings, device: Device, chunk_frames: int):
    device.reset_peak_memory()
    timer = StageTimer(device)
    out = pipeline.stream(clip, arm, timer, chunk_frames)
    spans = timer.finish()
    return out, spans, device.peak_memory_mb()


def measure_frame_count(pipeline: Pipeline, config: BenchConfig, run: dict, device: Device, clip: torch.Tensor,
                        arms: list[ArmSettings], tick: Callable[[], None]) -> tuple[list[Measurement], list[PointResult]]:
    """All arms at one frame count: interleaved timed passes, then fidelity and exact counts."""
    frames = clip.shape[0]
    samples = {a.label: _Samples({s: [] for s in pipeline.stages}, {s: [] for s in pipeline.stages}) for a in arms}
    for repeat in range(config.warmup + config.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            out, spans, peak = _timed_pass(pipeline, clip, arm, device, config.chunk_frames)
            tick()
            if repeat < config.warmup:
                continue
            s = samples[arm.label]
            for stage in pipeline.stages:
                per_chunk = [sp.ms for sp in spans if sp.stage == stage]
                s.totals[stage].append(sum(per_chunk))
                s.chunks[stage].append(per_chunk)
            if peak is not None:
                s.peak_mb = max(peak, s.peak_mb or 0.0)
            s.last = out

    captured = {a.label: pipeline.stream(clip, a, StageTimer(device), config.chunk_frames, capture=True) for a in arms}
    tick()
    measurements = []
    for arm in arms:
        s = samples[arm.label]
        for stage in pipeline.stages:
            meta = {"tokens": s.last.tokens[stage], "chunk_frames": config.chunk_frames}
            if stage == "vit":
                meta["chunk_kinds"] = s.last.chunk_kinds
            if s.peak_mb is not None:
                meta["peak_memory_mb"] = s.peak_mb
            spec = stage_spec(config, run, device.label, frames, stage, arm.point)
            measurements.append(Measurement(spec, s.totals[stage], config.warmup, s.chunks[stage], meta))
    base = arms[0]
    points = []
    for arm in arms[1:]:
        stats = samples[arm.label].last.cacher_stats
        points.append(PointResult(
            frames=frames,
            point=arm.point,
            macs={Arm.BASELINE.value: pipeline.macs(frames, base, config.chunk_frames),
                  Arm.STC.value: pipeline.macs(frames, arm, config.chunk_frames)},
            tokens={Arm.BASELINE.value: samples[base.label].last.tokens, Arm.STC.value: samples[arm.label].last.tokens},
            fidelity=compare_streams(captured[base.label], captured[arm.label]),
            chunk_kinds=samples[arm.label].last.chunk_kinds,
            recompute_fraction=stats.recompute_fraction if stats is not None else None,
        ))
    return measurements, points


def run_benchmark(config: BenchConfig, progress: ProgressCallback | None = None,
                  on_point: Callable[[RunResult], None] | None = None) -> RunResult:
    """Build the framework, then measure every frame count; returns the complete result.

    Raises ``BenchmarkInterrupted`` (carrying the partial result) on CUDA out-of-memory or
    Ctrl-C; ``on_point`` has by then received every finished frame count.
    """
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    scale, reason = choose_scale(config, device)
    torch.manual_seed(config.seed)
    framework = get_framework(config.framework)
    report = progress or (lambda *_: None)
    report(f"building {config.framework} ({scale}) on {device.label}", 0, 1)
    pipeline = framework.build(scale, device.torch_device, dtype, config.seed, config.checkpoint)
    run = {
        "scale": pipeline.scale, "scale_reason": reason, "dtype": str(dtype).removeprefix("torch."),
        "weights": "checkpoint" if config.checkpoint else "random",
        "video": config.video or "synthetic", "architecture": pipeline.description,
        "stc_components": framework.stc_components,
    }
    result = RunResult(config=config, environment=capture_environment(device), run=run)
    clip_all = load_clip(max(config.frames), pipeline.image_size, config.video, config.fps, config.seed)
    arms = arms_of(config)
    passes = sum((config.warmup + config.repeats) * len(arms) + 1 for _ in config.frames)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        report(f"{config.framework}: {len(arms)} arms x {config.repeats} repeats", done, passes)

    for frames in config.frames:
        clip = clip_all[:frames].to(device.torch_device, dtype)
        try:
            with torch.inference_mode():
                measurements, points = measure_frame_count(pipeline, config, run, device, clip, arms, tick)
        except torch.cuda.OutOfMemoryError:
            result.errors.append(
                f"CUDA out of memory at --frames {frames} (scale {pipeline.scale}, dtype {run['dtype']}, "
                f"--chunk-frames {config.chunk_frames}); try fewer frames, a smaller --scale or another GPU"
            )
            raise BenchmarkInterrupted(result.errors[-1], result) from None
        except KeyboardInterrupt:
            result.errors.append(f"interrupted during --frames {frames}")
            raise BenchmarkInterrupted(result.errors[-1], result) from None
        result.measurements.extend(measurements)
        result.points.extend(points)
        if on_point is not None:
            on_point(result)
    result.complete = True
    return result
