"""``stc-bench doctor``: a self-check of the measurement path on this machine.

Each check runs the real code path (timer, frameworks, cacher, runner) and returns a
``CheckResult`` with a status and the figure it was judged on. On a CUDA device every check
runs; without one, the CPU subset runs (the no-sync check through the patched tensor methods,
the null arm, the span-versus-wall figure) and the GPU-only checks say they were skipped. The
``gpu``-marked tests call the same functions, so ``pytest -m gpu`` and ``doctor`` agree.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from stc.integrations.hf_vit import cuda_graphs_refused
from stc_bench.device import Device, HostSyncError
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.launches import PREQUEUE_HEAD_START, prequeued_pass, sleep_cycles_per_ms, sleep_on
from stc_bench.measurement import launch_verdict
from stc_bench.timing import StageTimer, wall_clock_ms

if TYPE_CHECKING:
    from stc.cacher.graph import GraphStats
    from stc.flops import LLMShape
    from stc_bench.frameworks.framework import Pipeline
    from stc_bench.methods.method import Arm, HookSite

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"

TIMER_TOLERANCE = 0.10
"""A known-length kernel timed by ``StageTimer`` must agree with synchronised wall time this closely."""
SLEEP_MS = 50.0
"""Length of the known-length kernel."""
NULL_ARM_TOLERANCE = 0.03
"""``--interval 1`` must measure a ViT reduction within this of zero."""
STRICT_FRAMES = 12
"""Frames of the no-sync check: enough for LiveCC's 6-frame first step followed by one-group
steps that read the stored reference, and for several calls of every other framework."""
STRICT_CHUNK_FRAMES = {"dispider": 4}
"""Frames per call in the no-sync check where the framework's own chunk (Dispider: 16) would
make the whole clip one call, leaving the later-call paths unchecked."""
GRAPH_FRAMES = 10
"""Frames of the CUDA-graph check, streamed one per call."""
FP16_TOLERANCE = 2e-2
"""Largest absolute difference allowed between graph replay and eager in fp16."""
FULL_BUILD_FRAMES = 8
"""Frames streamed through each full build (LiveCC: its 6-frame first step, then one more)."""


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


def _arms(framework: str, site: HookSite) -> list[Arm]:
    """The arms of a default run of ``framework`` on ``site``: the baseline, then +STC."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import arms_of

    return arms_of(BenchConfig(framework=framework), site)


def _with_graphs(arm: Arm) -> Arm:
    """The same STC arm with CUDA-graph replay on."""
    from stc_bench.methods import get_method

    return get_method("stc").arm(**{**dict(arm.knobs), "cuda_graph": True})


def _uses_graphs(arm: Arm) -> bool:
    return bool(dict(arm.knobs).get("cuda_graph", False))


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
    # The chosen device stays current throughout, as in a run; the second GPU is timed while it
    # is not current, so a timer that records on the current device instead of its own fails.
    with device.activate():
        return [_time_sleep_kernel(d) for d in devices]


def _time_sleep_kernel(device: Device) -> CheckResult:
    current = torch.cuda.current_device()
    where = "" if current == device.torch_device.index else f", timed while cuda{current} is current"
    name = f"timer vs wall clock ({device.label}{where})"
    cycles = int(sleep_cycles_per_ms(device) * SLEEP_MS)
    timer = StageTimer(device)
    timer.reserve(1)
    ratios = []
    for _ in range(5):
        spans: list = []

        def timed():
            with timer.span("sleep", 0):
                sleep_on(device, cycles)
            spans.extend(timer.finish())

        wall = wall_clock_ms(device, timed)
        ratios.append(spans[0].ms / wall)
    ratio = statistics.median(ratios)
    status = PASS if abs(1 - ratio) <= TIMER_TOLERANCE else FAIL
    return CheckResult(name, status, f"span/wall {ratio:.3f} on a {SLEEP_MS:.0f} ms kernel (limit ±{TIMER_TOLERANCE:.0%})")


