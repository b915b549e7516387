"""STC-Cacher attached to a whole vision-language model (tiny LLaVA-OneVision and Qwen2-VL):
images pass through unpatched, one video per call is streamed, several are refused."""

import inspect

import pytest
import torch

import stc
from stc import CacherConfig
from tests.conftest import TINY_VIT, build_tiny_tower, moving_clip, noisy_clip

pytestmark = pytest.mark.tier1

IDS_PER_VIDEO = ("this {owner}.get_video_features call holds 2 videos but handle.streams() named 3 stream ids: "
                 "around a whole model, give one id per video")

SELECT = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")  # transformers 4.x has no defaults


def build_llava_onevision():
    """A random tiny LLaVA-OneVision: the tiny SigLIP tower, a one-layer Qwen2, anyres up to 2x2 tiles."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    torch.manual_seed(0)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VIT).to_dict(),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64).to_dict(),
        image_grid_pinpoints=[[30, 30], [30, 60], [60, 30], [60, 60]],
    )
    return LlavaOnevisionForConditionalGeneration(config).eval()


MODEL = build_llava_onevision()
TOWER = stc.integrations.find_vision_layers(MODEL)[0]


def tensors(output) -> list[torch.Tensor]:
    """Every tensor in a model output (a ModelOutput, tuple or list, nested), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in tensors(value)]
    return []


def image_features(model, pixel_values, image_sizes):
    with torch.inference_mode():
        return tensors(model.get_image_features(pixel_values, image_sizes, **SELECT))


def video_features(model, videos):
    with torch.inference_mode():
        return tensors(model.get_video_features(videos, **SELECT))


def instance_attributes(model) -> dict:
    return {name: dict(module.__dict__) for name, module in model.named_modules()}


