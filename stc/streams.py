"""How callers name the concurrent streams that STC-Cacher and STC-Pruner keep apart."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

StreamId = Union[int, str]
"""What names a stream: an int or a string (a camera name)."""

DEFAULT_STREAM: StreamId = 0
"""The stream every frame belongs to when the caller names none (one-stream use)."""


def check_stream_ids(ids: Sequence[StreamId]) -> tuple[StreamId, ...]:
    """``ids`` as a tuple, one int or string per frame; ``TypeError``/``ValueError`` naming the
    problem otherwise."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"stream ids must be a sequence with one id per frame of the call (e.g. [0, 1, 2, 3]), "
                        f"got {type(ids).__name__}")
    ids = tuple(ids)
    if not ids:
        raise ValueError("stream ids must name at least one stream: one id per frame of the call, e.g. [0, 1]")
    for sid in ids:
        if isinstance(sid, bool) or not isinstance(sid, (int, str)):
            raise TypeError(f"stream id {sid!r} ({type(sid).__name__}) must be an int or a string: it names the stream")
    return ids