def check_no_host_syncs(device: Device, scale: str = "tiny", frameworks: tuple[str, ...] | None = None,
                        graphs: bool | None = None) -> list[CheckResult]:
    """One untimed pass, then one strict pass whose spans forbid host syncs, per framework and arm;
    with ``graphs`` (default: on CUDA) also per STC arm with CUDA graphs, which must replay the
    graphs the untimed pass captured (no capture, no eager fallback in the strict pass). Towers
    that offer no graphs (Qwen2-VL) get a SKIP line for their graphs arm."""
    results = []
    dtype = torch.float16 if device.is_cuda else torch.float32
    with_graphs = device.is_cuda if graphs is None else graphs
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        pipeline = get_framework(framework).build(scale, device.torch_device, dtype, 0, None)
        clip = _clip(pipeline, STRICT_FRAMES, device, dtype)
        chunk_frames = STRICT_CHUNK_FRAMES.get(framework, pipeline.default_chunk_frames)
        arms = _arms(framework, pipeline.site)
        if with_graphs:
            arms += [_with_graphs(a) for a in arms if a.method == "stc"]
        for arm in arms:
            graphed = _uses_graphs(arm)
            name = f"no host sync in spans: {framework} {arm.label}{' graphs' if graphed else ''}"
            refused = cuda_graphs_refused(pipeline.site.tower_kind) if graphed else None
            if refused is not None:
                results.append(CheckResult(name, SKIP, f"CUDA-graph replay is {refused}"))
                continue
            results.append(_strict_pass(name, pipeline, clip, arm, device, chunk_frames, graphed))
        del pipeline
    return results


def _strict_pass(name: str, pipeline: Pipeline, clip: torch.Tensor, arm: Arm, device: Device, chunk_frames: int,
                 graphed: bool) -> CheckResult:
    timer = StageTimer(device)
    try:
        with torch.inference_mode():
            # Untimed first, as the runner's prepare pass: graph captures, index tensors on the
            # device and the timer's events belong here; the strict pass then reuses the timer.
            prepared = pipeline.stream(clip, arm, timer, chunk_frames)
            timer.finish()
            timer.forbid_syncs = True
            strict = pipeline.stream(clip, arm, timer, chunk_frames)
            spans = timer.finish()
    except (HostSyncError, RuntimeError) as err:
        return CheckResult(name, FAIL, f"{type(err).__name__}: {str(err).splitlines()[0]}")
    figure = f"{len(spans)} spans, {clip.shape[0]} frames, --chunk-frames {chunk_frames}, no sync"
    if not graphed:
        return CheckResult(name, PASS, figure)
    problems, replays = graph_use_problems(getattr(prepared, "graph_stats", None), getattr(strict, "graph_stats", None))
    if problems:
        return CheckResult(name, FAIL, "; ".join(problems))
    return CheckResult(name, PASS, f"{figure}, {replays} graph replays, no capture")


def graph_use_problems(before: GraphStats | None, after: GraphStats | None) -> tuple[list[str], int]:
    """What is wrong with a timed pass of a graphs arm, judged by the tower's graph statistics
    right before and right after it: it must replay graphs, capture none (capturing synchronises
    and empties the cache inside a span) and not have fallen back to eager. Returns the problems
    (empty when none) and the replays of the pass."""
    if before is None or after is None:
        return ["the stream reported no graph_stats, so whether graphs ran cannot be told"], 0
    problems = []
    if after.disabled_reason is not None:
        problems.append(f"ran eager: {after.disabled_reason}")
    captured = after.captures - before.captures
    if captured:
        problems.append(f"{captured} graphs captured in the timed pass (capture belongs in the untimed prepare pass)")
    replays = after.replays - before.replays
    if replays <= 0 and after.disabled_reason is None:
        problems.append("no graph replayed in the timed pass")
    return problems, replays


