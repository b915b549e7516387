"""The method registry: arms from a config, hook points per framework, each peer on every
framework that offers its hook, and a new method as one module plus one registry line."""

import sys
import types

import pytest
import torch

from stc_bench.config import BenchConfig
from stc_bench.device import resolve_device
from stc_bench.frameworks import get_framework
from stc_bench.frameworks.framework import method_stream
from stc_bench.measurement import BASELINE
from stc_bench.methods import METHOD_HELP, METHOD_MODULES, get_method
from stc_bench.methods.method import COMPRESS, Arm, Knob, MethodError, MethodSpec, MethodStream, at_least_one
from stc_bench.runner import arms_of
from stc_bench.timing import StageTimer

PEERS = ("tome", "visionzip", "vidcom2")


def arms(framework="rekv", **options):
    config = BenchConfig(framework=framework, **options)
    return arms_of(config, get_framework(framework).site())


def test_arms_are_the_baseline_then_stc_points_then_each_peer_at_each_budget():
    labels = [a.label for a in arms(arms=("baseline", "stc", "tome", "vidcom2"), ratios=(0.1, 0.25), tokens_per_frame=(32, 64))]
    assert labels == ["baseline", "stc r0.1 N2 k32", "stc r0.1 N2 k64", "stc r0.25 N2 k32", "stc r0.25 N2 k64",
                      "tome k32", "tome k64", "vidcom2 k32", "vidcom2 k64"]


def test_the_baseline_is_always_measured():
    assert [a.label for a in arms(arms=("tome",))] == ["baseline", "tome k64"]


@pytest.mark.parametrize("framework, method, why", [
    ("livecc", "tome", "Qwen2-VL's 2x2 PatchMerger needs every token of the grid"),
    ("dispider", "visionzip", "dispider has no compression step before an LLM pre-fill"),
    ("streamforest", "vidcom2", "streamforest offers no compress hook point"),
])
def test_a_method_without_its_hook_point_is_refused_naming_why(framework, method, why):
    with pytest.raises(MethodError, match=f"--arms {method}: not available on {framework} \\(.*{why}"):
        arms(framework, arms=("baseline", method))


def test_where_each_method_runs():
    runs_on = {m: [f for f in ("rekv", "streamforest", "dispider", "livecc") if get_method(m).why_not(get_framework(f).site()) is None]
               for m in METHOD_MODULES}
    assert runs_on == {"baseline": ["rekv", "streamforest", "dispider", "livecc"],
                       "stc": ["rekv", "streamforest", "dispider", "livecc"],
                       "tome": ["rekv", "streamforest", "dispider"], "visionzip": ["rekv"], "vidcom2": ["rekv"]}


@pytest.mark.parametrize("override, message", [
    ("tome:r=16", "tome has no knob 'r' \\(its knobs: tokens_per_frame\\)"),
    ("tome:tokens_per_frame=abc", "--arm tome:tokens_per_frame=abc: not a int; e.g. --arm tome:tokens_per_frame=64"),
    ("tome:tokens_per_frame=0", "tome:tokens_per_frame=0: must be a whole number >= 1"),
])
def test_bad_knob_overrides_name_the_fix(override, message):
    with pytest.raises(MethodError, match=message):
        arms(arms=("baseline", "tome"), arm_overrides=(override,))


def test_a_knob_override_sets_the_arm():
    assert [a.label for a in arms(arms=("tome",), arm_overrides=("tome:tokens_per_frame=32",))] == ["baseline", "tome k32"]


@pytest.mark.parametrize("options, message", [
    (dict(arms=("baseline", "fastv")), "--arms fastv: must be one or more of baseline, stc, tome, visionzip, vidcom2"),
    (dict(arms=("stc", "stc")), "--arms stc: must be given once each"),
    (dict(arm_overrides=("tome:tokens_per_frame=3",)), "add tome to --arms"),
    (dict(arm_overrides=("stc:ratio=0.5",)), "STC's are --ratio"),
    (dict(arms=("tome",), arm_overrides=("tome=3",)), "write METHOD:KNOB=VALUE"),
])
def test_config_refuses_unknown_or_misplaced_arms(options, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**options)


def test_arm_identity_round_trips_through_json():
    arm = get_method("stc").arm(ratio=0.1, interval=4)
    assert Arm.from_dict(arm.to_dict()) == arm and arm.label == "stc r0.1 N4 k64" and arm.knob("metric") == "cosine"
    assert BASELINE.label == "baseline" and BASELINE.is_baseline


def stream_tokens(framework: str, arm: Arm, frames: int = 4):
    pipeline = get_framework(framework).build("tiny", torch.device("cpu"), torch.float32, 0)
    clip = torch.randn(frames, 3, pipeline.image_size, pipeline.image_size)
    with torch.inference_mode():
        return pipeline, pipeline.stream(clip, arm, StageTimer(resolve_device("cpu")), pipeline.default_chunk_frames, capture=True)


