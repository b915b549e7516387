"""Typed errors of the `stc` library. Every message says what to change."""

from __future__ import annotations


class STCError(Exception):
    """Base class of every error raised on purpose by `stc`."""


class UnsupportedModelError(STCError, TypeError):
    """The module handed to `attach_cacher` holds no vision encoder layers STC can patch."""


class StreamStateError(STCError, RuntimeError):
    """A cached stream cannot continue as asked (the token count changed mid-stream, several
    videos arrived in one call, a layer ran outside a call)."""


class ConfigError(STCError, ValueError):
    """A config field (or the ``STC_*`` variable it is read from) has a value of the wrong type or
    out of range. The message names the field, the value and what is allowed; ``allowed`` holds
    the last as a phrase ("in (0, 1]", "an integer >= 1")."""

    def __init__(self, message: str, allowed: str):
        super().__init__(message)
        self.allowed = allowed

    def __reduce__(self):  # picklable with both arguments (an error may cross a process boundary)
        return type(self), (str(self), self.allowed)
