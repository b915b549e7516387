"""Frame sources: a built-in synthetic streaming clip, or a video file decoded with PyAV.

Both give (T, 3, S, S) float frames in [0, 1] at the tower's input size; ``normalise`` then
applies the tower's processor mean/std (SigLIP: 0.5; CLIP and Qwen2-VL: OpenAI CLIP's). Every arm of a run receives the same tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stc_bench.errors import BenchUsageError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(BenchUsageError):
    """A --video file cannot be used; the message says what to change."""


def synthetic_clip(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """A deterministic streaming clip: (frames, 3, size, size) in [0, 1].

    A textured static scene (oriented gratings over smoothed noise), three discs moving on
    straight paths that bounce off the borders, and per-frame sensor noise: consecutive frames
    are mostly, not entirely, alike, as in real footage.
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    scene = torch.zeros(3, size, size)
    for c in range(3):
        for _ in range(4):
            angle, freq, phase = torch.rand(3, generator=g).tolist()
            wave = torch.sin(2 * math.pi * (2 + 10 * freq) * (xs * math.cos(6.28 * angle) + ys * math.sin(6.28 * angle)) + 6.28 * phase)
            scene[c] += 0.08 * wave
    blotches = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False)[0]
    scene = (0.5 * scene + 0.6 * blotches + 0.2).clamp(0, 1)

    radius = 0.09
    start = torch.rand(3, 2, generator=g) * (1 - 2 * radius) + radius      # (objects, yx)
    velocity = (torch.rand(3, 2, generator=g) - 0.5) * 0.08                  # per frame, in image units
    colour = torch.rand(3, 3, generator=g)                                   # (objects, rgb)
    clip = scene.expand(frames, -1, -1, -1).clone()
    for t in range(frames):
        for o in range(3):
            pos = start[o] + velocity[o] * t
            pos = radius + (1 - 2 * radius) * (1 - ((pos - radius) / (1 - 2 * radius) % 2 - 1).abs())  # bounce
            inside = ((ys - pos[0]) ** 2 + (xs - pos[1]) ** 2) < radius**2
            clip[t][:, inside] = colour[o][:, None]
    noise = 0.01 * torch.randn(clip.shape, generator=g)
    return (clip + noise).clamp(0, 1)


def decode_video(path: str, frames: int, fps: float, size: int) -> torch.Tensor:
    """Decode ``frames`` frames sampled at ``fps`` from a video file, resized to size x size.

    Frame k is the first decoded frame at or after time k / fps. Raises ``VideoError`` when the
    file is missing, not a video, or too short for the requested frames at that rate.
    """
    import av

    file = Path(path)
    if not file.is_file():
        raise VideoError(f"--video {path}: no such file")
    try:
        container = av.open(str(file))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"--video {path}: not a readable video ({err}); pass an mp4/mkv/webm file") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"--video {path}: the file has no video stream")
        stream = container.streams.video[0]
        picked: list[torch.Tensor] = []
        try:
            for frame in container.decode(stream):
                if frame.time is None or frame.time + 1e-6 < len(picked) / fps:
                    continue
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))           # (H, W, 3) uint8
                picked.append(rgb)
                if len(picked) == frames:
                    break
        except av.error.FFmpegError as err:
            raise VideoError(f"--video {path}: decoding failed ({err})") from None
    if len(picked) < frames:
        raise VideoError(
            f"--video {path}: only {len(picked)} frames at --fps {fps:g}, {frames} needed; "
            "use a longer video, a higher --fps, or fewer --frames"
        )
    clip = torch.stack(picked).permute(0, 3, 1, 2).float() / 255.0                 # (T, 3, H, W)
    return F.interpolate(clip, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def normalise(clip: torch.Tensor, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> the tower's input: (x - mean) / std per channel."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (clip - m) / s


def load_clip(frames: int, size: int, video: str | None, fps: float, seed: int,
              mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """The normalised frames of a run: from ``video`` when given, else the synthetic clip."""
    raw = decode_video(video, frames, fps, size) if video else synthetic_clip(frames, size, seed)
    return normalise(raw, mean, std)
