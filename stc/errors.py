"""Typed errors of the `stc` library. Every message says what to change."""

from __future__ import annotations


class STCError(Exception):
    """Base class of every error raised on purpose by `stc`."""


class UnsupportedModelError(STCError, TypeError):
    """The module handed to `attach_cacher` holds no vision encoder layers STC can patch."""


class StreamStateError(STCError, RuntimeError):
    """A cached stream cannot continue as asked (e.g. the token count changed mid-stream)."""
