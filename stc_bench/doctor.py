"""``stc-bench doctor``: a self-check of the measurement path on this machine.

Each check runs the real code path (timer, frameworks, cacher, runner) and returns a
``CheckResult`` with a status and the figure it was judged on. On a CUDA device every check
runs; without one, the CPU subset runs (the no-sync check through the patched tensor methods,
the null arm, the span-versus-wall figure) and the GPU-only checks say they were skipped. The
``gpu``-marked tests call the same functions, so ``pytest -m gpu`` and ``doctor`` agree.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from stc_bench.device import Device, HostSyncError
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.frameworks.framework import ArmSettings, Pipeline
from stc_bench.timing import StageTimer, wall_clock_ms

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"

TIMER_TOLERANCE = 0.10
"""A known-length kernel timed by ``StageTimer`` must agree with synchronised wall time this closely."""
SLEEP_MS = 50.0
"""Length of the known-length kernel."""
NULL_ARM_TOLERANCE = 0.03
"""``--interval 1`` must measure a ViT reduction within this of zero."""
GRAPH_FRAMES = 10
"""Frames of the CUDA-graph check, streamed one per call."""
FP16_TOLERANCE = 2e-2
"""Largest absolute difference allowed between graph replay and eager in fp16."""
LAUNCH_BOUND_SHARE = 0.8
"""A pass whose host enqueue time is this share of its wall time keeps the GPU waiting for launches."""


@dataclass(frozen=True)
class CheckResult:
    """One line of the self-check: what was checked, PASS/FAIL/SKIP/INFO, and the figure behind it."""

    name: str
    status: str
    figure: str


def _gpu_only(name: str, device: Device) -> CheckResult | None:
    if device.is_cuda:
        return None
    return CheckResult(name, SKIP, "needs a CUDA device (run stc-bench doctor --gpu N on a GPU machine)")


def _arms(framework: str) -> list[ArmSettings]:
    """The baseline and a default +STC arm of ``framework`` (pruner where STC uses one)."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import arms_of

    spec = get_framework(framework)
    return arms_of(BenchConfig(framework=framework), uses_pruner="pruner" in spec.stc_components)


def _clip(pipeline: Pipeline, frames: int, device: Device, dtype: torch.dtype) -> torch.Tensor:
    from stc_bench.video import load_clip

    clip = load_clip(frames, pipeline.image_size, None, 0.5, 0, mean=pipeline.mean, std=pipeline.std)
    return clip.to(device.torch_device, dtype)


def check_timer(device: Device) -> list[CheckResult]:
    """``StageTimer`` against synchronised wall time on a known-length kernel, on this GPU and on
    one other GPU where there is one."""
    skipped = _gpu_only("timer vs wall clock", device)
    if skipped:
        return [skipped]
    devices = [device]
    others = [i for i in range(torch.cuda.device_count()) if i != device.torch_device.index]
    if others:
        devices.append(Device(torch.device("cuda", others[0])))
    return [_time_sleep_kernel(d) for d in devices]


def _time_sleep_kernel(device: Device) -> CheckResult:
    name = f"timer vs wall clock ({device.label})"
    with device.activate():
        probe_cycles = 10_000_000
        probe_ms = wall_clock_ms(device, lambda: torch.cuda._sleep(probe_cycles))
        cycles = int(probe_cycles * SLEEP_MS / max(probe_ms, 1e-3))
        timer = StageTimer(device)
        timer.reserve(1)
        ratios = []
        for _ in range(5):
            spans: list = []

            def timed():
                with timer.span("sleep", 0):
                    torch.cuda._sleep(cycles)
                spans.extend(timer.finish())

            wall = wall_clock_ms(device, timed)
            ratios.append(spans[0].ms / wall)
    ratio = statistics.median(ratios)
    status = PASS if abs(1 - ratio) <= TIMER_TOLERANCE else FAIL
    return CheckResult(name, status, f"span/wall {ratio:.3f} on a {SLEEP_MS:.0f} ms kernel (limit ±{TIMER_TOLERANCE:.0%})")


def check_no_host_syncs(device: Device, scale: str = "tiny", frameworks: tuple[str, ...] | None = None) -> list[CheckResult]:
    """One pass per framework and arm (and with CUDA graphs on a GPU) whose spans forbid host syncs."""
    results = []
    dtype = torch.float16 if device.is_cuda else torch.float32
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        pipeline = get_framework(framework).build(scale, device.torch_device, dtype, 0, None)
        clip = _clip(pipeline, 4, device, dtype)
        arms = _arms(framework)
        if device.is_cuda:
            arms += [_with_graphs(a) for a in arms if a.cacher is not None]
        for arm in arms:
            name = f"no host sync in spans: {framework} {arm.label}{' graphs' if arm.cacher and arm.cacher.cuda_graph else ''}"
            timer = StageTimer(device)
            try:
                with torch.inference_mode():
                    pipeline.stream(clip, arm, timer, pipeline.default_chunk_frames)  # untimed: one-time work
                    timer.finish()
                    strict = StageTimer(device, forbid_syncs=True)
                    pipeline.stream(clip, arm, strict, pipeline.default_chunk_frames)
                    spans = strict.finish()
            except (HostSyncError, RuntimeError) as err:
                results.append(CheckResult(name, FAIL, f"{type(err).__name__}: {str(err).splitlines()[0]}"))
                continue
            results.append(CheckResult(name, PASS, f"{len(spans)} spans, no sync"))
        del pipeline
    return results


