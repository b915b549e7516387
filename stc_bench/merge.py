"""Join the run folders of a sharded run (``--shard K/N`` for K = 0..N-1) into one result.

The shards are checked first, and whatever would make the joined numbers misleading is refused
in one line that names what differs and in which folders: a folder that holds no shard, shard
counts that differ, a shard given twice or missing, settings that differ (every setting but
``--shard``, ``--out`` and the GPU index of ``--device``), another device model or software
(``merge_facts``), a shard that did not finish, a point that two shards measured.

The merged result holds every shard's measurements and arm facts, each tagged with its shard
(``StageSpec.shard``, ``ArmResult.shard``). A point keeps the baseline measured in its own shard
(same process, same interleaved rounds): at a frame count that several shards measured there is
one baseline per shard, and the results table and every view keep them apart (``baseline
(shard 1)``); none is averaged or paired with another shard's points. Its config is the shards'
without ``--shard``: the run that the N shards make up together. ``run.merged_shards`` keeps
each shard's folder, device and whole environment; the top-level environment is shard 0's.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from stc_bench.compare import latency_facts
from stc_bench.errors import BenchUsageError
from stc_bench.measurement import Measurement
from stc_bench.results import RunResult, load_results, results_file
from stc_bench.shard import Shard

PER_SHARD_CONFIG = ("shard", "out", "device")
"""Settings the shards of one run may differ in: which shard, where it was written, and the GPU
index (``--gpu K`` for shard K on one node); the device model is checked in ``merge_facts``."""

PER_SHARD_RUN = ("shard", "resumed_utc", "resumed_host", "compile_failure", "failed_frames")
"""Keys of a shard's run block that belong to that shard alone (kept in ``run.merged_shards``)."""

RUN_FACTS = ("video", "weights", "chunk_frames", "attn_implementation", "architecture")
"""What a shard's run block says about how it was built, beyond ``latency_facts``: must agree."""

OPTION_NAMES = {"framework": "the framework", "ratios": "--ratio", "intervals": "--interval", "arm_overrides": "--arm"}
"""The option of a BenchConfig field whose name is not its option's (``--tokens-per-frame`` is)."""


class MergeError(BenchUsageError):
    """The folders given cannot be merged as they are; the message names what differs and where."""


class ShardRun(NamedTuple):
    """One shard's run: its folder, its result and which shard it is."""

    folder: Path
    result: RunResult
    shard: Shard

    @property
    def name(self) -> str:
        """``FOLDER (shard K/N)``, how messages name it."""
        return f"{self.folder} (shard {self.shard.label})"


def merge_facts(result: RunResult) -> dict[str, Any]:
    """What every shard of one merged run must share: ``compare.latency_facts`` (device model,
    scale, dtype, torch, driver major), the kind of device, the software (transformers, stc,
    git commit, Python, CUDA runtime) and how the pipeline was built (``RUN_FACTS``)."""
    env = result.environment
    facts: dict[str, Any] = dict(latency_facts(result))
    facts["device kind"] = str(env.get("device", "")).rstrip("0123456789") or None  # cuda0 and cuda1 are one kind
    for key in ("transformers", "stc_version", "git_commit", "python", "cuda_version"):
        facts[key] = env.get(key)
    for key in RUN_FACTS:
        facts[f"run.{key}"] = result.run.get(key)
    return facts


def load_shards(paths: Iterable[Path]) -> list[ShardRun]:
    """Read each folder's results.json (``ResultsError`` names a file that cannot be read) and
    which shard it holds; a run made without ``--shard`` is refused."""
    shards = []
    for path in paths:
        result = load_results(path)
        folder = results_file(path).parent
        if result.config.shard is None:
            raise MergeError(f"{folder}: not a shard (its run had no --shard K/N); merge joins the folders of "
                             "stc-bench sweep ... --shard K/N runs, one per K")
        shards.append(ShardRun(folder, result, Shard.parse(result.config.shard)))
    return shards


def _differs(what: str, shards: list[ShardRun], value) -> str | None:
    """``WHAT is A in FOLDER (shard 0/3) and FOLDER (shard 2/3) but B in FOLDER (shard 1/3)``, or
    None when every shard has the same value."""
    groups: dict[str, list[str]] = {}
    for s in shards:
        groups.setdefault(_text(value(s)), []).append(s.name)
    if len(groups) < 2:
        return None
    return f"{what} is " + " but ".join(f"{v} in {' and '.join(names)}" for v, names in groups.items())


