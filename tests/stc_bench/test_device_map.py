"""--device-map auto: the 72B preset, placement across GPUs planned on the meta device, the
multi-GPU timer's barrier bookkeeping, and the option's validation. Nothing real-size is ever
allocated: large models exist only on the meta device, and fake GPU budgets stand for GPUs."""

import pytest
import torch
from accelerate.utils import check_device_map

from stc.flops import prefill_macs
from stc_bench.config import BenchConfig
from stc_bench.device import Device
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.frameworks.parts import QWEN2, SIGLIP, CausalLM, llm_parameters, qwen2_config
from stc_bench.frameworks.weights import build_empty
from stc_bench.placement import (
    LLM_MEMORY_FRACTION,
    PlacementError,
    _device_of,
    _ranges,
    checkpoint_device_map,
    describe_placement,
    devices_of,
    gpu_budgets,
    materialise,
    plan_device_map,
)
from stc_bench.runner import choose_builder, choose_scale
from stc_bench.timing import StageTimer

GIB = 2**30


def meta_qwen2(scale: str, dtype=torch.float16):
    from transformers import Qwen2ForCausalLM

    return build_empty(lambda: Qwen2ForCausalLM(qwen2_config(QWEN2[scale])), dtype)


@pytest.fixture(scope="module")
def qwen2_72b():
    """Qwen2-72B on the meta device (0.04 s, no memory)."""
    return meta_qwen2("72b")