def check_cuda_graphs(device: Device) -> list[CheckResult]:
    """A small fp16 SigLIP streamed one frame per call: the first graphed stream captures, the
    second (a new attach, under ``no_grad`` instead of ``inference_mode``) captures nothing new;
    both replay once per selective frame and layer, never run eager, match eager frame by frame
    and equal each other."""
    name = "CUDA graphs: SigLIP fp16, one frame per call"
    skipped = _gpu_only(name, device)
    if skipped:
        return [skipped]
    import stc
    from stc_bench.frameworks.parts import SIGLIP, build_siglip

    shape = SIGLIP["tiny"]
    tower = build_siglip(shape, device.torch_device, torch.float16, 0)
    layers = len(stc.integrations.find_vision_layers(tower)[1])
    generator = torch.Generator(device=device.torch_device).manual_seed(0)
    clip = torch.randn(GRAPH_FRAMES, 3, shape.image_size, shape.image_size, device=device.torch_device,
                       dtype=torch.float16, generator=generator)
    ratio, interval = 0.25, 2
    expected = sum(1 for i in range(GRAPH_FRAMES) if i % interval) * layers  # selective frames x layers

    def stream(cuda_graph: bool, mode: Callable) -> tuple[torch.Tensor, tuple[int, int, int, str | None]]:
        """Frame by frame through a fresh attach; what the tower's graphs did in this stream alone
        (the graphs outlive the handle, so their counts are read right before and after)."""
        config = stc.CacherConfig(update_ratio=ratio, cache_interval=interval, cuda_graph=cuda_graph)
        with mode(), stc.cacher_attached(tower, config) as handle:
            start = handle.graph_stats
            out = torch.cat([tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(GRAPH_FRAMES)])
            end = handle.graph_stats
        if end is None:
            return out, (0, 0, 0, None)
        return out, (end.captures - start.captures, end.replays - start.replays, end.eager_calls - start.eager_calls,
                     end.disabled_reason)

    try:
        eager, _ = stream(False, torch.inference_mode)
        graphed, first = stream(True, torch.inference_mode)
        # no_grad, not inference_mode: replaying graphs whose static buffers are inference
        # tensors from outside inference mode is the case that must not raise.
        again, second = stream(True, torch.no_grad)
    except RuntimeError as err:
        return [CheckResult(name, FAIL, f"{type(err).__name__}: {str(err).splitlines()[0]}")]
    per_frame = (graphed.float() - eager.float()).abs().amax(dim=(1, 2))
    worst_frame = int(per_frame.argmax())
    worst = float(per_frame[worst_frame])
    problems = []
    for label, (captures, replays, eager_calls, disabled) in (("first", first), ("second", second)):
        if disabled is not None:
            problems.append(f"{label} stream fell back to eager: {disabled}")
        if eager_calls:
            problems.append(f"{label} stream ran {eager_calls} selective forwards eager")
        if replays != expected:
            problems.append(f"{label} stream replayed {replays} times, expected {expected}")
    if first[0] == 0:
        problems.append("first stream captured no graph")
    if second[0]:
        problems.append(f"second attach captured {second[0]} more graphs")
    if not math.isfinite(worst) or worst > FP16_TOLERANCE:
        problems.append(f"frame {worst_frame}: max |graph - eager| {worst:.2e} (limit {FP16_TOLERANCE:.0e})")
    if not torch.equal(graphed, again):
        problems.append("the two graphed streams differ")
    figure = (f"{first[0]} captures then 0, {first[1]} and {second[1]} replays (= {expected // layers} selective "
              f"frames x {layers} layers), worst frame max |graph - eager| {worst:.2e}, second stream (no_grad) identical")
    return [CheckResult(name, FAIL if problems else PASS, "; ".join(problems) or figure)]


def check_full_builds(device: Device) -> list[CheckResult]:
    """ReKV and LiveCC at full scale in fp16: all weights fp16 on the device, memory as expected,
    finite outputs, the stream's peak beside its KV-cache estimate."""
    if not device.is_cuda:
        return [CheckResult("full fp16 build: rekv, livecc", SKIP, "needs a CUDA device")]
    return [_full_build(framework, device) for framework in ("rekv", "livecc")]


def kv_cache_gib(llm: LLMShape, tokens: int, bytes_per_value: int) -> float:
    """Keys and values of ``tokens`` positions in every layer: 2 x layers x KV heads x head width
    x tokens x bytes, in GiB."""
    head_dim = llm.width // llm.heads
    return 2 * llm.layers * llm.kv_heads * head_dim * tokens * bytes_per_value / 2**30


