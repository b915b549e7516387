"""The toy framework that the machinery tests run on: it must keep the contract of a real one."""

import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.measurement import BASELINE
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

STC = get_method("stc").arm()


def stream(pipeline, arm, frames=4):
    clip = torch.randn(frames, 3, pipeline.image_size, pipeline.image_size)
    timer = StageTimer(resolve_device("cpu"))
    with torch.inference_mode():
        out = pipeline.stream(clip, arm, timer, pipeline.default_chunk_frames, capture=True)
    return out, timer.finish()


def test_the_toy_is_registered_by_its_fixture_only():
    assert "toy" not in FRAMEWORK_MODULES  # the registry's own tests, and stc-bench list, see the real frameworks


def test_the_toy_has_a_few_hundred_parameters(toy):
    assert FRAMEWORK_MODULES[toy] == "tests.stc_bench.toy_framework"
    pipeline = get_framework(toy).build("tiny", torch.device("cpu"), torch.float32, 0)
    assert sum(p.numel() for m in pipeline.modules() for p in m.parameters()) < 1000


def test_the_toy_streams_every_stage_and_both_hook_points(toy):
    pipeline = get_framework(toy).build("tiny", torch.device("cpu"), torch.float32, 0)
    base, spans = stream(pipeline, BASELINE)
    assert [s.stage for s in spans] == ["vit", "compress", "prefill"] * 4
    assert base.tokens == {"vit": 400, "compress": 400, "prefill": 400} and base.llm_steps == [100] * 4
    assert base.chunk_kinds == ["full"] * 4 and base.features.shape == (4, 100, 4) and base.logits.shape == (4, 8)
    cached, _ = stream(pipeline, STC)
    assert cached.tokens == {"vit": 400, "compress": 256, "prefill": 256}  # STC-Pruner keeps 64 of 100 per frame
    assert cached.chunk_kinds == ["refresh", "selective", "refresh", "selective"]  # STC-Cacher, through its integration
    assert cached.cacher_stats.recompute_fraction == (2 * 100 + 2 * 25) / 400


def test_the_toy_macs_follow_the_flop_model(toy):
    pipeline = get_framework(toy).build("tiny", torch.device("cpu"), torch.float32, 0)
    base, _ = stream(pipeline, BASELINE)
    cached, _ = stream(pipeline, STC)
    full, fewer = pipeline.macs(4, BASELINE, 1, base), pipeline.macs(4, STC, 1, cached)
    assert fewer["vit"] < full["vit"] and fewer["compress"] == full["compress"]  # the projector sees every ViT token
    assert fewer["prefill"] * 100 == full["prefill"] * 64
