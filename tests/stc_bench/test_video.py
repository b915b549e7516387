import av
import numpy as np
import pytest
import torch

from stc_bench.video import VideoError, decode_video, load_clip, synthetic_clip


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
    with pytest.raises(VideoError, match="only 2 frames at --fps 1, 4 needed; use a longer video, a higher --fps, or fewer --frames"):
        decode_video(str(short), 4, 1.0, 24)
