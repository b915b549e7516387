"""STC-Cacher in a whole vision-language model: which tower calls belong to the video stream.

A model such as ``LlavaOnevisionForConditionalGeneration`` sends both images and videos through
one vision tower, and a batch of videos as one flat batch of frames:

- ``get_image_features`` sends an image (for anyres, its base view and its tiles) through the
  tower as one batch. Streamed, those views would be cached as consecutive frames of the video
  and each tile would read its neighbour's cache;
- ``get_video_features`` flattens ``pixel_values_videos`` (B, T, C, H, W) into B*T frames (Qwen2-VL:
  one ``video_grid_thw`` row per video), so video 2's first frame would read video 1's cache
  if the call were one stream.

So, when the cacher is attached to such a model, these two methods of the model instance (and
of each module between it and the tower that has them) are replaced: a tower call made inside
``get_image_features`` runs the unpatched forwards and leaves the stream untouched; a call made
inside ``get_video_features`` is streamed with each video as a stream of its own (video b is
stream b; B videos fed call after call are B concurrent streams). The outermost
of nested calls decides (the outer model's method delegates to the inner model's; some models
compute video features through ``get_image_features``). Tower calls made outside both methods
(the caller's own ``model.vision_tower(frames)``) are streamed, as on a bare tower.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from stc.cacher.state import CacherState
from stc.errors import StreamStateError, UnsupportedModelError

IMAGE_ENTRY = "get_image_features"
VIDEO_ENTRY = "get_video_features"


def tower_path(model: nn.Module, tower: nn.Module) -> str:
    """The dotted path of ``tower`` inside ``model`` ("" when it is the model)."""
    return next(name for name, module in model.named_modules() if module is tower)


def holds_more_than(model: nn.Module, tower: nn.Module) -> bool:
    """Whether ``model`` has parameters outside ``tower``: a whole model (projector, LLM), not a
    tower or a thin wrapper of one."""
    inside = {id(p) for p in tower.parameters()}
    return any(id(p) not in inside for p in model.parameters())


def _owners(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules from ``model`` down to the tower's parent, outermost first."""
    parts = path.split(".") if path else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts))]


def video_frames(signature: inspect.Signature, args: tuple, kwargs: dict) -> list[int] | None:
    """The frames the tower sees of each video of a ``get_video_features`` call: per row of
    ``video_grid_thw`` its temporal groups (Qwen2-VL family), else, for videos (B, T, C, H, W) as
    the first argument (LLaVA family: ``pixel_values_videos`` in transformers 5, ``pixel_values``
    in 4.x), T for each of the B; None when neither is there."""
    try:
        arguments = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return None
    grid = arguments.get("video_grid_thw")
    if isinstance(grid, torch.Tensor) and grid.dim() == 2:
        return [int(t) for t in grid[:, 0].tolist()]
    pixels = arguments.get(next(iter(signature.parameters), ""))
    if isinstance(pixels, torch.Tensor) and pixels.dim() == 5:
        return [pixels.shape[1]] * pixels.shape[0]
    return None


