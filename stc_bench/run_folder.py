"""A run folder on disk: results.json (finished frame counts) and partial.json (the raw samples
of the frame count in progress, saved after every measured round), so an interrupted run can
be resumed where it stopped.

A process that writes a run folder holds its lock file, ``run.lock`` (the holder's pid and host),
so two processes never write one folder at once: a second ``sweep --resume`` of a folder in use
is refused, naming the holder; the lock of a process that no longer exists is taken over.
What is read back to resume is checked against the run's settings before anything is measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stc_bench.allocator import HOST_USAGE_KEYS
from stc_bench.errors import BenchUsageError
from stc_bench.measurement import STAGE_ORDER
from stc_bench.results import RunResult, load_results, write_json_atomically

logger = logging.getLogger(__name__)

PARTIAL = "partial.json"
LOCK = "run.lock"
RESULTS = "results.json"


class FolderBusy(BenchUsageError):
    """Another live process holds the folder's lock; the message names it and what to do."""


class ResumeError(BenchUsageError):
    """What a run folder holds cannot be resumed as it is; the message says what to delete or pass."""


@dataclass(frozen=True)
class Progress:
    """partial.json, checked: ``rounds`` measured rounds of frame count ``frames`` and their raw samples."""

    frames: int
    rounds: int
    samples: dict[str, Any]


