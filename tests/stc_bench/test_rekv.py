"""ReKV pipeline: token counts per stage at every scale, streaming behaviour, MAC model."""

import pytest
import torch

import stc
from stc_bench.device import resolve_device
from stc_bench.frameworks import get_framework
from stc_bench.frameworks.framework import method_stream
from stc_bench.frameworks.rekv import SHAPES, build, pool_2x2_bilinear
from stc_bench.measurement import BASELINE
from stc_bench.methods import get_method
from stc_bench.methods.method import MethodStream
from stc_bench.timing import StageTimer

STC_ARM = get_method("stc").arm(ratio=0.25, interval=2, tokens_per_frame=64)


@pytest.mark.parametrize("scale", ["full", "small", "tiny"])
def test_token_counts_729_196_64_at_every_scale(scale):
    """Full is built on the meta device: shapes propagate, nothing is computed or allocated."""
    device = torch.device("meta") if scale == "full" else torch.device("cpu")
    pipeline = build(scale, device, torch.float32, seed=0)
    size = SHAPES[scale].tower.image_size
    clip = torch.zeros(2, 3, size, size, device=device)
    with torch.inference_mode():
        features = pipeline.encode(clip)
        assert features.shape == (2, 729, SHAPES[scale].tower.width)
        assert pipeline.compress(features, MethodStream()).shape == (1, 2 * 196, SHAPES[scale].llm.width)  # one step's sequence
        pruning = method_stream(STC_ARM, pipeline.site)
        assert pipeline.compress(features, pruning).shape == (1, 2 * 64, SHAPES[scale].llm.width)
        with stc.cacher_attached(pipeline.vision_tower, stc.CacherConfig(update_ratio=0.25)) as handle:
            pipeline.encode(clip)
        assert handle.stats.recomputed_tokens == (729 + 182,) * SHAPES[scale].tower.layers


def test_full_scale_is_the_exact_llava_onevision_7b():
    t, m = SHAPES["full"].tower, SHAPES["full"].llm
    assert (t.width, t.mlp, t.layers, t.heads, t.image_size, t.patch_size) == (1152, 4304, 26, 16, 384, 14)
    assert (m.width, m.mlp_width, m.layers, m.heads, m.kv_heads, m.vocab) == (3584, 18944, 28, 28, 4, 152064)
    pipeline = build("full", torch.device("meta"), torch.float16, seed=0)
    assert sum(p.numel() for p in pipeline.vision_tower.parameters()) == pytest.approx(0.40e9, rel=0.03)
    llm = sum(p.numel() for p in pipeline.llm.decoder.parameters()) + pipeline.llm.lm_head.weight.numel()
    assert llm == pytest.approx(7.6e9, rel=0.02)


@pytest.mark.tier1
def test_pooling_matches_transformers_apply_pooling():
    from transformers import LlavaOnevisionConfig, SiglipVisionConfig
    from transformers.models.llava_onevision import modeling_llava_onevision as modeling

    # apply_pooling lives on LlavaOnevisionModel from transformers 4.52, on the generation model before.
    owner = getattr(modeling, "LlavaOnevisionModel", modeling.LlavaOnevisionForConditionalGeneration)
    config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(image_size=54, patch_size=2).to_dict())
    features = torch.randn(3, 729, 8)
    expected = owner.apply_pooling(type("M", (), {"config": config})(), features)
    assert torch.equal(pool_2x2_bilinear(features, 27), expected)


def test_stream_counts_tokens_and_cacher_kinds_per_chunk():
    pipeline = get_framework("rekv").build("tiny", torch.device("cpu"), torch.float32, 0)
    clip = torch.randn(5, 3, 54, 54)
    timer = StageTimer(resolve_device("cpu"))
    with torch.inference_mode():
        out = pipeline.stream(clip, STC_ARM, timer, chunk_frames=2, capture=True)
    spans = timer.finish()
    assert [s.stage for s in spans] == ["vit", "compress", "prefill"] * 3
    assert out.tokens == {"vit": 5 * 729, "compress": 5 * 64, "prefill": 5 * 64}
    assert out.chunk_kinds == ["mixed", "mixed", "refresh"]
    assert out.features.shape == (5, 729, 32) and out.logits.shape == (8, 512)


def test_every_stream_starts_fresh():
    pipeline = get_framework("rekv").build("tiny", torch.device("cpu"), torch.float32, 0)
    clip = torch.randn(3, 3, 54, 54)
    device = resolve_device("cpu")
    with torch.inference_mode():
        first = pipeline.stream(clip, STC_ARM, StageTimer(device), 1, capture=True)
        second = pipeline.stream(clip, STC_ARM, StageTimer(device), 1, capture=True)
    assert torch.equal(first.features, second.features) and torch.equal(first.logits, second.logits)
    assert "_stc_handle" not in pipeline.vision_tower.__dict__


def test_macs_follow_the_flop_model():
    pipeline = build("tiny", torch.device("cpu"), torch.float32, 0)
    clip = torch.randn(16, 3, 54, 54)
    with torch.inference_mode():
        base_out = pipeline.stream(clip, BASELINE, StageTimer(resolve_device("cpu")), 1)
        stc_out = pipeline.stream(clip, STC_ARM, StageTimer(resolve_device("cpu")), 1)
    base = pipeline.macs(16, BASELINE, 1, base_out)
    new = pipeline.macs(16, STC_ARM, 1, stc_out)
    assert base["compress"] == new["compress"] > 0                  # the projector: same tokens leave the tower
    assert new["vit"] / base["vit"] < 0.7 and new["prefill"] / base["prefill"] < 64 / 196 + 0.05