def _with_graphs(arm: ArmSettings) -> ArmSettings:
    from dataclasses import replace

    return replace(arm, cacher=replace(arm.cacher, cuda_graph=True))


def check_cuda_graphs(device: Device) -> list[CheckResult]:
    """A small fp16 SigLIP streamed one frame per call: graphs are captured and replayed with new
    inputs, every frame matches eager, and a second attach captures nothing new."""
    name = "CUDA graphs: SigLIP fp16, one frame per call"
    skipped = _gpu_only(name, device)
    if skipped:
        return [skipped]
    import stc
    from stc_bench.frameworks.parts import SIGLIP, build_siglip

    tower = build_siglip(SIGLIP["tiny"], device.torch_device, torch.float16, 0)
    clip = torch.randn(GRAPH_FRAMES, 3, SIGLIP["tiny"].image_size, SIGLIP["tiny"].image_size,
                       device=device.torch_device, dtype=torch.float16)

    def stream(config: stc.CacherConfig) -> tuple[torch.Tensor, stc.CacherHandle]:
        with torch.inference_mode(), stc.cacher_attached(tower, config) as handle:
            out = torch.cat([tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(GRAPH_FRAMES)])
        return out, handle

    config = stc.CacherConfig(update_ratio=0.25, cache_interval=2)
    eager, _ = stream(config)
    graphed, first = stream(stc.CacherConfig(update_ratio=0.25, cache_interval=2, cuda_graph=True))
    again, second = stream(stc.CacherConfig(update_ratio=0.25, cache_interval=2, cuda_graph=True))
    s1, s2 = first.graph_stats, second.graph_stats
    worst = float((graphed.float() - eager.float()).abs().amax(dim=(1, 2)).max())
    problems = []
    if s1.disabled_reason is not None:
        problems.append(f"fell back to eager: {s1.disabled_reason}")
    if s1.replays < GRAPH_FRAMES // 2:
        problems.append(f"only {s1.replays} replays")
    if s2.captures != s1.captures:
        problems.append(f"second attach captured {s2.captures - s1.captures} more graphs")
    if not math.isfinite(worst) or worst > FP16_TOLERANCE or not torch.equal(graphed, again):
        problems.append(f"max |graph - eager| {worst:.2e} (limit {FP16_TOLERANCE:.0e}) or replays differ")
    figure = f"{s1.captures} captures, {s2.replays} replays, max |graph - eager| {worst:.2e}"
    return [CheckResult(name, FAIL if problems else PASS, "; ".join(problems) or figure)]


def check_full_builds(device: Device) -> list[CheckResult]:
    """ReKV and LiveCC at full scale in fp16: all weights fp16, memory as expected, finite outputs."""
    if not device.is_cuda:
        return [CheckResult("full fp16 build: rekv, livecc", SKIP, "needs a CUDA device")]
    return [_full_build(framework, device) for framework in ("rekv", "livecc")]


def _full_build(framework: str, device: Device) -> CheckResult:
    name = f"full fp16 build: {framework}"
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device.torch_device)
    pipeline = get_framework(framework).build("full", device.torch_device, torch.float16, 0, None)
    params = {id(p): p for m in pipeline.modules() for p in m.parameters()}
    not_fp16 = sorted({str(p.dtype) for p in params.values() if p.dtype != torch.float16})
    weight_gb = sum(p.numel() * p.element_size() for p in params.values()) / 2**30
    held_gb = (torch.cuda.memory_allocated(device.torch_device) - before) / 2**30
    device.reset_peak_memory()
    clip = _clip(pipeline, 4, device, torch.float16)
    with torch.inference_mode():
        out = pipeline.stream(clip, _arms(framework)[0], StageTimer(device), pipeline.default_chunk_frames, capture=True)
    peak_gb = device.peak_memory_mb() / 1024
    finite = all(bool(torch.isfinite(t).all()) for t in (out.features, out.logits) if t is not None)
    del pipeline, params, out
    torch.cuda.empty_cache()
    problems = []
    if not_fp16:
        problems.append(f"weights in {', '.join(not_fp16)}")
    if held_gb > weight_gb * 1.05 + 0.25:
        problems.append(f"{held_gb:.1f} GiB held for {weight_gb:.1f} GiB of weights")
    if not finite:
        problems.append("non-finite features or logits")
    figure = f"weights {weight_gb:.2f} GiB fp16, held {held_gb:.2f} GiB, peak over a 4-frame stream {peak_gb:.2f} GiB"
    return CheckResult(name, FAIL if problems else PASS, "; ".join(problems) or figure)


