"""Bad inputs and faults, as an adversarial user would try them, through the real CLI.

Every case must end with its exit code (2: usage, 1: a fault, with what was kept and how to go
on, 130: Ctrl-C), exactly one line starting with ``error:`` that names the fix, no traceback,
and every file that existed before exactly as it was (no new or emptied run folder either).
Most cases fail before any model is built; the few that need a run build the tiny presets, or the
toy framework where the case is about the run's machinery, not a model.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = ["--scale", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--video", "synthetic"]
"""A tiny run's options, but --frames and --out."""


@pytest.fixture(scope="session")
def saved_run(tiny_result, tmp_path_factory) -> Path:
    """The session's tiny ReKV run (4 frames, 3 repeats) saved as a run folder, once."""
    folder = tmp_path_factory.mktemp("prepared") / "run"
    folder.mkdir()
    tiny_result.save(folder / "results.json")
    return folder


class World:
    """A case's files: a copy of the prepared run folder, an empty --out root, and helpers that
    write broken variants beside them."""

    def __init__(self, root: Path, saved: Path):
        self.root = root
        self.run = root / "run"
        shutil.copytree(saved, self.run)
        self.out = root / "out"
        self.out.mkdir()
        self.n = 0

    def document(self) -> dict:
        return json.loads((self.run / "results.json").read_text())

    def folder(self, name: str = "bad") -> Path:
        self.n += 1
        path = self.root / f"{name}{self.n}"
        path.mkdir()
        return path

    def results(self, edit: Callable[[dict], object]) -> str:
        """A run folder whose results.json is the prepared one after ``edit`` (which edits in
        place, or returns the document to write instead)."""
        doc = self.document()
        doc = edit(doc) or doc
        folder = self.folder()
        (folder / "results.json").write_text(json.dumps(doc))
        return str(folder)

    def raw(self, content: bytes) -> str:
        folder = self.folder()
        (folder / "results.json").write_bytes(content)
        return str(folder)

    def incomplete(self, partial: object | None = None, **edits) -> str:
        """The run folder made an interrupted run: --frames 4,2 with 4 finished, optionally a partial.json."""
        doc = self.document()
        doc["config"]["frames"] = [4, 2]
        doc["complete"] = False
        doc["run"].update(edits)
        (self.run / "results.json").write_text(json.dumps(doc))
        if partial is not None:
            (self.run / "partial.json").write_text(partial if isinstance(partial, str) else json.dumps(partial))
        return str(self.run)

    def lock(self, pid: int) -> list[str]:
        """Lock the run folder as process ``pid`` would (no arguments to add)."""
        (self.run / "run.lock").write_text(f"{pid} {socket.gethostname()}\n")
        return []

    def file(self, name: str, content: bytes | str = b"") -> str:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def checkpoint(self, config: object = None, files: dict[str, bytes] | None = None) -> str:
        """A --checkpoint folder: config.json (a LLaVA-OneVision one unless given) and ``files``."""
        folder = self.folder("ckpt")
        if config is not False:
            (folder / "config.json").write_text(config if isinstance(config, str) else
                                                json.dumps(config if config is not None else {"model_type": "llava_onevision"}))
        for name, content in (files if files is not None else {"model.safetensors": safetensors_bytes()}).items():
            (folder / name).write_bytes(content)
        return str(folder)


def safetensors_bytes(**tensors) -> bytes:
    from safetensors.torch import save

    return save(tensors or {"w": torch.zeros(4)})


def partial(rounds: int = 1, frames: int = 2, labels=("baseline", "stc r0.25 N2 k64"), samples: int | None = None) -> dict:
    n = rounds if samples is None else samples
    stages = ("vit", "compress", "prefill")
    return {"frames": frames, "rounds": rounds, "samples": {
        label: {"totals": {s: [1.0] * n for s in stages}, "chunks": {s: [[0.5, 0.5]] * n for s in stages}, "peak_mb": None}
        for label in labels}}


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_error(output: str, code: int, exit_code: int, pattern: str) -> str:
    assert exit_code == code, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    lines = error_lines(output)
    assert len(lines) == 1, output
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def edit(path: str, value):
    """An edit of a results document: set the entry at a dotted path (``measurements.0.times_ms``)."""
    def apply(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return apply


def drop(path: str):
    def apply(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return apply


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "results.json")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[World], list[str]]
    code: int
    message: str
    """A regular expression the one ``error:`` line must match; it names the fix."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


def frameworks_build(framework: str, build) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(monkeypatch: pytest.MonkeyPatch) -> None:
        import importlib

        module = importlib.import_module(f"stc_bench.frameworks.{framework}")
        monkeypatch.setattr(module, "FRAMEWORK", dataclasses.replace(module.FRAMEWORK, build=build))
    return apply


def ckpt(w: World, path: str) -> list[str]:
    """A rekv run from the checkpoint folder ``path``."""
    return ["rekv", "--checkpoint", path, "--device", "cpu", "--out", str(w.out)]


def run(*args: str) -> Callable[[World], list[str]]:
    """A tiny rekv run into the case's --out with extra options."""
    return lambda w: ["rekv", *TINY, "--frames", "2", "--out", str(w.out), *args]