def _text(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value) or "(none)"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_shards(shards: list[ShardRun]) -> None:
    """Refuse, in one line naming the folders, shards that do not make up one finished run."""
    if not shards:
        raise MergeError("no folder given: pass the run folder of every shard, e.g. stc-bench merge reports/sweep/*/")
    problem = _differs("the shard count N", shards, lambda s: s.shard.count)
    if problem:
        raise MergeError(f"{problem}; merge the N folders of one --shard K/N run")
    by_index: dict[int, list[ShardRun]] = {}
    for s in shards:
        by_index.setdefault(s.shard.index, []).append(s)
    twice = [group for group in by_index.values() if len(group) > 1]
    if twice:
        raise MergeError(f"shard {twice[0][0].shard.label} given {len(twice[0])} times: {', '.join(str(s.folder) for s in twice[0])}; "
                         "pass each shard's folder once")
    config = [name for name in shards[0].result.config.to_dict() if name not in PER_SHARD_CONFIG]
    problems = [p for name in config if (p := _differs(OPTION_NAMES.get(name, "--" + name.replace("_", "-")), shards,
                                                      lambda s, name=name: s.result.config.to_dict().get(name)))]
    if problems:
        raise MergeError("the shards' settings differ: " + "; ".join(problems) + "; the shards of one run share every "
                         "setting but --shard (and --out, --gpu): re-run the odd shards with the others' settings")
    facts = list(merge_facts(shards[0].result))
    problems = [p for key in facts if (p := _differs(key, shards, lambda s, key=key: merge_facts(s.result).get(key)))]
    if problems:
        raise MergeError("the shards' device or software differ: " + "; ".join(problems) + "; the shards of one run must "
                         "run on one device model with one software setup (re-run the odd shards where the others ran)")
    count = shards[0].shard.count
    missing = [k for k in range(count) if k not in by_index]
    if missing:
        have = ", ".join(s.name for s in sorted(shards, key=lambda s: s.shard.index))
        raise MergeError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(f'{k}/{count}' for k in missing)} missing (given: "
                         f"{have}); pass the run folder of every shard K = 0..{count - 1}")
    unfinished = [s for s in shards if not s.result.complete]
    if unfinished:
        s = unfinished[0]
        why = "; ".join(s.result.errors) or "stopped early"
        raise MergeError(f"{s.name} did not finish ({why}); finish it with stc-bench sweep --resume {s.folder}, "
                         "then merge again")
    owner: dict[tuple[int, Any], ShardRun] = {}
    for s in shards:
        for arm in s.result.compared:
            other = owner.setdefault((arm.frames, arm.arm), s)
            if other is not s:
                raise MergeError(f"{arm.frames} frames {arm.arm.label} was measured by two shards, {other.name} and "
                                 f"{s.name}: these are not the shards of one run; pass each run's own folders")


def merge_shards(shards: list[ShardRun], out: Path) -> RunResult:
    """One result of the checked shards (``check_shards``): every measurement and arm tagged with
    its shard, ordered by frame count (in ``--frames`` order) then shard; config without --shard
    and with ``out`` as its --out."""
    check_shards(shards)
    shards = sorted(shards, key=lambda s: s.shard.index)
    first = shards[0].result
    config = dataclasses.replace(first.config, shard=None, out=str(out))
    order = {f: i for i, f in enumerate(config.frames)}
    arms = [dataclasses.replace(a, shard=s.shard.index) for s in shards for a in s.result.arms]
    arms.sort(key=lambda a: (order.get(a.frames, len(order)), a.shard))  # stable: the baseline stays first in its shard
    measurements = [Measurement(dataclasses.replace(m.spec, shard=s.shard.index), list(m.times_ms), m.warmup,
                                [list(c) for c in m.chunk_ms], copy.deepcopy(m.metadata))
                    for s in shards for m in s.result.measurements]
    measurements.sort(key=lambda m: (order.get(m.spec.frames, len(order)), m.spec.shard))
    run = {k: v for k, v in copy.deepcopy(first.run).items() if k not in PER_SHARD_RUN}
    failures = [f"shard {s.shard.label}: {s.result.run['compile_failure']}" for s in shards if s.result.run.get("compile_failure")]
    if failures:
        run["compile_failure"] = "; ".join(failures)
    run["merged_shards"] = [{
        "shard": s.shard.label, "folder": str(s.folder),
        "device": s.result.environment.get("device"), "device_name": s.result.environment.get("device_name"),
        "gpu_uuid": s.result.environment.get("gpu_uuid"),
        "run": {k: copy.deepcopy(s.result.run[k]) for k in PER_SHARD_RUN if k in s.result.run},
        "environment": copy.deepcopy(s.result.environment),
    } for s in shards]
    errors = [f"shard {s.shard.label}: {e}" for s in shards for e in s.result.errors]
    return RunResult(config=config, environment=copy.deepcopy(first.environment), run=run, measurements=measurements,
                     arms=arms, errors=errors, complete=True)


def refuse_output_inside(out: Path, shards: list[ShardRun]) -> None:
    """Refuse an ``--out`` that is a shard's folder or inside one: a merge writes only a new folder of its own."""
    target = Path(out).resolve()
    for s in shards:
        folder = s.folder.resolve()
        if target == folder or folder in target.parents:
            raise MergeError(f"--out {out} is inside {s.name}: pass another folder (merge never writes into a shard's folder)")