def _full_build(framework: str, device: Device) -> CheckResult:
    name = f"full fp16 build: {framework}"
    gib = 2**30
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device.torch_device)
    # Reset before building, so a transient copy made while building (weights made in fp32 and
    # cast, a second copy on the way to the device) shows in the build's peak.
    device.reset_peak_memory()
    pipeline = out = params = None
    doing = "building"
    try:
        pipeline = get_framework(framework).build("full", device.torch_device, torch.float16, 0, None)
        build_peak = device.peak_memory_mb() * 2**20 - before
        params = {id(p): p for m in pipeline.modules() for p in m.parameters()}
        not_fp16 = sorted({str(p.dtype).removeprefix("torch.") for p in params.values() if p.dtype != torch.float16})
        elsewhere = sorted({str(p.device) for p in params.values() if p.device != device.torch_device})
        weights = sum(p.numel() * p.element_size() for p in params.values())
        held = torch.cuda.memory_allocated(device.torch_device) - before
        device.reset_peak_memory()
        doing = f"streaming {FULL_BUILD_FRAMES} frames"
        clip = _clip(pipeline, FULL_BUILD_FRAMES, device, torch.float16)
        baseline = _arms(framework, pipeline.site)[0]
        with torch.inference_mode():
            out = pipeline.stream(clip, baseline, StageTimer(device), pipeline.default_chunk_frames, capture=True)
        stream_peak = device.peak_memory_mb() * 2**20 - before
        finite = all(bool(torch.isfinite(t).all()) for t in (out.features, out.logits) if t is not None)
        llm = getattr(getattr(pipeline, "shape", None), "llm", None)
        tokens = sum(out.llm_steps)
        kv = kv_cache_gib(llm, tokens, torch.float16.itemsize) if llm is not None else None
    except torch.cuda.OutOfMemoryError as err:
        oom = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    else:
        oom = None
    finally:
        pipeline = out = params = None
        gc.collect()
        torch.cuda.empty_cache()
    if oom is not None:  # a FAIL line, not a traceback; the next check starts from freed memory
        free, total = torch.cuda.mem_get_info(device.torch_device)
        return CheckResult(name, FAIL, f"out of memory while {doing} the full fp16 build ({free / gib:.1f} of "
                                       f"{total / gib:.1f} GiB free once released): {oom}")
    problems = []
    if not_fp16:
        problems.append(f"weights in {', '.join(not_fp16)}")
    if elsewhere:
        problems.append(f"weights on {', '.join(elsewhere)}, not {device.torch_device}")
    if held > weights * 1.05 + 0.25 * gib:
        problems.append(f"{held / gib:.2f} GiB held for {weights / gib:.2f} GiB of weights")
    if held < weights * 0.95 - 0.25 * gib:
        problems.append(f"only {held / gib:.2f} GiB held on {device.torch_device} for {weights / gib:.2f} GiB of "
                        "weights: the weights live elsewhere")
    if build_peak > held * 1.25 + 0.5 * gib:
        problems.append(f"building peaked at {build_peak / gib:.2f} GiB for {held / gib:.2f} GiB held (a transient copy)")
    if not finite:
        problems.append("non-finite features or logits")
    kv_text = f" (weights + KV estimate {kv:.3f} GiB for {tokens} tokens)" if kv is not None else ""
    figure = (f"weights {weights / gib:.2f} GiB fp16 on {device.torch_device}, held {held / gib:.2f} GiB, "
              f"build peak {build_peak / gib:.2f} GiB, peak over a {FULL_BUILD_FRAMES}-frame stream "
              f"{stream_peak / gib:.2f} GiB{kv_text}")
    return CheckResult(name, FAIL if problems else PASS, "; ".join(problems) or figure)


