"""Serving S videos concurrently (``--streams``): each framework's lockstep pass, the methods'
per-stream compression, and the exact counts the FLOP model reads."""

import pytest
import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import get_framework
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

TOL = 1e-5
"""A batch of S streams may take other kernel paths than one: float rounding, nothing else."""
SERVING = ("rekv", "dispider", "livecc")
ARMS = {
    "baseline": {},
    "stc": {"tokens_per_frame": 16},
    "vidcom2": {"tokens_per_frame": 16},
    "visionzip": {"tokens_per_frame": 16},
    "tome": {"tokens_per_frame": 16},
}


SHARPER_QUERIES = 30.0
"""Random tiny weights attend almost uniformly: the importance VisionZip ranks has a spread of
3e-7 around 1.4e-3 per token, and neighbours at its cut lie 1e-10 apart, which is how far a
batch of 3 rounds from a batch of 1. Scaling the last layer's queries 30x spreads the scores
100x (gaps at the cut >= 3.5e-7), so only a mix-up of streams, never rounding, flips a choice."""


@pytest.fixture(scope="module")
def pipelines():
    from stc.integrations import find_vision_layers

    built = {name: get_framework(name).build("tiny", torch.device("cpu"), torch.float32, 0) for name in SERVING}
    _, layers, _ = find_vision_layers(built["rekv"].vision_tower)
    with torch.no_grad():
        layers[-1].self_attn.q_proj.weight.mul_(SHARPER_QUERIES)
    return built


def passes(pipeline, arm, clips, frames):
    """The pass of S videos together, and of the first video alone."""
    timer, chunk = StageTimer(resolve_device("cpu")), pipeline.default_chunk_frames
    with torch.inference_mode():
        together = pipeline.stream(clips, arm, timer, chunk, capture=True)
        spans = timer.finish()
        alone = pipeline.stream(clips[0], arm, timer, chunk, capture=True)
        timer.finish()
    return together, alone, spans


RUNS = [("rekv", m) for m in sorted(ARMS)] + [("dispider", m) for m in ("baseline", "stc", "tome")] + [
    ("livecc", m) for m in ("baseline", "stc")]
"""Every method on every framework that offers its hook points (the others refuse it: test_methods)."""


@pytest.mark.parametrize(("name", "method"), RUNS)
def test_the_first_of_s_streams_sees_what_it_sees_alone_and_counts_scale_by_s(pipelines, name, method):
    pipeline = pipelines[name]
    spec = get_method(method)
    assert spec.why_not(pipeline.site) is None
    arm = spec.arm(**ARMS[method])
    frames, streams = 6, 3
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(streams, frames, 3, pipeline.image_size, pipeline.image_size, generator=g)
    together, alone, spans = passes(pipeline, arm, clips, frames)
    assert together.streams == streams and alone.streams == 1
    assert (together.features - alone.features).abs().max() <= TOL
    if alone.logits is not None:
        assert (together.logits - alone.logits).abs().max() <= TOL
    assert together.tokens == {stage: streams * n for stage, n in alone.tokens.items()}
    assert together.llm_steps == alone.llm_steps and together.chunk_kinds == alone.chunk_kinds
    macs_together = pipeline.macs(frames, arm, pipeline.default_chunk_frames, together)
    macs_alone = pipeline.macs(frames, arm, pipeline.default_chunk_frames, alone)
    assert macs_together == {stage: streams * m for stage, m in macs_alone.items()}
    # the S streams share each step's calls: as many timed spans as one stream has
    assert len(spans) == len(pipeline.stages) * len(alone.chunk_kinds)


def test_streamforest_does_not_serve_streams():
    assert not get_framework("streamforest").serves_streams
    assert all(get_framework(name).serves_streams for name in SERVING)


@pytest.mark.parametrize("method", ["stc", "vidcom2"])
def test_stateful_compressors_keep_each_streams_history_apart(pipelines, method):
    """STC-Pruner's temporal anchor and VidCom²'s running centre are per stream: S streams
    compressed together, step after step, equal each stream compressed alone."""
    site = pipelines["rekv"].site
    arm = get_method(method).arm(tokens_per_frame=8)
    g = torch.Generator().manual_seed(1)
    steps = torch.randn(3, 2, 1, 40, 16, generator=g)                            # (steps, S, t, n, C)
    shared = get_method(method).stream(arm, site)
    together = [shared.compress_streams(step) for step in steps]                 # (S, K, C) each
    for s in range(2):
        alone = get_method(method).stream(arm, site)
        for i, step in enumerate(steps):
            assert torch.equal(together[i][s], alone.compress_streams(step[s : s + 1])[0])