CASES = [
    # --- messages: typer's usage errors, one line naming the fix ---------------------------------
    Case("repeats-abc", lambda w: ["rekv", "--repeats", "abc"], 2, r"--repeats 'abc': not a whole number; pass a whole number, e.g. --repeats 20"),
    Case("warmup-float", lambda w: ["rekv", "--warmup", "1.5"], 2, r"--warmup '1.5': not a whole number; .*e.g. --warmup 5"),
    Case("fps-word", lambda w: ["rekv", "--fps", "fast"], 2, r"--fps 'fast': not a number; pass a number, e.g. --fps 0.5"),
    Case("chunk-frames-word", lambda w: ["sweep", "--chunk-frames", "x"], 2, r"--chunk-frames 'x': not a whole number; pass a whole number"),
    Case("gpu-word", lambda w: ["rekv", "--gpu", "first"], 2, r"--gpu 'first': not a whole number"),
    Case("doctor-gpu-word", lambda w: ["doctor", "--gpu", "x"], 2, r"--gpu 'x': not a whole number"),
    Case("unknown-command", lambda w: ["nonesuch"], 2, r"no such command 'nonesuch'; choose one of rekv, .*sweep"),
    Case("unknown-option", lambda w: ["rekv", "--bogus"], 2, r"no such option --bogus.*; see stc-bench rekv --help"),
    Case("misspelt-option", lambda w: ["rekv", "--framse", "4"], 2, r"no such option --framse \(did you mean .*--frames"),
    Case("report-no-argument", lambda w: ["report"], 2, r"missing argument RESULTS; usage: stc-bench report \[OPTIONS\] RESULTS"),
    Case("compare-one-argument", lambda w: ["compare", str(w.run)], 2, r"missing argument NEW; usage: stc-bench compare \[OPTIONS\] BASE NEW"),
    Case("option-without-value", lambda w: ["rekv", "--frames"], 2, r"--frames needs a value, e.g. --frames 16"),
    Case("extra-argument", lambda w: ["rekv", "extra"], 2, r"unexpected argument 'extra': stc-bench rekv takes no more arguments"),
    Case("flag-with-value", lambda w: ["rekv", "--cuda-graph=yes"], 2, r"--cuda-graph takes no value; write it alone"),
    Case("retry-failed-alone", lambda w: ["sweep", "--retry-failed"], 2, r"--retry-failed goes with --resume DIR"),
    # --- run options refused before anything is built ---------------------------------------------
    Case("ratio-word", lambda w: ["rekv", "--ratio", "abc"], 2, r"--ratio 'abc': not a number; e.g. --ratio 0.25"),
    Case("ratio-nan", lambda w: ["rekv", "--ratio", "nan"], 2, r"--ratio nan: must be in \(0, 1\]"),
    Case("frames-exponent", lambda w: ["rekv", "--frames", "1e3"], 2, r"--frames '1e3': not a whole number; e.g. --frames 16"),
    Case("seed-beyond-64-bits", lambda w: ["rekv", "--seed", str(2**64)], 2, r"--seed 18446744073709551616: must fit in 64 bits.*e.g. --seed 0"),
    Case("seed-below-64-bits", lambda w: ["rekv", "--seed", str(-(2**63) - 1)], 2, r"must fit in 64 bits"),
    Case("fps-infinite", lambda w: ["rekv", "--fps", "inf"], 2, r"--fps inf: must be a finite number.*e.g. --fps 0.5"),
    Case("fps-nan", lambda w: ["rekv", "--fps", "nan"], 2, r"--fps nan: must be a finite number"),
    Case("scale-unknown", lambda w: ["rekv", "--scale", "huge"], 2, r"--scale huge: must be one of auto, full, small, tiny"),
    Case("dtype-unknown", lambda w: ["rekv", "--dtype", "int8"], 2, r"--dtype int8: must be one of auto, float32"),
    Case("device-unknown", lambda w: ["rekv", "--device", "tpu"], 2, r"--device tpu: must be auto, cpu, cuda or cuda:N"),
    Case("arms-unknown", lambda w: ["rekv", "--arms", "nonesuch"], 2, r"--arms nonesuch: must be one or more of baseline"),
    Case("arm-without-value", lambda w: ["rekv", "--arm", "tome:tokens_per_frame"], 2, r"write METHOD:KNOB=VALUE, e.g."),
    Case("arm-unknown-knob", run("--arms", "baseline,tome", "--arm", "tome:nope=1"), 2, r"tome has no knob 'nope' \(its knobs: tokens_per_frame\)"),
    Case("checkpoint-with-tiny", lambda w: [*ckpt(w, w.checkpoint()), "--scale", "tiny"], 2,
         r"--scale tiny: must be auto or full with --checkpoint"),
    Case("out-is-a-file", lambda w: ["rekv", *TINY, "--out", w.file("blocker")], 2, r"--out .*blocker: cannot create a run folder there .*pass a writable --out"),
    # --- video paths: the path printed as it is, the fix named -----------------------------------
    Case("video-directory", lambda w: [*run()(w), "--video", str(w.root)], 2, r"--video '.*': is a directory; pass a video file in it"),
    Case("video-missing", lambda w: [*run()(w), "--video", str(w.root / "missing.mp4")], 2, r"missing.mp4': no such file; check the path"),
    Case("video-rich-markup", lambda w: [*run()(w), "--video", "a[/]b.mp4"], 2, r"--video 'a\[/\]b.mp4': no such file"),
    Case("video-rich-style", lambda w: [*run()(w), "--video", "[bold red]x[/].mp4"], 2, r"--video '\[bold red\]x\[/\].mp4': no such file"),
    Case("video-emoji-code", lambda w: [*run()(w), "--video", ":smile:.mp4"], 2, r"--video ':smile:.mp4': no such file"),
    Case("video-empty", lambda w: [*run()(w), "--video", ""], 2, r"--video '': empty; pass a video file path"),
    Case("video-device-file", lambda w: [*run()(w), "--video", os.devnull], 2, r"is not a regular file; pass a video file"),
    Case("video-not-a-video", lambda w: [*run()(w), "--video", w.file("clip.mp4", "text")], 2, r"not a readable video .*pass an mp4/mkv/webm file"),
    # --- --checkpoint: safetensors only, checked before transformers sees the folder --------------
    Case("checkpoint-missing", lambda w: ckpt(w, str(w.root / "nowhere")), 2, r"no such directory; pass a local HF checkpoint folder"),
    Case("checkpoint-no-config", lambda w: ckpt(w, w.checkpoint(config=False)), 2, r"no config.json inside; pass the folder that holds config.json"),
    Case("checkpoint-config-truncated", lambda w: ckpt(w, w.checkpoint(config='{"model_type": "llava')), 2,
         r"config.json is unreadable .*download the checkpoint again"),
    Case("checkpoint-config-list", lambda w: ckpt(w, w.checkpoint(config="[1, 2]")), 2,
         r"config.json holds a list, not an object; download the checkpoint again"),
    Case("checkpoint-other-model", lambda w: ckpt(w, w.checkpoint(config={"model_type": "bert"})), 2, r"model_type is 'bert', expected llava_onevision"),
    Case("checkpoint-no-weights", lambda w: ckpt(w, w.checkpoint(files={})), 2, r"no \*.safetensors files; only safetensors weights are loaded"),
    Case("checkpoint-pickle-bin", lambda w: ckpt(w, w.checkpoint(files={"model.safetensors": safetensors_bytes(),
                                                                         "pytorch_model.bin": b"\x80\x02}q\x00."})), 2,
         r"pytorch_model.bin is not safetensors .*convert it, or move it out of the folder"),
    Case("checkpoint-pickle-pt", lambda w: ckpt(w, w.checkpoint(files={"model.safetensors": safetensors_bytes(), "extra.pt": b"\x80\x02."})), 2,
         r"extra.pt is not safetensors"),
    Case("checkpoint-index-names-pickle", lambda w: ckpt(w, w.checkpoint(files={
        "model-00001.safetensors": safetensors_bytes(),
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.pkl.shard"}}).encode()})),
        2, r"names the shard 'model-00002.pkl.shard', not a .safetensors file .*fix or remove the index"),
    Case("checkpoint-index-escapes-folder", lambda w: ckpt(w, w.checkpoint(files={
        "model-00001.safetensors": safetensors_bytes(),
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": "../outside.safetensors"}}).encode()})),
        2, r"names the shard '../outside.safetensors', not a .safetensors file in the folder"),
    Case("checkpoint-index-missing-shard", lambda w: ckpt(w, w.checkpoint(files={
        "model-00001.safetensors": safetensors_bytes(),
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00002.safetensors"}}).encode()})),
        2, r"the shard model-00002.safetensors named in .* is missing; download the whole checkpoint"),
    Case("checkpoint-truncated-safetensors", lambda w: ckpt(w, w.checkpoint(files={
        "model.safetensors": safetensors_bytes(w=torch.zeros(64))[:-100]})), 2,
         r"model.safetensors is truncated or corrupt \(.*tensors end at byte.*\); download it again"),
    Case("checkpoint-pickle-named-safetensors", lambda w: ckpt(w, w.checkpoint(files={
        "model.safetensors": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."})), 2,
         r"model.safetensors is truncated or corrupt \(its header claims"),
    Case("checkpoint-garbage-header", lambda w: ckpt(w, w.checkpoint(files={
        "model.safetensors": (10).to_bytes(8, "little") + b"not json!!" + b"\0" * 8})), 2,
         r"model.safetensors is truncated or corrupt \(its header is not JSON\)"),
    Case("checkpoint-other-framework", lambda w: ["dispider", "--checkpoint", w.checkpoint(), "--device", "cpu", "--out", str(w.out)], 2,
         r"--checkpoint is supported for rekv only so far; run dispider with random weights"),
    # --- results files of the wrong shape: one line naming the file and the entry ------------------
    Case("results-list", lambda w: ["report", w.raw(b"[]")], 2, r"results.json: not an stc-bench results file \(the top level is a list"),
    Case("results-empty-object", lambda w: ["report", w.raw(b"{}")], 2, r"results.json: results schema version None is not supported"),
    Case("results-empty-file", lambda w: ["report", w.raw(b"")], 2, r"results.json: not an stc-bench results file \(empty\); pass a results.json"),
    Case("results-truncated", lambda w: ["report", w.raw((w.run / "results.json").read_bytes()[:300])], 2, r"not valid JSON, truncated\?"),
    Case("results-not-utf8", lambda w: ["report", w.raw(b"\xff\xfe{\x00")], 2, r"\(not UTF-8 text\)"),
    Case("results-version-string", lambda w: ["report", w.results(edit("schema_version", "2"))], 2, r"schema version '2' is not supported"),
    Case("results-empty-samples", lambda w: ["report", w.results(edit("measurements.0.times_ms", []))], 2,
         r"measurements\[0\].times_ms is empty: a measurement needs at least one sample"),
    Case("results-string-sample", lambda w: ["report", w.results(edit("measurements.1.times_ms.0", "1.5"))], 2,
         r"measurements\[1\].times_ms\[0\] is the string '1.5', not a number"),
    Case("results-nan-sample", lambda w: ["report", w.results(edit("measurements.2.times_ms.1", float("nan")))], 2,
         r"measurements\[2\].times_ms\[1\] is NaN, not a finite number"),
    Case("results-negative-sample", lambda w: ["report", w.results(edit("measurements.0.times_ms.0", -3.0))], 2, r"is -3.0, below 0"),
    Case("results-infinite-chunk", lambda w: ["compare", str(w.run), w.results(edit("measurements.0.chunk_ms.0.0", float("inf")))], 2,
         r"measurements\[0\].chunk_ms\[0\]\[0\] is the number inf, not a finite number"),
    Case("results-unknown-scale", lambda w: ["report", w.results(edit("config.scale", "huge"))], 2, r"config: --scale huge: must be one of"),
    Case("results-unknown-run-scale", lambda w: ["report", w.results(edit("run.scale", "gigantic"))], 2, r"run.scale 'gigantic' is not one of full"),
    Case("results-string-frames", lambda w: ["report", w.results(edit("arms.0.frames", "4"))], 2, r"arms\[0\].frames is the string '4', not a whole number"),
    Case("results-measurements-object", lambda w: ["report", w.results(edit("measurements", {}))], 2, r"\(measurements is an object, not a list\)"),
    Case("results-knob-list", lambda w: ["report", w.results(edit("arms.1.arm.knobs.ratio", [0.25]))], 2, r"arms\[1\].arm.knobs.ratio is a list, not a single value"),
    Case("results-spec-without-stage", lambda w: ["report", w.results(drop("measurements.0.spec.stage"))], 2, r"measurements\[0\].spec.stage is missing"),
    Case("results-unknown-method", lambda w: ["report", w.results(edit("arms.1.arm.method", "magic"))], 2, r"arms\[1\].arm.method 'magic' is not a method"),
    Case("results-unknown-framework", lambda w: ["report", w.results(edit("config.framework", "nonesuch"))], 2, r"config.framework 'nonesuch' is not one of"),
    Case("results-peak-memory-string", lambda w: ["report", w.results(edit("measurements.0.metadata.peak_memory_mb", "2 GB"))], 2,
         r"peak_memory_mb is the string '2 GB', not a number"),
    Case("report-folder-without-results", lambda w: ["report", str(w.folder())], 2, r"no results.json here; pass a results file or a run folder"),
    Case("report-out-another-run", lambda w: ["report", str(w.run), "--out", w.results(edit("config.seed", 7))], 2,
         r"--out .* holds another run's results.json; pass a new or empty folder"),
    Case("compare-new-is-a-list", lambda w: ["compare", str(w.run), w.raw(b"[1, 2]")], 2, r"the top level is a list"),
    Case("compare-markdown-unwritable", lambda w: ["compare", str(w.run), str(w.run), "--markdown", str(w.root / "no" / "dir.md")], 2,
         r"--markdown .*: cannot write \(No such file or directory\); pass a writable file"),
    # --- resume: validated before anything is measured ---------------------------------------------
    Case("resume-complete", lambda w: ["sweep", "--resume", str(w.run)], 2, r"the run is complete, nothing to resume; start a new run"),
    Case("resume-results-file", lambda w: ["sweep", "--resume", str(w.run / "results.json")], 2, r"the run is complete, nothing to resume"),
    Case("resume-missing-folder", lambda w: ["sweep", "--resume", str(w.root / "nowhere")], 2, r"no such folder; pass the run folder of an interrupted run"),
    Case("resume-no-results", lambda w: ["sweep", "--resume", str(w.folder())], 2, r"no results.json here; pass the run folder of an interrupted run"),
    Case("resume-other-framework", lambda w: ["sweep", "dispider", "--resume", w.incomplete()], 2,
         r"sweep dispider --resume .*: that folder holds a rekv run, not dispider; run stc-bench sweep --resume"),
    Case("resume-with-options", lambda w: ["sweep", "--resume", w.incomplete(), "--ratio", "0.3"], 2, r"drop --ratio"),
    Case("resume-corrupt-results", lambda w: ["sweep", "--resume", w.results(edit("measurements.0.times_ms", "fast"))], 2,
         r"measurements\[0\].times_ms is the string 'fast', not a list of latencies"),
    Case("resume-partial-truncated", lambda w: ["sweep", "--resume", w.incomplete(json.dumps(partial())[:80])], 2,
         r"partial.json is truncated or not JSON .*; delete .*partial.json to measure that frame count again"),
    Case("resume-partial-list", lambda w: ["sweep", "--resume", w.incomplete("[]")], 2, r"partial.json: expected an object with frames, rounds and samples; delete"),
    Case("resume-partial-too-many-rounds", lambda w: ["sweep", "--resume", w.incomplete(partial(rounds=50))], 2,
         r"it claims 50 measured rounds of --frames 2, but the run has --repeats 3; delete"),
    Case("resume-partial-fewer-samples", lambda w: ["sweep", "--resume", w.incomplete(partial(rounds=2, samples=1))], 2,
         r"2 rounds claimed, but not 2 samples; delete"),
    Case("resume-partial-other-frames", lambda w: ["sweep", "--resume", w.incomplete(partial(frames=99))], 2,
         r"its frame count 99 is not one of this run's --frames 4,2; delete"),
    Case("resume-partial-finished-frames", lambda w: ["sweep", "--resume", w.incomplete(partial(frames=4))], 2,
         r"--frames 4 is already finished in results.json; delete"),
    Case("resume-partial-other-arms", lambda w: ["sweep", "--resume", w.incomplete(partial(labels=("baseline", "tome k64")))], 2,
         r"its arms \(baseline, tome k64\) are not this run's \(baseline, stc r0.25 N2 k64\); delete"),
    Case("resume-partial-nan", lambda w: ["sweep", "--resume", w.incomplete(json.dumps(partial()).replace("1.0", "NaN", 1))], 2,
         r"a sample is not a latency in ms"),
    Case("resume-locked", lambda w: ["sweep", "--resume", w.incomplete(), *w.lock(os.getppid())], 2,
         rf"is in use by process {os.getppid()} \(lock file .*run.lock\); wait until it ends, or delete the lock file"),
    Case("resume-only-failed-left", lambda w: ["sweep", "--resume", w.incomplete(failed_frames=[{"frames": 2, "error": "CUDA out of memory"}])], 2,
         r"nothing left to measure but --frames 2, which failed \(CUDA out of memory\); add --retry-failed"),
    # --- settings that cannot work, refused after the build, before the clip -----------------------
    Case("budget-above-pooled-tokens", run("--tokens-per-frame", "500"), 2,
         r"--tokens-per-frame 500: a frame has 196 tokens on rekv where the budget applies .*; pass 196 or fewer"),
    Case("peer-budget-above-pooled-tokens", run("--arms", "baseline,tome", "--arm", "tome:tokens_per_frame=300"), 2,
         r"--arm tome:tokens_per_frame=300: a frame has 196 tokens on rekv"),
    Case("budget-above-tower-tokens", lambda w: ["dispider", *TINY, "--frames", "2", "--arms", "baseline,tome", "--tokens-per-frame", "300", "--out", str(w.out)], 2,
         r"a frame has 256 tokens on dispider leaving the vision tower \(CLS not counted\), so tome would keep them all; pass 256 or fewer"),
    Case("frames-beyond-memory", lambda w: ["dispider", *TINY, "--frames", "1000000000", "--out", str(w.out)], 2,
         r"--frames 1000000000: the clip needs [\d,.]+ GiB of host memory \(1000000000 frames x 3 x 32 x 32 float32.*pass --frames \d+ or fewer"),
    # --- faults before anything is measured: one line, no run folder left behind --------------------
    Case("ctrl-c-before-the-runner", run(), 130, r"interrupted \(Ctrl-C\); run the command again",
         patch=lambda mp: mp.setattr("stc_bench.device.resolve_device", ctrl_c)),
    Case("ctrl-c-while-building", run(), 130, r"interrupted \(Ctrl-C\) before anything was measured; no run folder was kept",
         patch=frameworks_build("rekv", ctrl_c)),
    Case("disk-full-at-the-first-write", run(), 1,
         r"cannot write results.json \(No space left on device\); nothing was measured and no run folder was kept: free space",
         patch=lambda mp: mp.setattr("stc_bench.run_folder.RunFolder.save_result", no_space)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, cli, saved_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a case that ran by mistake would write reports/ here, and be seen
    world = World(tmp_path, saved_run)
    args = case.args(world)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = snapshot(tmp_path)
    result = cli(*args)
    assert_one_error(result.output, case.code, result.exit_code, case.message)
    assert snapshot(tmp_path) == before  # nothing earlier changed, nothing new (no empty run folder)


def test_the_campaign_covers_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message given where CUDA is absent")
def test_a_gpu_that_is_not_there(cli, tmp_path):
    result = cli("rekv", "--gpu", "0", "--out", str(tmp_path))
    assert_one_error(result.output, 2, result.exit_code, r"CUDA is not available on this machine .*leave out --gpu or pass --device cpu")
    assert not any(tmp_path.iterdir())


# --- faults that keep what was measured ----------------------------------------------------------

def test_out_of_memory_at_the_first_frame_count_measures_the_rest_and_resume_skips_it(cli, toy, no_plots, tmp_path, monkeypatch):
    import stc_bench.runner as runner

    real = runner.measure_frame_count

    def first_fails(pipeline, config, run, device, clip, *args, **kwargs):
        if clip.shape[0] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipeline, config, run, device, clip, *args, **kwargs)

    monkeypatch.setattr(runner, "measure_frame_count", first_fails)
    monkeypatch.setattr("stc_bench.cli._utc_stamp", lambda: "20260101T000000Z")
    taken = tmp_path / "20260101T000000Z_toy_cpu"
    taken.mkdir()  # another run started in the same second: this one picks another name
    args = ["sweep", "toy", *TINY, "--ratio", "0.25", "--frames", "2,1", "--out", str(tmp_path)]
    result = cli(*args)
    line = assert_one_error(result.output, 1, result.exit_code, r"CUDA out of memory at --frames 2 .*; measured --frames 1; what was "
                                                                  r"measured is in .*-2 \(continue with: stc-bench sweep --resume .* --retry-failed\)")
    folder = tmp_path / "20260101T000000Z_toy_cpu-2"
    assert str(folder) in line and not any(taken.iterdir())
    saved = json.loads((folder / "results.json").read_text())
    assert [a["frames"] for a in saved["arms"]] == [1, 1] and not saved["complete"]
    assert [f["frames"] for f in saved["run"]["failed_frames"]] == [2]

    again = cli("sweep", "--resume", str(folder))  # 2 failed: not retried unless asked
    assert_one_error(again.output, 2, again.exit_code, r"nothing left to measure but --frames 2, which failed .*add --retry-failed")
    monkeypatch.setattr(runner, "measure_frame_count", real)
    retried = cli("sweep", "--resume", str(folder), "--retry-failed")
    assert retried.exit_code == 0, retried.output
    final = json.loads((folder / "results.json").read_text())
    assert final["complete"] and sorted(a["frames"] for a in final["arms"]) == [1, 1, 2, 2] and "failed_frames" not in final["run"]
    assert not (folder / "run.lock").exists()


def test_a_disk_that_fills_mid_sweep_keeps_what_was_measured(cli, toy, tmp_path, monkeypatch):
    from stc_bench.run_folder import RunFolder

    real = RunFolder.save_progress

    def fills_at_the_second_frame_count(self, frames, rounds, samples):
        if frames == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "partial.json"))
        return real(self, frames, rounds, samples)

    monkeypatch.setattr(RunFolder, "save_progress", fills_at_the_second_frame_count)
    result = cli("sweep", "toy", *TINY, "--ratio", "0.25", "--frames", "2,1", "--out", str(tmp_path))
    assert_one_error(result.output, 1, result.exit_code, r"cannot write .*partial.json \(No space left on device\); what was measured "
                                                         r"is kept in .*: free space .*then continue with: stc-bench sweep --resume")
    (folder,) = tmp_path.iterdir()
    saved = json.loads((folder / "results.json").read_text())
    assert [a["frames"] for a in saved["arms"]] == [2, 2] and not saved["complete"]
    assert sorted(p.name for p in folder.iterdir()) == ["results.json"]  # no temp file, no lock, nothing torn


def test_out_of_memory_while_building_keeps_a_folder_with_the_error(cli, tmp_path, monkeypatch):
    frameworks_build("dispider", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))(monkeypatch)
    result = cli("dispider", *TINY, "--frames", "2", "--out", str(tmp_path))
    assert_one_error(result.output, 1, result.exit_code, r"host out of memory while building dispider .*; try a smaller --scale.*"
                                                         r"continue with: stc-bench sweep --resume")
    (folder,) = tmp_path.iterdir()
    assert json.loads((folder / "results.json").read_text())["errors"]


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    from stc_bench import results

    path = tmp_path / "results.json"
    path.write_text('{"old": true}')

    def half_then_full(data, f, **kwargs):
        f.write('{"new": ')
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.json, "dump", half_then_full)
    with pytest.raises(OSError):
        results.write_json_atomically(path, {"new": True})
    assert path.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --- data loss: reports beside the input, locks, unknown keys --------------------------------------

def test_report_never_rewrites_the_results_file_and_keeps_unknown_keys(cli, saved_run, no_plots, tmp_path):
    world = World(tmp_path, saved_run)
    doc = world.document()
    doc["written_by_a_newer_stc_bench"] = {"keep": [1, 2]}
    (world.run / "results.json").write_text(json.dumps(doc))
    before = (world.run / "results.json").read_bytes()
    result = cli("report", str(world.run))
    assert result.exit_code == 0, result.output
    assert (world.run / "results.json").read_bytes() == before and (world.run / "report.md").is_file()
    elsewhere = cli("report", str(world.run / "results.json"), "--out", str(tmp_path / "copy"))
    assert elsewhere.exit_code == 0, elsewhere.output
    assert (tmp_path / "copy" / "results.json").read_bytes() == before  # a byte copy: the new folder is a run folder
    again = cli("report", str(world.run), "--out", str(tmp_path / "copy"))  # the same run: re-rendering is fine
    assert again.exit_code == 0, again.output
    from stc_bench.results import RunResult

    assert RunResult.from_dict(doc).to_dict()["written_by_a_newer_stc_bench"] == {"keep": [1, 2]}  # a resume keeps them too


def test_a_stale_lock_is_taken_over(cli, saved_run, tmp_path):
    world = World(tmp_path, saved_run)
    pid = dead_pid()
    (world.run / "run.lock").write_text(f"{pid} {socket.gethostname()}\n")
    result = cli("sweep", "--resume", str(world.run))
    assert_one_error(result.output, 2, result.exit_code, r"the run is complete, nothing to resume")  # not "in use"
    assert not (world.run / "run.lock").exists()


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    from stc_bench.run_folder import RunFolder

    names = [RunFolder.create(tmp_path, "20260101T000000Z_rekv_cpu").path.name for _ in range(3)]
    assert names == ["20260101T000000Z_rekv_cpu", "20260101T000000Z_rekv_cpu-2", "20260101T000000Z_rekv_cpu-3"]


def test_compare_refuses_to_pass_when_new_lacks_points_of_base(cli, saved_run, tmp_path):
    world = World(tmp_path, saved_run)

    def only_the_baseline(doc):
        doc["arms"] = [a for a in doc["arms"] if a["arm"]["method"] == "baseline"]
        doc["measurements"] = [m for m in doc["measurements"] if m["spec"]["arm"]["method"] == "baseline"]

    new = world.results(only_the_baseline)
    result = cli("compare", str(world.run), new, "--fail-on", "median:500%")
    assert result.exit_code == 3, result.output
    assert "points of BASE missing in NEW" in result.output and "1 of 2: 4f stc r0.25 N2 k64" in result.output
    strict = cli("compare", str(world.run), new, "--fail-on", "median:500%", "--require-all")
    assert strict.exit_code == 1 and "regression" in strict.output


# --- the standard streams: a real process --------------------------------------------------------

def stc_bench(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    code = "import sys; from stc_bench.cli import app; sys.argv[0] = 'stc-bench'; app()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, "COLUMNS": "100", **(env or {})},
                          capture_output=kwargs.pop("capture_output", True), **kwargs)


def test_output_into_head_ends_quietly():
    shell = f"{sys.executable} -c \"import sys; from stc_bench.cli import app; app()\" rekv --help | head -n 1 >/dev/null; " \
            "echo \"${PIPESTATUS[0]}\""
    out = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "141" and out.stderr == ""


def test_output_into_a_full_device_is_one_error():
    with open("/dev/full", "w") as full:
        out = stc_bench("rekv", "--help", stdout=full, stderr=subprocess.PIPE, text=True, capture_output=False)
    assert_one_error(out.stderr, 1, out.returncode, r"cannot write to standard output \(No space left on device\); redirect it")


def test_closed_output_is_no_error():
    out = stc_bench("rekv", "--help", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, capture_output=False,
                    preexec_fn=lambda: os.close(1))
    assert out.returncode == 0 and out.stderr == ""


def test_a_non_utf8_terminal_gets_ascii_look_alikes(saved_run, no_plots, tmp_path, monkeypatch):
    """PYTHONIOENCODING=ascii or a Latin-1 locale: the reports' dashes, arrows and boxes print as ASCII."""
    from typer.testing import CliRunner

    from stc_bench.cli import app

    monkeypatch.setenv("COLUMNS", "160")
    world = World(tmp_path, saved_run)
    result = CliRunner(charset="ascii").invoke(app, ["report", str(world.run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = result.stdout_bytes.decode("ascii")  # every byte is ASCII
    assert "2,916 -> 2,916" in text and " - |" in text and "Traceback" not in text, text  # the arrow, the em dash


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    code = ("import os, signal, sys; import stc_bench.cli as cli; "
            "cli.build_config = lambda *a: os.kill(os.getpid(), signal.SIGINT); "
            f"sys.argv = ['stc-bench', 'rekv', '--out', {str(tmp_path)!r}]; cli.app()")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert_one_error(out.stderr + out.stdout, 130, out.returncode, r"interrupted \(Ctrl-C\)")
    assert not any(tmp_path.iterdir())
