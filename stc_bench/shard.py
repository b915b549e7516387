"""Sharded runs: the K-th of N deterministic slices of a run's points (``--shard K/N``).

A *point* is one (frame count, arm) pair other than the baseline. A run's points are ordered as
the runner measures them (frame counts in ``--frames`` order, arms in ``runner.arms_of`` order)
and dealt round-robin: point i belongs to shard ``i % N``. Round-robin keeps the shards
balanced in count and in cost (each gets its share of the long frame counts), and the slice
depends on the config alone, so the N processes of a SLURM array or a CI matrix agree on it
without talking to each other. K counts from 0, as SLURM's array task ids do (``--array=0-3``).

A shard measures, at every frame count where it has a point, the baseline too, interleaved with
its points exactly as an unsharded run does: every reduction stays against a baseline measured
in the same process and the same rounds. A frame count where the shard has no point is not
measured at all. ``stc_bench.merge`` joins the N run folders into one.

Pure Python, no torch: ``BenchConfig`` validates ``--shard`` with ``Shard.parse``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from stc_bench.errors import BenchUsageError

SHARD_EXAMPLE = "e.g. --shard 0/4 (a SLURM array job: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
"""How ``--shard`` is written, for its error messages."""

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` -> Shard; ``ValueError`` naming ``--shard`` and the form otherwise."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"--shard {text}: write K/N, shard K of N counted from 0; {SHARD_EXAMPLE}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1:
            raise ValueError(f"--shard {text}: N, the number of shards, must be 1 or more; {SHARD_EXAMPLE}")
        if index >= count:
            raise ValueError(f"--shard {text}: K must be below N (shards count from 0: 0/{count} to {count - 1}/{count}); "
                             f"{SHARD_EXAMPLE}")
        return cls(index, count)

    @property
    def label(self) -> str:
        """``K/N``, as ``--shard`` takes it."""
        return f"{self.index}/{self.count}"

    def take(self, points: Sequence[T]) -> list[T]:
        """This shard's slice of ``points``: every N-th, from the K-th."""
        return list(points[self.index :: self.count])


def plan_points(frames: Sequence[int], arms: Sequence[T], shard: str | None) -> dict[int, list[T]]:
    """Frame count -> the arms a run measures there, the baseline (``arms[0]``) first.

    Unsharded (``shard`` None): every arm at every frame count. Sharded: this shard's points,
    each frame count with its own baseline; frame counts where the shard has no point are left
    out. ``BenchUsageError`` when N exceeds the number of points (some shard would measure nothing)."""
    if shard is None:
        return {f: list(arms) for f in frames}
    part = Shard.parse(shard)
    baseline, others = arms[0], arms[1:]
    points = [(f, arm) for f in frames for arm in others]
    if not points:
        raise BenchUsageError(f"--shard {part.label}: the run measures only the baseline, so there is nothing to share out; "
                              "add a method to --arms, or drop --shard")
    if part.count > len(points):
        raise BenchUsageError(f"--shard {part.label}: N = {part.count} is larger than the run's {len(points)} points "
                              f"(frame counts x arms besides the baseline), so some shard would measure nothing; pass N of "
                              f"at most {len(points)}, e.g. --shard {min(part.index, len(points) - 1)}/{len(points)}")
    plan: dict[int, list[T]] = {}
    for f, arm in part.take(points):
        plan.setdefault(f, [baseline]).append(arm)
    return {f: plan[f] for f in frames if f in plan}  # in --frames order


def shard_block(shard: str, plan: dict[int, list[Any]]) -> dict[str, Any]:
    """What a shard's results.json records of it (``run.shard``): K, N and the points it owns
    (frames and arm label), so a resume knows its frame counts and a merge can check coverage."""
    part = Shard.parse(shard)
    return {"index": part.index, "count": part.count,
            "points": [{"frames": f, "arm": arm.label} for f, arms in plan.items() for arm in arms[1:]]}


def planned_frames(result: Any) -> list[int]:
    """The frame counts a run measures (a ``RunResult``): a shard's own (``run.shard``), else every ``--frames``."""
    block = result.run.get("shard")
    if block is None:
        return list(result.config.frames)
    return list(dict.fromkeys(p["frames"] for p in block.get("points", [])))
