"""The transformers version adapter: the declared range, the version check, and each shim on the
installed version (CI runs this file on the newest 5.x and on 4.46.3)."""

import logging
import warnings
from pathlib import Path

import pytest
import torch

from stc_bench.frameworks import transformers_compat as compat

pytestmark = pytest.mark.tier1

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_declares_the_tested_range():
    hf_extra = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if line.startswith("hf = "))
    assert f'"transformers{compat.SUPPORTED}"' in hf_extra
    assert compat.SUPPORTED == ">=4.46,<5.25"


@pytest.mark.parametrize("version", ["4.45.2", "4.40.0", "3.5.1"])
def test_too_old_a_version_is_one_line_naming_the_range(version):
    with pytest.raises(compat.TransformersVersionError) as error:
        compat.check_version(version)
    message = str(error.value)
    assert "\n" not in message and f"transformers {version} is too old" in message
    assert "pip install 'transformers>=4.46,<5.25'" in message
    assert isinstance(error.value, compat.BenchUsageError)   # the CLI's exit-2 class


def test_tested_versions_pass_and_newer_ones_warn(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        for version in ("4.46.0", "4.46.3", "4.51.3", "4.57.6", "5.0.0", "5.24.0", "5.24.9"):
            compat.check_version(version)
        assert not caplog.records
        compat.check_version("5.25.0")
    assert "newer than the tested range >=4.46,<5.25" in caplog.text


def test_installed_version_is_in_range():
    assert compat.MINIMUM.release <= compat.VERSION.release < compat.TESTED_BELOW.release


def tiny_llava():
    from transformers import LlavaOnevisionForConditionalGeneration

    from stc_bench.frameworks.rekv import SHAPES, llava_onevision_config

    return LlavaOnevisionForConditionalGeneration(llava_onevision_config(SHAPES["tiny"])).eval()


def test_llava_onevision_parts_are_tower_projector_decoder_and_head():
    model = tiny_llava()
    tower, projector, decoder, lm_head = compat.llava_onevision_parts(model)
    assert type(tower).__name__ == "SiglipVisionModel"
    assert type(projector).__name__ == "LlavaOnevisionMultiModalProjector"
    assert not hasattr(decoder, "lm_head") and hasattr(decoder, "embed_tokens")   # the bare decoder
    assert lm_head.out_features == model.config.text_config.vocab_size
    owned = {id(p) for p in model.parameters()}
    assert all(id(p) in owned for part in (tower, projector, decoder, lm_head) for p in part.parameters())


def test_from_pretrained_dtype_loads_in_that_dtype(tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    tiny_llava().save_pretrained(tmp_path, safe_serialization=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype", category=FutureWarning)   # deprecated from 4.56
        loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(
            tmp_path, local_files_only=True, use_safetensors=True, **compat.from_pretrained_dtype(torch.bfloat16))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_the_decoder_cache_keyword_fills_the_cache_without_a_deprecation():
    from stc_bench.frameworks.parts import QWEN2, CausalLM

    llm = CausalLM.random(QWEN2["tiny"], torch.device("cpu"), torch.float32, seed=0)
    cache = llm.new_cache()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        first = llm.forward_embeds(torch.randn(1, 5, QWEN2["tiny"].width), cache)
        llm.forward_embeds(torch.randn(1, 3, QWEN2["tiny"].width), cache)
    assert first.shape == (1, 5, QWEN2["tiny"].width) and cache.get_seq_length() == 8


def test_qwen2_vision_forward_returns_merged_tokens_and_the_merger_input():
    from stc_bench.frameworks.livecc import SHAPES, build_vision_tower, patchify

    v = SHAPES["tiny"].vision
    tower = build_vision_tower(v, torch.device("cpu"), torch.float32, seed=0)
    pixels, grid = patchify(torch.randn(4, 3, v.image_size, v.image_size), v.patch_size)
    with torch.inference_mode():
        merged, hidden = compat.qwen2_vision_forward(tower, pixels, grid)
        assert torch.equal(tower.merger(hidden), merged)
    assert hidden.shape == (2 * v.tokens, v.width) and merged.shape == (2 * v.merged_tokens, v.out_width)
    assert not tower.merger._forward_pre_hooks   # nothing left behind


def test_no_init_weights_switches_initialisers_off():
    weight = torch.zeros(3)
    with compat.no_init_weights():
        torch.nn.init.normal_(weight)
    assert torch.equal(weight, torch.zeros(3))
    torch.nn.init.normal_(weight)
    assert not torch.equal(weight, torch.zeros(3))