def test_a_streams_sweep_measures_every_arm_at_every_s_against_its_own_baseline(cli, toy, tmp_path):
    import json

    from stc_bench.results import RunResult
    from tests.stc_bench.conftest import TOY
    from tests.stc_bench.test_cli import run_folder

    result = cli(*TOY, "--frames", "3", "--streams", "1,2,3", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    folder = run_folder(tmp_path)
    data = json.loads((folder / "results.json").read_text())
    cells = [(a["arm"]["method"], a.get("streams", 1)) for a in data["arms"]]
    assert cells == [(m, s) for s in (1, 2, 3) for m in ("baseline", "stc")]
    run = RunResult.from_dict(data)
    table = run.table()
    assert sorted(table.streams.unique()) == [1, 2, 3]
    for facts in run.compared:  # each reduction against the baseline serving as many streams
        base = run.baseline_facts(facts.frames, None, facts.streams)
        assert base.streams == facts.streams and facts.tokens["vit"] == facts.streams * run.arms[1].tokens["vit"]
        assert facts.macs["prefill"] == facts.streams * run.arms[1].macs["prefill"]
    rows = table[(table.stage == "vit")]
    assert (rows.frames_per_s == rows.streams * 3 / (rows.median_ms / 1000)).all()
    assert rows.step_ms_p90.ge(rows.step_ms_median).all()
    assert (folder / "throughput_vs_streams.png").is_file()
    assert list(json.loads(json.dumps(data))["config"]["streams"]) == [1, 2, 3]
    summary = (folder / "summary.csv").read_text().splitlines()
    assert summary[0].endswith(",streams,step_ms_median,step_ms_p90,frames_per_s") and ",1," in summary[1]
    assert (folder / "reductions.csv").read_text().splitlines()[0].endswith(",round_iqr,streams")
    report = (folder / "report.md").read_text()
    assert "#### 3 frames served concurrently" in report and "#### stc r0.25 N2 k64 x3 streams" in report
    assert "frames/s" in result.output and "stc r0.25 N2 k64 x2 streams" in result.output


def test_a_one_stream_run_writes_no_streams_anywhere(cli, toy, no_plots, tmp_path):
    import json

    from tests.stc_bench.conftest import TOY_RUN
    from tests.stc_bench.test_cli import run_folder

    assert cli(*TOY_RUN, "--device", "cpu", "--out", str(tmp_path)).exit_code == 0
    folder = run_folder(tmp_path)
    data = json.loads((folder / "results.json").read_text())
    assert all("streams" not in a for a in data["arms"]) and all("streams" not in m["spec"] for m in data["measurements"])
    assert "streams" not in (folder / "summary.csv").read_text().splitlines()[0]


def test_streams_on_a_framework_that_serves_one_is_a_usage_error(cli, tmp_path):
    result = cli("streamforest", "--streams", "1,4", "--scale", "tiny", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --streams 1,4: streamforest serves one stream per pass (its memory is built per query, of a "
        "content-dependent size, so S streams cannot pre-fill as one batch); drop --streams, or use a framework "
        "that serves several: rekv, dispider, livecc")
    assert not any(tmp_path.iterdir())


def test_an_interrupted_streams_run_resumes_every_cell(cli, toy, no_plots, tmp_path, monkeypatch):
    import json

    import stc_bench.runner as runner
    from tests.stc_bench.conftest import TOY_RUN
    from tests.stc_bench.test_cli import run_folder

    real_pass, calls = runner._timed_pass, {"n": 0}

    def dies_in_round_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 4 + 2:  # the warm-up round and two measured rounds of 4 cells, then 2 passes of the third
            raise KeyboardInterrupt
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(runner, "_timed_pass", dies_in_round_three)
    stopped = cli(*TOY_RUN, "--streams", "1,2", "--device", "cpu", "--out", str(tmp_path))
    assert stopped.exit_code == 1, stopped.output
    folder = run_folder(tmp_path)
    progress = json.loads((folder / "partial.json").read_text())
    assert progress["rounds"] == 2 and sorted(progress["samples"]) == [
        "baseline", "baseline x2 streams", "stc r0.25 N2 k64", "stc r0.25 N2 k64 x2 streams"]
    monkeypatch.setattr(runner, "_timed_pass", real_pass)
    resumed = cli("sweep", "--resume", str(folder))
    assert resumed.exit_code == 0, resumed.output
    data = json.loads((folder / "results.json").read_text())
    assert data["complete"] and [(a["arm"]["method"], a.get("streams", 1)) for a in data["arms"]] == [
        ("baseline", 1), ("stc", 1), ("baseline", 2), ("stc", 2)]
    assert all(len(m["times_ms"]) == 3 for m in data["measurements"])


def test_compare_pairs_each_s_with_the_same_s(cli, toy, no_plots, tmp_path):
    from tests.stc_bench.conftest import TOY_RUN
    from tests.stc_bench.test_cli import run_folder

    assert cli(*TOY_RUN, "--streams", "1,2", "--device", "cpu", "--out", str(tmp_path / "a")).exit_code == 0
    folder = run_folder(tmp_path / "a")
    result = cli("compare", str(folder), str(folder))
    assert result.exit_code in (0, 3), result.output      # itself: never a regression (3: too few samples to judge)
    assert "REGRESSION" not in result.output and "tokens" not in result.output


def test_each_stream_plays_the_clip_from_its_own_offset_and_the_first_plays_it_as_one_stream_does():
    from stc_bench.runner import serving_clip

    clip = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2)                   # frame i is filled with i
    assert serving_clip(clip, 1) is clip
    four = serving_clip(clip, 4)                                                   # (4, 8, 3, 2, 2)
    assert four[:, :, 0, 0, 0].tolist() == [[(2 * s + i) % 8 for i in range(8)] for s in range(4)]