# --- the 72B preset --------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["tiny", "full", "72b"])
def test_parameter_count_of_the_shape_model_is_the_built_modules(scale, qwen2_72b):
    model = qwen2_72b if scale == "72b" else meta_qwen2(scale)
    shape = QWEN2[scale]
    assert sum(p.numel() for p in model.parameters()) == llm_parameters(shape)
    # The MAC model multiplies one token by every weight matrix once (its attention term is 2d
    # for one token over an empty cache): the weights less embedding, biases and norms.
    d, kv = shape.width, shape.kv_heads * (shape.width // shape.heads)
    not_multiplied = shape.vocab * d + shape.layers * (d + 2 * kv + 2 * d) + d
    assert prefill_macs(shape, 1, 0, 1) - shape.layers * 2 * d == llm_parameters(shape) - not_multiplied


def test_72b_preset_is_llava_onevision_72b_and_never_chosen_by_auto():
    shape = QWEN2["72b"]
    assert (shape.width, shape.mlp_width, shape.layers, shape.heads, shape.kv_heads, shape.vocab) == (
        8192, 29568, 80, 64, 8, 152064)
    assert llm_parameters(shape) == pytest.approx(72.7e9, rel=0.001)
    assert SIGLIP["72b"] == SIGLIP["full"]
    rekv = get_framework("rekv")
    assert "72b" in rekv.presets and rekv.build_across_gpus is not None
    for name in FRAMEWORK_MODULES:
        if name != "rekv":
            assert "72b" not in get_framework(name).presets and get_framework(name).build_across_gpus is None
    cuda, cpu = Device(torch.device("cuda", 0)), Device(torch.device("cpu"))
    for device in (cuda, cpu):
        assert choose_scale(BenchConfig(device_map="auto"), device)[0] in ("full", "small")


def test_72b_pipeline_builds_on_the_meta_device():
    pipeline = get_framework("rekv").build("72b", torch.device("meta"), torch.float16)
    assert len(pipeline.llm.decoder.layers) == 80 and pipeline.llm.shape == QWEN2["72b"]
    assert pipeline.projector.linear_2.out_features == 8192
    assert "80 layers, width 8192" in pipeline.description["llm"]


# --- placement --------------------------------------------------------------------------------

def test_72b_on_four_80_gib_gpus_puts_whole_layers_in_order(qwen2_72b):
    device_map = plan_device_map(qwen2_72b, {i: 80 * GIB for i in range(4)}, torch.float16)
    assert all(isinstance(d, int) for d in device_map.values())  # nothing on the CPU or the disk
    layers = [device_map[f"model.layers.{i}"] for i in range(80)]  # each layer mapped whole, exactly once
    assert layers == sorted(layers) and set(layers) == {0, 1, 2, 3}
    assert device_map["model.embed_tokens"] == 0
    assert device_map["model.norm"] == device_map["lm_head"] == layers[-1] == 3
    check_device_map(qwen2_72b, device_map)  # every parameter covered
    per_gpu = [layers.count(i) for i in range(4)]
    assert max(per_gpu) - min(per_gpu) <= 3  # balanced, as from_pretrained(device_map="auto") balances


def test_too_little_gpu_memory_is_refused_with_what_is_needed(qwen2_72b):
    with pytest.raises(PlacementError) as err:
        plan_device_map(qwen2_72b, {i: 30 * GIB for i in range(4)}, torch.float16)
    message = str(err.value)
    assert message.startswith("--device-map auto: the LLM's weights need 135.4 GiB in float16, the 4 visible GPU(s) "
                              "offer 120.0 GiB for them (cuda:0 30.0 GiB")
    assert "would not fit" in message and "pass a smaller --scale" in message and "\n" not in message
    with pytest.raises(PlacementError, match="no CUDA GPU is visible"):
        plan_device_map(qwen2_72b, {}, torch.float16)


def test_gpu_budgets_keep_headroom():
    assert gpu_budgets({0: 1000, 1: 2000}) == {0: int(1000 * LLM_MEMORY_FRACTION), 1: int(2000 * LLM_MEMORY_FRACTION)}


def test_a_placed_model_computes_what_the_single_device_model_does():
    """The GPU path on the CPU: a tiny Qwen2 planned over four fake GPUs, each GPU mapped to the CPU,
    materialised with accelerate's hooks: same weights, logits and KV cache as ``build_random``."""
    model = meta_qwen2("tiny", torch.float32)
    plan = plan_device_map(model, {i: 280_000 for i in range(4)}, torch.float32)
    assert len(set(plan.values())) > 1 and all(isinstance(d, int) for d in plan.values())
    placed = materialise(model, {name: "cpu" for name in plan}, seed=5)
    assert hasattr(placed.model.layers[0], "_hf_hook") and hasattr(placed.lm_head, "_hf_hook")
    reference = CausalLM.random(QWEN2["tiny"], torch.device("cpu"), torch.float32, seed=5)
    llm = CausalLM(placed.model, placed.lm_head, QWEN2["tiny"])
    ids = reference.random_ids(12, seed=1)
    caches = llm.new_cache(), reference.new_cache()
    with torch.inference_mode():
        for _ in range(2):  # the second call reads the cache the first one wrote
            assert torch.equal(llm.text_logits(ids, caches[0]), reference.text_logits(ids, caches[1]))
    assert caches[0].get_seq_length() == 24
    assert devices_of(llm.modules()) == [torch.device("cpu")]
    assert describe_placement(llm.modules()) == {
        "devices": ["cpu"], "parameter_bytes": {"cpu": llm_parameters(QWEN2["tiny"]) * 4},
        "layers": {"cpu": ["Qwen2DecoderLayer 0-1"]}}


def test_layer_ranges():
    assert _ranges([5, 0, 1, 2, 6, 9]) == "0-2, 5-6, 9"


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")  # a parameter's key
def test_a_checkpoint_map_keeps_the_tower_on_the_run_device(monkeypatch):
    from transformers import LlavaOnevisionForConditionalGeneration

    import stc_bench.device
    from stc_bench.frameworks.rekv import SHAPES, llava_onevision_config
    from stc_bench.frameworks.transformers_compat import llava_onevision_parts

    root = build_empty(lambda: LlavaOnevisionForConditionalGeneration(llava_onevision_config(SHAPES["tiny"])), torch.float32)
    _, _, decoder, lm_head = llava_onevision_parts(root)
    monkeypatch.setattr(stc_bench.device, "gpu_free_memory", lambda: {0: 700_000, 1: 700_000, 2: 700_000})
    device_map = checkpoint_device_map(root, decoder, lm_head, rest=1, dtype=torch.float32)
    check_device_map(root, device_map)  # every parameter covered
    names = {id(m): n for n, m in root.named_modules()}
    tower = [k for k in device_map if k.startswith(names[id(llava_onevision_parts(root)[0])])]
    assert tower and all(device_map[k] == 1 for k in tower)
    layers = [_device_of(f"{names[id(decoder)]}.layers.{i}.mlp", device_map) for i in range(QWEN2["tiny"].layers)]
    assert all(isinstance(d, int) for d in layers) and layers == sorted(layers)
    assert device_map[names[id(lm_head)]] >= layers[-1] and len(set(device_map.values())) > 1


# --- the timer across GPUs --------------------------------------------------------------------

class FakeEvent:
    log: list

    def __init__(self, enable_timing: bool = False):
        self.timing, self.device, self.at = enable_timing, None, None

    def record(self, stream):
        assert self.device in (None, stream.index), "an event is recorded on one device only"
        self.device, self.at = stream.index, len(FakeEvent.log)
        FakeEvent.log.append(("record", "mark" if self.timing else "join", stream.index))

    def elapsed_time(self, end):
        assert self.device == end.device == 0
        return float(end.at - self.at)


class FakeStream:
    def __init__(self, index: int):
        self.index = index

    def wait_event(self, event):
        FakeEvent.log.append(("wait", self.index, "mark" if event.timing else "join", event.device))


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams, events and synchronize as recorders: the CUDA branch of the timer runs on a CPU."""
    FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: FakeStream(torch.device(device).index))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: FakeEvent.log.append(("synchronize", device.index)))
    monkeypatch.setattr(Device, "activate", lambda self: __import__("contextlib").nullcontext())
    return FakeEvent.log


def test_each_mark_is_a_barrier_across_the_gpus_of_a_placed_run(fake_cuda):
    device = Device(torch.device("cuda", 0)).with_peers(
        [torch.device("cuda", 2), torch.device("cuda", 0), torch.device("cpu"), torch.device("cuda", 1)])
    assert device.peers == (torch.device("cuda", 1), torch.device("cuda", 2))
    timer = StageTimer(device)
    with timer.span("prefill", 0):
        fake_cuda.append(("work",))
    barrier = [("record", "join", 1), ("wait", 0, "join", 1), ("record", "join", 2), ("wait", 0, "join", 2),
               ("record", "mark", 0), ("wait", 1, "mark", 0), ("wait", 2, "mark", 0)]
    assert fake_cuda == [*barrier, ("work",), *barrier]
    fake_cuda.clear()
    [span] = timer.finish()
    assert fake_cuda == [("synchronize", 0), ("synchronize", 1), ("synchronize", 2)]
    assert (span.stage, span.chunk, span.ms) == ("prefill", 0, 8.0)  # from the start mark to the end mark, both on cuda:0


def test_one_gpu_marks_stay_one_event_each(fake_cuda):
    timer = StageTimer(Device(torch.device("cuda", 0)))
    with timer.span("vit", 0):
        pass
    assert fake_cuda == [("record", "mark", 0), ("record", "mark", 0)]


# --- the option -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="balanced"), "--device-map balanced: must be one of none, auto"),
    (dict(device_map="auto", device="cpu"), "--device-map auto: must be used on CUDA GPUs, not with --device cpu"),
    (dict(scale="72b"), "--scale 72b: must be used with --device-map auto"),
])
def test_bad_device_map_settings_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BenchConfig(**kwargs)


def test_the_setting_is_saved_with_the_config():
    config = BenchConfig(scale="72b", device_map="auto", device="cuda:1")
    assert BenchConfig.from_dict(config.to_dict()) == config and config.to_dict()["device_map"] == "auto"
    assert BenchConfig().device_map == "none"


def test_the_runner_refuses_what_cannot_be_placed():
    cuda, cpu = Device(torch.device("cuda", 0)), Device(torch.device("cpu"))
    rekv, streamforest = get_framework("rekv"), get_framework("streamforest")
    assert choose_builder(BenchConfig(device_map="auto"), rekv, "full", cuda) is rekv.build_across_gpus
    assert choose_builder(BenchConfig(), rekv, "full", cuda) is rekv.build
    with pytest.raises(ValueError, match="this run is on the cpu .*leave out --device-map"):
        choose_builder(BenchConfig(device_map="auto"), rekv, "full", cpu)
    with pytest.raises(ValueError, match="streamforest cannot place its LLM across GPUs \\(only rekv can\\)"):
        choose_builder(BenchConfig(framework="streamforest", device_map="auto"), streamforest, "full", cuda)
    with pytest.raises(ValueError, match="--scale 72b: streamforest has no such preset; pass one of full, small, tiny"):
        choose_builder(BenchConfig(framework="streamforest", scale="72b", device_map="auto"), streamforest, "72b", cuda)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
@pytest.mark.parametrize("args, message", [
    (["--scale", "tiny", "--device-map", "auto"], "--device-map auto: it places the LLM across CUDA GPUs, and this run is on the cpu"),
    (["--scale", "tiny", "--device-map", "auto", "--device", "cpu"], "--device-map auto: must be used on CUDA GPUs"),
    (["--scale", "72b"], "--scale 72b: must be used with --device-map auto"),
    (["--device-map", "sequential"], "--device-map sequential: must be one of none, auto"),
])
def test_device_map_usage_errors_exit_2_with_one_line(cli, tmp_path, args, message):
    result = cli("rekv", *args, "--frames", "2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_help_explains_the_option(cli):
    result = cli("rekv", "--help")
    assert "--device-map" in result.output and "72b" in result.output