def anyres_image(seed: int = 0):
    """One 30x60 image as LLaVA-OneVision's processor gives it: base view + 2 tiles, (1, 3, 3, 30, 30)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 3, 30, 30, generator=g), torch.tensor([[30, 60]])


def test_images_pass_through_bit_identical_and_leave_the_stream_untouched():
    pixels, sizes = anyres_image()
    baseline = image_features(MODEL, pixels, sizes)
    clip = moving_clip(4)[None]                                                       # (1, T, 3, 30, 30)
    with stc.cacher_attached(MODEL, CacherConfig(update_ratio=0.1)) as handle:
        video_features(MODEL, clip[:, :2])
        patched = image_features(MODEL, pixels, sizes)
        assert handle.frame_index == 2 and len(handle.stats.calls) == 1
        with torch.inference_mode():
            direct = tensors(getattr(MODEL, "model", MODEL).get_image_features(pixels, sizes, **SELECT))
    assert len(patched) == len(baseline) > 0
    assert all(torch.equal(a, b) for a, b in zip(patched, baseline))
    assert all(torch.equal(a, b) for a, b in zip(direct, baseline))


def test_one_video_per_call_streams_as_on_the_bare_tower():
    clip = moving_clip(6)[None]
    unpatched = video_features(MODEL, clip[:, :4]) + video_features(MODEL, clip[:, 4:])
    config = CacherConfig(update_ratio=0.1)
    with stc.cacher_attached(TOWER, config):  # the reference: the same stream on the bare tower
        expected = video_features(MODEL, clip[:, :4]) + video_features(MODEL, clip[:, 4:])
    with stc.cacher_attached(MODEL, config) as handle:
        streamed = video_features(MODEL, clip[:, :4]) + video_features(MODEL, clip[:, 4:])
        assert [c.refresh_frames for c in handle.stats.calls] == [(0, 2), (4,)]
        assert [c.selective_frames for c in handle.stats.calls] == [(1, 3), (5,)]
    assert all(torch.equal(a, b) for a, b in zip(streamed, expected))
    assert not all(torch.equal(a, b) for a, b in zip(streamed, unpatched))  # selective frames differ


def test_several_videos_in_one_call_are_streams_of_their_own():
    """B videos fed call after call (the serving pattern) are B streams: each gives what it gives
    fed alone, and each has its own frame counter and statistics. (Noisy frames: a static scene
    ties many tokens' similarities, and a tie is broken by float rounding, which batch size moves.)"""
    clip = noisy_clip(4)[None]
    two = torch.cat([clip, clip.flip(1)])                                            # (2, T, 3, 30, 30)
    config = CacherConfig(update_ratio=0.1)
    calls = [slice(0, 1), slice(1, 4)]

    def per_video(videos):
        """The video features (B, L, C): transformers 5 returns them as pooler_output, 4.x as a tensor."""
        with torch.inference_mode():
            out = MODEL.get_video_features(videos.contiguous(), **SELECT)
        return getattr(out, "pooler_output", out)

    alone = []
    for video in two:
        with stc.cacher_attached(MODEL, config):
            alone.append([per_video(video[None, c]) for c in calls])
    with stc.cacher_attached(MODEL, config) as handle:
        together = [per_video(two[:, c]) for c in calls]
        assert handle.stream_ids == (0, 1) and handle.frame_index_of(0) == handle.frame_index_of(1) == 4
        assert [len(handle.stats_of(v).calls) for v in (0, 1)] == [2, 2]
        assert handle.stats_of(1).calls[1].selective_frames == (1, 3)
    for v in range(2):  # equal up to float rounding: a batch of two may take other kernel paths than one
        for step in range(len(calls)):
            assert (together[step][v : v + 1] - alone[v][step]).abs().max() <= 1e-5


def test_stream_ids_name_the_videos_of_a_whole_model_call():
    clip = moving_clip(2)[None]
    two = torch.cat([clip, clip.flip(1)])
    with stc.cacher_attached(MODEL, CacherConfig(update_ratio=0.1)) as handle:
        with handle.streams(["cam-a", "cam-b"]):
            video_features(MODEL, two)
        assert handle.stream_ids == ("cam-a", "cam-b") and handle.frame_index_of("cam-b") == 2
        with pytest.raises(stc.StreamStateError) as err, handle.streams([0, 1, 2]):
            video_features(MODEL, two)
        assert str(err.value) == IDS_PER_VIDEO.format(owner=type(MODEL).__name__)
        assert handle.stream_ids == ("cam-a", "cam-b")                               # nothing was fed
        with pytest.raises(stc.StreamStateError, match="give each a different id"), handle.streams([5, 5]):
            video_features(MODEL, two)
        video_features(MODEL, two)                           # a refused call leaves the model as it was:
        assert handle.stream_ids == ("cam-a", "cam-b", 0, 1)  # two videos are two streams again
    pixels, sizes = anyres_image(1)
    with stc.cacher_attached(MODEL, CacherConfig(update_ratio=0.1)) as handle:
        with pytest.raises(stc.StreamStateError), handle.streams([0, 1, 2]):
            video_features(MODEL, two)
        patched = image_features(MODEL, pixels, sizes)        # and images still pass through
        assert handle.stream_ids == ()
    assert all(torch.equal(a, b) for a, b in zip(patched, image_features(MODEL, pixels, sizes)))


def test_a_video_call_whose_count_of_videos_is_unknown_is_refused():
    path = next(name for name, module in MODEL.named_modules() if module is TOWER)
    with stc.cacher_attached(MODEL, CacherConfig(update_ratio=0.1)) as handle:
        with pytest.raises(stc.StreamStateError) as err:
            video_features(MODEL, moving_clip(4))                                    # (T, 3, 30, 30): no batch axis
        assert handle.frame_index == 0
    assert str(err.value) == (
        f"STC-Cacher cannot tell how many videos this {type(MODEL).__name__}.get_video_features call holds (it reads "
        "video_grid_thw, or a first argument of shape (videos, frames, channels, height, width)): attach the cacher "
        f"to the vision tower (model.{path}) and feed it one video at a time"
    )


def test_detach_leaves_nothing_patched_and_outputs_bit_identical():
    pixels, sizes = anyres_image(1)
    clip = moving_clip(3)[None]
    before = instance_attributes(MODEL)
    baseline = video_features(MODEL, clip) + image_features(MODEL, pixels, sizes)
    handle = stc.attach_cacher(MODEL, CacherConfig(update_ratio=0.1))
    patched = [name for name, m in MODEL.named_modules() if "get_video_features" in m.__dict__]
    assert patched and all("get_image_features" in MODEL.get_submodule(name).__dict__ for name in patched)
    video_features(MODEL, clip)
    stc.detach_cacher(MODEL)
    assert not handle.attached
    assert instance_attributes(MODEL) == before
    after = video_features(MODEL, clip) + image_features(MODEL, pixels, sizes)
    assert all(torch.equal(a, b) for a, b in zip(after, baseline))


def _fail(*args, **kwargs):
    raise RuntimeError("projector failed")


def test_a_failed_video_call_is_undone():
    clip = moving_clip(4)[None]
    with stc.cacher_attached(MODEL, CacherConfig(update_ratio=0.1)) as handle:
        video_features(MODEL, clip[:, :2])
        projector = getattr(MODEL, "model", MODEL).multi_modal_projector
        projector.forward = _fail
        try:
            with pytest.raises(RuntimeError, match="projector failed"):
                video_features(MODEL, clip[:, 2:])   # the tower streamed frames 2, 3; the call failed after it
        finally:
            del projector.forward
        assert handle.frame_index == 2
        retried = video_features(MODEL, clip[:, 2:])
        handle.reset()
        video_features(MODEL, clip[:, :2])
        clean = video_features(MODEL, clip[:, 2:])
    assert all(torch.equal(a, b) for a, b in zip(retried, clean))


def test_a_whole_model_without_video_entry_is_refused_and_a_thin_wrapper_is_a_tower():
    class ImageModel(torch.nn.Module):  # a tower plus a projector, and no get_video_features
        def __init__(self):
            super().__init__()
            self.vision = build_tiny_tower("siglip")
            self.projector = torch.nn.Linear(32, 8)

    model = ImageModel()
    before = instance_attributes(model)
    with pytest.raises(stc.UnsupportedModelError) as err:
        stc.attach_cacher(model)
    assert instance_attributes(model) == before
    tower_handle = stc.attach_cacher(model.vision)
    with pytest.raises(stc.UnsupportedModelError):
        stc.attach_cacher(model)
    assert tower_handle.attached  # the refused attach left the tower's own patch alone
    tower_handle.detach()
    assert str(err.value) == (
        "ImageModel holds more than its vision tower but has no get_video_features method, so STC-Cacher cannot tell "
        "its video calls from its image calls: attach to the tower itself, stc.attach_cacher(model.vision), and feed "
        "it the frames of one video at a time"
    )
    assert instance_attributes(model) == before

    wrapper = torch.nn.ModuleDict({"tower": model.vision})
    with stc.cacher_attached(wrapper, CacherConfig(update_ratio=0.1)) as handle:
        with torch.inference_mode():
            model.vision(pixel_values=moving_clip(3))
        assert handle.stats.selective_frames == 1


def test_qwen2_vl_images_pass_through_and_two_videos_are_two_streams():
    """Qwen2-VL counts videos by the rows of video_grid_thw; images of mixed grids pass through.
    Where the model has no get_video_features (transformers 4.51 and older), it is refused."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from stc_bench.frameworks.livecc import patchify

    torch.manual_seed(0)
    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=2, temporal_patch_size=2,
                  spatial_merge_size=2, in_channels=3)
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=64, bos_token_id=0, eos_token_id=1, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
    if "text_config" in inspect.signature(Qwen2VLConfig.__init__).parameters:
        config = Qwen2VLConfig(vision_config=vision, text_config=text)
    else:  # transformers < 4.57: the text fields at the top level
        config = Qwen2VLConfig(vision_config=vision, **text)
    model = Qwen2VLForConditionalGeneration(config).eval()
    if not hasattr(model, "get_video_features"):  # transformers < 4.52 calls the tower inline in forward: refused
        with pytest.raises(stc.UnsupportedModelError) as err:
            stc.attach_cacher(model)
        assert str(err.value) == (
            "Qwen2VLForConditionalGeneration holds more than its vision tower but has no get_video_features method, so "
            "STC-Cacher cannot tell its video calls from its image calls: attach to the tower itself, "
            "stc.attach_cacher(model.visual), and feed it the frames of one video at a time"
        )
        return
    g = torch.Generator().manual_seed(0)
    small, _ = patchify(torch.randn(2, 3, 16, 16, generator=g), patch=2)
    large, _ = patchify(torch.randn(2, 3, 24, 16, generator=g), patch=2)
    images, grids = torch.cat([small, large]), torch.tensor([[1, 8, 8], [1, 12, 8]])  # two images, two grids
    video, video_grid = patchify(torch.randn(4, 3, 16, 16, generator=g), patch=2)
    with torch.inference_mode():
        baseline = tensors(model.get_image_features(images, grids))
        with stc.cacher_attached(model, CacherConfig(update_ratio=0.1)) as handle:
            patched = tensors(model.get_image_features(images, grids))  # a stream would refuse mixed grids
            model.get_video_features(video, video_grid)
            assert handle.frame_index == 2  # two temporal groups
            model.get_video_features(torch.cat([video, video]), torch.cat([video_grid, video_grid]))
            assert (handle.frame_index_of(0), handle.frame_index_of(1)) == (4, 2)  # two videos: two streams
    assert len(patched) == len(baseline) > 0 and all(torch.equal(a, b) for a, b in zip(patched, baseline))