class RunFolder:
    """Persistence of one run: finished results, in-progress samples, and the writer's lock."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def create(cls, root: Path, name: str) -> RunFolder:
        """A new, empty folder ``root/name``; when that name is taken (two runs started in the same
        second), ``name-2``, ``name-3``, ... Raises ``OSError`` when ``root`` is not writable."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = root / (name if n == 1 else f"{name}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)
        raise FileExistsError(f"{root / name}: a thousand run folders of this name exist")

    @property
    def results_path(self) -> Path:
        """The folder's results.json."""
        return self.path / RESULTS

    def save_result(self, result: RunResult) -> None:
        """Write results.json (every finished frame count)."""
        write_json_atomically(self.results_path, result.to_dict())

    def load_result(self) -> RunResult:
        """Read results.json (checked: ``ResultsError`` says what is wrong with it)."""
        return load_results(self.results_path)

    # --- the lock -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock for the block; ``FolderBusy`` when a live process holds it."""
        self._acquire()
        try:
            yield self
        finally:
            self._release()

    def _acquire(self) -> None:
        lock = self.path / LOCK
        mine = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            if _create_with(lock, mine):
                return
            holder = _read_holder(lock)
            if holder is None:
                continue  # released (or half-written) while we looked: try again
            pid, host = holder
            if _alive(pid, host):
                where = f" on {host}" if host != socket.gethostname() else ""
                raise FolderBusy(f"{self.path} is in use by process {pid}{where} (lock file {lock}); wait until it ends, "
                                 f"or delete the lock file if no stc-bench runs there")
            logger.warning("%s: process %d that locked it is gone; taking its lock over", self.path, pid)
            lock.unlink(missing_ok=True)
        raise FolderBusy(f"{self.path}: cannot take its lock file {lock}; delete it if no stc-bench runs there")

    def _release(self) -> None:
        lock = self.path / LOCK
        if _read_holder(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)

    # --- what a failed start leaves behind ------------------------------------------------------

    def holds_anything(self) -> bool:
        """True when the folder keeps something worth a resume: a measured frame count, measured
        rounds, or a recorded error (results.json with only the config is nothing)."""
        if (self.path / PARTIAL).is_file():
            return True
        try:
            data = json.loads(self.results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and bool(data.get("measurements") or data.get("errors"))

    def discard(self) -> None:
        """Remove a folder this run created and that keeps nothing: the files stc-bench writes
        (results.json, partial.json, their temp files, the lock), then the folder if it is then
        empty. Anything else found inside is left alone, and so is the folder."""
        for name in (RESULTS, PARTIAL, LOCK):
            with contextlib.suppress(OSError):
                (self.path / name).unlink(missing_ok=True)
        for stem in ("results", "partial"):
            for tmp in self.path.glob(f".{stem}-*.json"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        with contextlib.suppress(OSError):
            self.path.rmdir()

    # --- in-progress samples --------------------------------------------------------------------

    def save_progress(self, frames: int, rounds: int, samples: dict[str, Any]) -> None:
        """Record the raw samples of ``rounds`` measured rounds of frame count ``frames``."""
        write_json_atomically(self.path / PARTIAL, {"frames": frames, "rounds": rounds, "samples": samples})

    def read_progress(self, frames: tuple[int, ...], finished: set[int], arm_labels: list[str] | Mapping[int, list[str]],
                      repeats: int) -> Progress | None:
        """partial.json checked against the run it continues (its frame counts, the ones already
        finished, its arms, or its arms per frame count for a shard, and --repeats); None when there
        is none. ``ResumeError`` names what is wrong and the fix (delete the file: only that frame
        count's rounds are measured again)."""
        path = self.path / PARTIAL
        if not path.is_file():
            return None
        fix = f"delete {path} to measure that frame count again from its first round"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise ResumeError(f"{path} cannot be read ({getattr(err, 'strerror', None) or err}); {fix}") from None
        except json.JSONDecodeError as err:
            raise ResumeError(f"{path} is truncated or not JSON (line {err.lineno}, column {err.colno}: {err.msg}); {fix}") from None
        problem = _progress_problem(data, frames, finished, arm_labels, repeats)
        if problem:
            raise ResumeError(f"{path}: {problem}; {fix}")
        return Progress(data["frames"], data["rounds"], data["samples"])

    def clear_progress(self) -> None:
        """Drop partial.json once its frame count is in results.json (or has failed)."""
        (self.path / PARTIAL).unlink(missing_ok=True)


def _progress_problem(data: Any, frames: tuple[int, ...], finished: set[int], arm_labels: list[str] | Mapping[int, list[str]],
                      repeats: int) -> str | None:
    """What is wrong with a partial.json document for this run, or None."""
    if not isinstance(data, dict) or not {"frames", "rounds", "samples"} <= set(data):
        return "expected an object with frames, rounds and samples"
    f, rounds, samples = data["frames"], data["rounds"], data["samples"]
    if not _is_int(f) or f not in frames:
        return f"its frame count {f!r} is not one of this run's --frames {','.join(map(str, frames))}"
    if f in finished:
        return f"--frames {f} is already finished in results.json"
    if not _is_int(rounds) or not 0 <= rounds <= repeats:
        return f"it claims {rounds!r} measured rounds of --frames {f}, but the run has --repeats {repeats}"
    if isinstance(arm_labels, Mapping):  # a shard: its arms differ from one frame count to the next
        arm_labels = arm_labels[f]
    if not isinstance(samples, dict) or sorted(samples) != sorted(arm_labels):
        found = ", ".join(sorted(samples)) if isinstance(samples, dict) else type(samples).__name__
        return f"its arms ({found}) are not this run's ({', '.join(arm_labels)})"
    stages = None
    for label, s in samples.items():
        if not isinstance(s, dict) or not isinstance(s.get("totals"), dict) or not isinstance(s.get("chunks"), dict):
            return f"samples of {label!r}: expected totals and chunks per stage"
        if stages is None:
            stages = set(s["totals"])
        if set(s["totals"]) != stages or set(s["chunks"]) != stages or not stages <= set(STAGE_ORDER):
            return f"samples of {label!r}: stages {', '.join(sorted(s['totals']))} do not match the other arms' or stc-bench's"
        for stage in stages:
            totals, chunks = s["totals"][stage], s["chunks"][stage]
            if not isinstance(totals, list) or not isinstance(chunks, list) or len(totals) != rounds or len(chunks) != rounds:
                return f"samples of {label!r}, {stage}: {rounds} rounds claimed, but not {rounds} samples"
            if not all(_is_time(t) for t in totals) or not all(isinstance(c, list) and all(_is_time(t) for t in c) for c in chunks):
                return f"samples of {label!r}, {stage}: a sample is not a latency in ms (a number >= 0)"
        if s.get("peak_mb") is not None and not _is_time(s["peak_mb"]):
            return f"samples of {label!r}: peak_mb is not a number"
        host = s.get("host", {})
        if not isinstance(host, dict) or not set(host) <= set(HOST_USAGE_KEYS) or not all(
                isinstance(v, list) and len(v) <= rounds and all(_is_time(x) for x in v) for v in host.values()):
            return (f"samples of {label!r}: host usage must hold only {', '.join(HOST_USAGE_KEYS)}, each at most "
                    f"{rounds} counts (numbers >= 0)")
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _create_with(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` atomically, only if it does not exist (a hard link of a
    written temp file; O_EXCL where the file system has no links). False when it exists."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lock-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _read_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None when there is none or it cannot be read."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether the lock holder may still run: any process on another host (it cannot be
    checked from here), this process itself, or a process that exists here."""
    if host != socket.gethostname() or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True
