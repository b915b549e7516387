"""StreamForest, Dispider and LiveCC pipelines: architecture, token counts, streaming protocol."""

import pytest
import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import FRAMEWORK_HELP, FRAMEWORK_MODULES, get_framework
from stc_bench.frameworks.livecc import SHAPES as LIVECC
from stc_bench.frameworks.livecc import patchify
from stc_bench.frameworks.streamforest import memory_tokens, merge_tokens
from stc_bench.measurement import BASELINE as BASE
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

CACHER = get_method("stc").arm()


def run(framework: str, frames: int, arm=CACHER, chunk=None):
    pipeline = get_framework(framework).build("tiny", torch.device("cpu"), torch.float32, 0)
    clip = torch.randn(frames, 3, pipeline.image_size, pipeline.image_size)
    timer = StageTimer(resolve_device("cpu"))
    with torch.inference_mode():
        out = pipeline.stream(clip, arm, timer, chunk or pipeline.default_chunk_frames, capture=True)
    return pipeline, out, timer.finish()


def test_every_framework_is_registered_with_help():
    assert set(FRAMEWORK_MODULES) == set(FRAMEWORK_HELP) == {"rekv", "streamforest", "dispider", "livecc"}
    for name in FRAMEWORK_MODULES:
        placed = {"72b"} if name == "rekv" else set()  # LLaVA-OV-72B, with --device-map auto (test_device_map)
        assert set(get_framework(name).presets) == {"full", "small", "tiny"} | placed


def test_full_towers_have_the_published_sizes():
    """Built on the meta device: parameter counts without allocating anything."""
    meta = torch.device("meta")
    clip_l = get_framework("dispider").build("full", meta, torch.float16).vision_tower
    assert sum(p.numel() for p in clip_l.parameters()) == pytest.approx(0.30e9, rel=0.03)
    qwen_vit = get_framework("livecc").build("full", meta, torch.float16).vision_tower
    assert sum(p.numel() for p in qwen_vit.parameters()) == pytest.approx(0.67e9, rel=0.03)
    assert LIVECC["full"].vision.tokens == 1024 and LIVECC["full"].vision.merged_tokens == 256


def test_memory_merge_keeps_the_target_count_and_size_weighted_means():
    x = torch.randn(729, 16)
    assert merge_tokens(x, 128).shape == (128, 16) and merge_tokens(x, 800).shape == (729, 16)
    same = torch.ones(10, 4)
    assert torch.allclose(merge_tokens(same, 3), torch.ones(3, 4))


def test_streamforest_memory_budgets():
    frames = [torch.randn(729, 8) for _ in range(5)]
    assert memory_tokens(frames).shape[0] == 729 + 4 * 128
    long = [torch.randn(729, 8) for _ in range(30)]  # 29 older frames: events split off at 26
    count = memory_tokens(long).shape[0]
    # a frames moved to long-term memory (64 tokens each), at most 25 left in short-term (128 each)
    assert count in {729 + 128 * (29 - a) + 64 * a for a in range(4, 17)}


def test_streamforest_streams_frames_one_by_one_then_answers_once():
    pipeline, out, spans = run("streamforest", 5)
    assert [s.stage for s in spans] == ["vit"] * 5 + ["compress", "prefill"]
    assert out.tokens == {"vit": 5 * 729, "compress": 729 + 4 * 128, "prefill": 729 + 4 * 128 + 32}
    assert out.chunk_kinds == ["refresh", "selective", "refresh", "selective", "refresh"]
    base = pipeline.macs(5, BASE, 1, out)
    cached = pipeline.macs(5, CACHER, 1, out)
    assert base["prefill"] == cached["prefill"] and base["compress"] == cached["compress"] > 0


def test_dispider_runs_clips_of_16_with_cls_always_recomputed():
    pipeline, out, spans = run("dispider", 20)
    assert [s.stage for s in spans] == ["vit", "vit"]              # 16 + 4 frames
    assert out.tokens == {"vit": 20 * 257} and out.features.shape == (20, 256, 32)
    stats = out.cacher_stats
    assert stats.calls[0].recomputed_tokens[0] == 8 * 257 + 8 * (64 + 1)  # floor(0.25*256) + CLS


def test_livecc_streams_six_frames_then_two_per_step():
    pipeline, out, spans = run("livecc", 10)
    assert pipeline.steps(10, 2) == [(0, 6), (6, 8), (8, 10)]
    assert [s.stage for s in spans] == ["vit", "prefill"] * 3
    assert out.tokens == {"vit": 5 * 256, "prefill": 3 * 12 + 5 * 64}
    assert out.chunk_kinds == ["mixed", "selective", "refresh"]    # groups 0-2, 3, 4
    assert out.logits.shape == (8, 512)


def test_patchify_is_merge_window_major():
    frames = torch.zeros(2, 3, 8, 8)
    for y in range(8):
        for x in range(8):
            frames[:, 0, y, x] = 10 * (y // 2) + (x // 2)            # channel 0 encodes the patch (row, col)
    pixels, grid = patchify(frames, patch=2)
    assert grid.tolist() == [[1, 4, 4]] and pixels.shape == (16, 3 * 2 * 2 * 2)
    first = pixels[:, 0].tolist()                                    # channel 0, frame 0, pixel (0, 0) of each patch
    assert first[:8] == [0, 1, 10, 11, 2, 3, 12, 13]                # two 2x2 windows, each four consecutive tokens


@pytest.mark.slow
@pytest.mark.tier1
@pytest.mark.parametrize("framework", ["streamforest", "dispider", "livecc"])
def test_each_command_runs_end_to_end(cli, tmp_path, framework):
    result = cli(framework, "--scale", "tiny", "--frames", "4", "--repeats", "3", "--warmup", "1", "--device", "cpu",
                 "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (folder,) = list(tmp_path.iterdir())
    assert folder.name.endswith(f"_{framework}_cpu")
    assert (folder / "report.md").is_file() and (folder / "reductions.csv").is_file()
    assert "uses STC-Cacher only" in (folder / "report.md").read_text()