def check_null_arm(device: Device, scale: str = "auto", frames: int = 8, repeats: int = 5,
                   frameworks: tuple[str, ...] | None = None) -> list[CheckResult]:
    """``--interval 1`` (every frame refreshes) against the baseline: the ViT reduction must be ~0."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import run_benchmark

    results = []
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        config = BenchConfig(framework=framework, scale=scale, device=_device_spec(device), frames=(frames,),
                             repeats=repeats, warmup=1, intervals=(1,))
        result = run_benchmark(config)
        reduction = result.reduction(result.points[0], "vit")
        status = PASS if abs(reduction.on_median) <= NULL_ARM_TOLERANCE else FAIL
        results.append(CheckResult(
            f"null arm (--interval 1): {framework} vit", status,
            f"reduction {reduction.on_median:+.1%} [{reduction.ci_low:+.1%}, {reduction.ci_high:+.1%}] "
            f"(limit ±{NULL_ARM_TOLERANCE:.0%}, {result.run['scale']}, {frames} frames, n={reduction.pairs})",
        ))
    return results


def _device_spec(device: Device) -> str:
    return "cpu" if not device.is_cuda else f"cuda:{device.torch_device.index or 0}"


def check_launch_bound(device: Device, scale: str = "auto", frameworks: tuple[str, ...] | None = None) -> list[CheckResult]:
    """Per framework and arm: the sum of spans, the synchronised wall time of the pass, and how
    much of it the host spent enqueueing work; on CUDA, a pass whose enqueue time nearly equals
    its wall time is launch-bound (the GPU waits for the host)."""
    from stc_bench.runner import choose_scale

    results = []
    dtype = torch.float16 if device.is_cuda else torch.float32
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        from stc_bench.config import BenchConfig

        chosen, _ = choose_scale(BenchConfig(framework=framework, scale=scale), device)
        pipeline = get_framework(framework).build(chosen, device.torch_device, dtype, 0, None)
        clip = _clip(pipeline, 8, device, dtype)
        for arm in _arms(framework):
            timer = StageTimer(device)
            with torch.inference_mode():
                pipeline.stream(clip, arm, timer, pipeline.default_chunk_frames)
                timer.finish()
                device.synchronize()
                start = time.perf_counter_ns()
                pipeline.stream(clip, arm, timer, pipeline.default_chunk_frames)
                host_ms = (time.perf_counter_ns() - start) / 1e6
                spans = timer.finish()
                wall_ms = (time.perf_counter_ns() - start) / 1e6
            span_ms = sum(s.ms for s in spans)
            verdict = ""
            if device.is_cuda:
                verdict = "; launch-bound: raise --chunk-frames or use --cuda-graph" if host_ms >= LAUNCH_BOUND_SHARE * wall_ms \
                    else "; GPU-bound"
            results.append(CheckResult(f"spans vs wall: {framework} {arm.label}", INFO,
                                       f"spans {span_ms:.1f} ms, wall {wall_ms:.1f} ms, host enqueue {host_ms:.1f} ms"
                                       f" ({chosen}){verdict}"))
        del pipeline
    return results


def check_clocks(device: Device, when: str) -> CheckResult:
    """The GPU's clocks, temperature and power as ``nvidia-smi`` reports them (before or after)."""
    from stc_bench.env import gpu_state

    if not device.is_cuda:
        return CheckResult(f"GPU clocks {when}", SKIP, "needs a CUDA device")
    state = gpu_state(device) or {}
    shown = ", ".join(f"{k} {v}" for k, v in state.items() if k != "processes") or "nvidia-smi gave nothing"
    return CheckResult(f"GPU clocks {when}", INFO, shown)


def run_checks(device: Device, scale: str = "auto", on_check: Callable[[str], None] | None = None) -> Iterator[CheckResult]:
    """Every check for ``device`` (the CPU subset without CUDA), in order, as each finishes."""
    say = on_check or (lambda _: None)
    steps: list[tuple[str, Callable[[], list[CheckResult]]]] = [
        ("GPU clocks", lambda: [check_clocks(device, "before")]),
        ("timer", lambda: check_timer(device)),
        ("host syncs", lambda: check_no_host_syncs(device)),
        ("CUDA graphs", lambda: check_cuda_graphs(device)),
        ("full builds", lambda: check_full_builds(device)),
        ("null arm", lambda: check_null_arm(device, scale)),
        ("launch-bound", lambda: check_launch_bound(device, scale)),
        ("GPU clocks", lambda: [check_clocks(device, "after")]),
    ]
    for label, step in steps:
        say(label)
        yield from step()