def check_null_arm(device: Device, scale: str = "auto", frames: int = 8, repeats: int = 5,
                   frameworks: tuple[str, ...] | None = None) -> list[CheckResult]:
    """``--interval 1`` (every frame refreshes) against the baseline: the ViT reduction must be ~0."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import run_benchmark

    results = []
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        name = f"null arm (--interval 1): {framework} vit"
        config = BenchConfig(framework=framework, scale=scale, device=_device_spec(device), frames=(frames,),
                             repeats=repeats, warmup=1, intervals=(1,))
        result = run_benchmark(config)
        reduction = result.reduction(result.compared[0], "vit") if result.compared else None
        if reduction is None:
            results.append(CheckResult(name, FAIL, "no ViT measurement of the null arm"))
            continue
        status = PASS if abs(reduction.on_median) <= NULL_ARM_TOLERANCE else FAIL
        results.append(CheckResult(
            name, status,
            f"reduction {reduction.on_median:+.1%} [{reduction.ci_low:+.1%}, {reduction.ci_high:+.1%}] "
            f"(limit ±{NULL_ARM_TOLERANCE:.0%}, {result.run['scale']}, {frames} frames, n={reduction.pairs})",
        ))
    return results


def _device_spec(device: Device) -> str:
    return "cpu" if not device.is_cuda else f"cuda:{device.torch_device.index or 0}"


def check_launch_bound(device: Device, scale: str = "auto", frameworks: tuple[str, ...] | None = None) -> list[CheckResult]:
    """Per framework and arm: the sum of spans and the synchronised wall time of a pass. On CUDA
    also the span sum of the same pass enqueued behind a sleep kernel (GPU time with no launch
    waits), and a verdict: launch-bound when the normal spans take much longer (``launch_verdict``).
    Host enqueue time alone cannot tell: it nears the wall time both when the GPU waits for
    launches and when a busy GPU fills the launch queue and blocks the host."""
    from stc_bench.config import BenchConfig
    from stc_bench.runner import choose_scale

    results = []
    dtype = torch.float16 if device.is_cuda else torch.float32
    cycles_per_ms = sleep_cycles_per_ms(device) if device.is_cuda else 0.0
    for framework in frameworks or tuple(FRAMEWORK_MODULES):
        chosen, _ = choose_scale(BenchConfig(framework=framework, scale=scale), device)
        pipeline = get_framework(framework).build(chosen, device.torch_device, dtype, 0, None)
        clip = _clip(pipeline, 8, device, dtype)
        for arm in _arms(framework, pipeline.site):
            figure = _spans_vs_wall(pipeline, clip, arm, device, pipeline.default_chunk_frames, cycles_per_ms)
            results.append(CheckResult(f"spans vs wall: {framework} {arm.label}", INFO, f"{figure} ({chosen})"))
        del pipeline
    return results


def _spans_vs_wall(pipeline: Pipeline, clip: torch.Tensor, arm: Arm, device: Device, chunk_frames: int,
                   cycles_per_ms: float) -> str:
    """The launch-bound figure of one arm: span sum and wall time of a pass (and, on CUDA, the
    span sum pre-queued behind a sleep kernel, with the verdict)."""
    timer = StageTimer(device)
    spans: list = []

    def one_pass():
        pipeline.stream(clip, arm, timer, chunk_frames)
        spans.extend(timer.finish())

    with torch.inference_mode():
        pipeline.stream(clip, arm, timer, chunk_frames)  # untimed: one-time work
        timer.finish()
        wall_ms = wall_clock_ms(device, one_pass)
        span_ms = sum(s.ms for s in spans)
        figure = f"spans {span_ms:.1f} ms, wall {wall_ms:.1f} ms"
        if not device.is_cuda:
            return figure  # a CPU runs each op as it is issued: there is no launch queue to judge
        head_start_ms = PREQUEUE_HEAD_START * wall_ms
        stages, enqueue_ms = prequeued_pass(pipeline, clip, arm, timer, chunk_frames, device,
                                            int(head_start_ms * cycles_per_ms))
        prequeued_ms = sum(stages.values())
    return f"{figure}, pre-queued spans {prequeued_ms:.1f} ms; {launch_verdict(span_ms, prequeued_ms, enqueue_ms, head_start_ms)}"


def check_clocks(device: Device, when: str) -> CheckResult:
    """The GPU's clocks, temperature and power as ``nvidia-smi`` reports them (before or after)."""
    from stc_bench.env import gpu_state

    if not device.is_cuda:
        return CheckResult(f"GPU clocks {when}", SKIP, "needs a CUDA device")
    state = gpu_state(device) or {}
    shown = ", ".join(f"{k} {v}" for k, v in state.items() if k != "processes") or "nvidia-smi gave nothing"
    return CheckResult(f"GPU clocks {when}", INFO, shown)


def run_checks(device: Device, scale: str = "auto", on_check: Callable[[str], None] | None = None) -> Iterator[CheckResult]:
    """Every check for ``device`` (the CPU subset without CUDA), in order, as each finishes, with
    ``device`` the current device throughout (as in a run: ``--gpu N`` checks GPU N)."""
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
    with device.activate():
        for label, step in steps:
            say(label)
            yield from step()