@pytest.mark.parametrize("method", ["visionzip", "vidcom2"])
def test_pre_llm_peers_send_the_budget_per_frame_to_the_llm_on_rekv(method):
    _, out = stream_tokens("rekv", get_method(method).arm(tokens_per_frame=48))
    assert out.tokens == {"vit": 4 * 729, "compress": 4 * 48, "prefill": 4 * 48} and out.llm_steps == [48] * 4
    assert out.logits.shape == (8, 512) and out.cacher_stats is None


def test_tome_merges_inside_the_tower_and_rekv_skips_the_pooling_it_cannot_do():
    """The tiny tower has 2 layers: at most half the tokens per layer, 729 -> 365 -> 183."""
    _, out = stream_tokens("rekv", get_method("tome").arm(tokens_per_frame=64))
    assert out.tokens == {"vit": 4 * 183, "compress": 4 * 183, "prefill": 4 * 183}  # counted from the tensors
    assert out.features.shape == (4, 183, 32)


def test_tome_on_clip_keeps_the_cls_token_and_the_budget():
    from stc_bench.methods.tome import budget_schedule, layer_token_counts

    schedule = budget_schedule(257, 2, 100, class_token=True)
    assert layer_token_counts(257, schedule, class_token=True)[-1] == 101  # 100 patch tokens + CLS
    _, out = stream_tokens("dispider", get_method("tome").arm(tokens_per_frame=100), frames=16)
    assert out.tokens == {"vit": 16 * 101}


def test_tome_macs_fall_with_the_merged_tokens():
    pipeline, out = stream_tokens("streamforest", get_method("tome").arm(tokens_per_frame=200))
    base = pipeline.macs(4, BASELINE, 1, out)["vit"]
    assert pipeline.macs(4, get_method("tome").arm(tokens_per_frame=200), 1, out)["vit"] < 0.8 * base


def test_visionzip_restores_the_selection_layer_after_the_stream():
    pipeline, _ = stream_tokens("rekv", get_method("visionzip").arm())
    # transformers 4.5x's output capture leaves the class's own forward, bound, in an instance dict
    installed = [m.__dict__["forward"] for m in pipeline.vision_tower.modules() if "forward" in m.__dict__]
    assert all(getattr(f, "__func__", None) is type(f.__self__).forward for f in installed)


def test_a_new_method_is_one_module_and_one_registry_line(monkeypatch, cli, toy, tmp_path):
    """What a fourth peer needs: a module defining METHOD (knobs, hook points, a per-stream
    object with the hooks it uses) and its line in METHOD_MODULES (plus its help line)."""

    class KeepFirst(MethodStream):
        def __init__(self, arm, site):
            self.k = arm.knob("tokens_per_frame")

        def compress(self, tokens):
            return tokens[:, : self.k]                                        # (t, k, C)

    module = types.ModuleType("keep_first")
    module.METHOD = MethodSpec(name="keepfirst", summary="keep the first k tokens of each frame",
                               knobs=(Knob("tokens_per_frame", int, 64, "tokens kept", "k", at_least_one),),
                               hooks=frozenset({COMPRESS}), stream=KeepFirst)
    monkeypatch.setitem(sys.modules, "keep_first", module)
    monkeypatch.setitem(METHOD_MODULES, "keepfirst", "keep_first")
    monkeypatch.setitem(METHOD_HELP, "keepfirst", "keep the first k tokens")
    result = cli("sweep", toy, "--scale", "tiny", "--frames", "2", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                 "--video", "synthetic", "--arms", "baseline,keepfirst", "--tokens-per-frame", "16", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "keepfirst k16" in result.output


@pytest.mark.slow
def test_every_arm_of_the_done_when_command_runs_and_writes_the_pareto_plot(cli, tmp_path):
    result = cli("rekv", "--scale", "tiny", "--frames", "2", "--repeats", "2", "--warmup", "0", "--device", "cpu",
                 "--video", "synthetic", "--arms", "baseline,tome,visionzip,vidcom2,stc", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "pareto.png").is_file()
    report = (folder / "report.md").read_text()
    for label in ("tome k64", "visionzip k64", "vidcom2 k64", "stc r0.25 N2 k64"):
        assert f"| {label} |" in report and f"#### {label}" in report
    assert "the video centre is the running mean of every token of the stream so far" in report  # how VidCom² was run
    assert "merged tokens have no grid, so they reach the projector unpooled" in report


def test_method_stream_is_fresh_per_video():
    pipeline = get_framework("rekv").build("tiny", torch.device("cpu"), torch.float32, 0)
    arm = get_method("vidcom2").arm()
    assert method_stream(arm, pipeline.site) is not method_stream(arm, pipeline.site)