class ModelEntries:
    """The patched ``get_image_features``/``get_video_features`` of one attach, sharing which
    one the tower call in progress came through."""

    def __init__(self, state: CacherState, tower_path: str):
        self.state = state
        self.tower_path = tower_path
        self.active: str | None = None
        """The entry the outermost call in progress came through, or None."""

    def image(self, method):
        """``method`` (a bound ``get_image_features``) with its tower calls run unpatched."""

        @functools.wraps(method)
        def get_image_features(*args, **kwargs):
            if self.active is not None:  # nested: the outer entry decides
                return method(*args, **kwargs)
            self.active, self.state.passthrough = IMAGE_ENTRY, True
            try:
                return method(*args, **kwargs)
            finally:
                self.active, self.state.passthrough = None, False

        return get_image_features

    def video(self, owner: nn.Module, method):
        """``method`` (a bound ``get_video_features``) streaming each of its videos as a stream of
        its own, and undoing its frames in every stream when it raises."""
        signature = inspect.signature(method)
        where = f"{type(owner).__name__}.{VIDEO_ENTRY}"

        @functools.wraps(method)
        def get_video_features(*args, **kwargs):
            if self.active is not None:
                return method(*args, **kwargs)
            frames = video_frames(signature, args, kwargs)
            if frames is None:
                raise StreamStateError(
                    f"STC-Cacher cannot tell how many videos this {where} call holds (it reads video_grid_thw, "
                    "or a first argument of shape (videos, frames, channels, height, width)): attach the cacher to the vision tower "
                    f"(model.{self.tower_path}) and feed it one video at a time"
                )
            named = self.state.frame_streams
            streams = self._frame_streams(frames, named, where)  # may refuse: before anything is changed
            self.active, self.state.frame_streams = VIDEO_ENTRY, streams
            checkpoint = self.state.checkpoint()
            try:
                return method(*args, **kwargs)
            except BaseException:  # the frames never reached the caller: every stream forgets them
                self.state.restore(checkpoint)
                raise
            finally:
                self.active, self.state.frame_streams = None, named

        return get_video_features

    @staticmethod
    def _frame_streams(frames: list[int], named: tuple | None, where: str) -> tuple | None:
        """The stream of each frame the tower will see: video b is stream b, or, inside
        ``handle.streams(ids)``, stream ``ids[b]`` (one id per video). None for one video and no
        ids: the default stream, as a tower call outside the model would be."""
        if named is None:
            if len(frames) == 1:
                return None
            named = tuple(range(len(frames)))
        elif len(named) != len(frames):
            raise StreamStateError(
                f"this {where} call holds {len(frames)} videos but handle.streams() named {len(named)} stream ids: "
                "around a whole model, give one id per video"
            )
        elif len(set(named)) != len(named):
            raise StreamStateError(
                f"handle.streams() named stream ids {list(named)} for the videos of this {where} call: "
                "around a whole model each video is a stream of its own, so give each a different id"
            )
        return tuple(sid for sid, count in zip(named, frames) for _ in range(count))


def entry_owners(model: nn.Module, tower: nn.Module) -> tuple[list[nn.Module], str] | None:
    """When ``model`` is a whole model around ``tower``: the modules from ``model`` down to the
    tower's parent (outermost first) and the tower's path; None for a tower, or a module holding
    nothing but one, which is patched as a tower.

    Raises ``UnsupportedModelError`` for a whole model without ``get_video_features``: its video
    calls could not be told from its image calls.
    """
    if not holds_more_than(model, tower):
        return None
    path = tower_path(model, tower)
    owners = _owners(model, path)
    if not any(callable(getattr(owner, VIDEO_ENTRY, None)) for owner in owners):
        raise UnsupportedModelError(
            f"{type(model).__name__} holds more than its vision tower but has no {VIDEO_ENTRY} method, so STC-Cacher "
            f"cannot tell its video calls from its image calls: attach to the tower itself, "
            f"stc.attach_cacher(model.{path}), and feed it the frames of one video at a time"
        )
    return owners, path


def patch_entries(handle, owners: list[nn.Module], path: str, state: CacherState) -> None:
    """Replace the image and video entry methods of each of ``owners`` (as ``entry_owners``
    found them) by instance attributes, recorded in ``handle`` so that detach restores them."""
    entries = ModelEntries(state, path)
    for owner in owners:
        if callable(getattr(owner, IMAGE_ENTRY, None)):
            handle._replace(owner, IMAGE_ENTRY, entries.image(getattr(owner, IMAGE_ENTRY)))
        if callable(getattr(owner, VIDEO_ENTRY, None)):
            handle._replace(owner, VIDEO_ENTRY, entries.video(owner, getattr(owner, VIDEO_ENTRY)))
