"""CacherConfig(compile=True): the selective layers through torch.compile give the eager results.

Compilation takes seconds per graph on CPU, so the tests that compile are ``slow`` (CI runs them)."""

import pytest
import torch

import stc
from stc import CacherConfig
from tests.conftest import build_tiny_tower, noisy_clip


def _stream(tower, clip, config):
    with stc.cacher_attached(tower, config) as handle, torch.inference_mode():
        outputs = [tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(clip.shape[0])]
    return torch.cat(outputs), handle.stats


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_compiled_selective_layers_match_eager_and_choose_the_same_tokens(kind):
    tower, clip = build_tiny_tower(kind), noisy_clip(6)
    eager, eager_stats = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2))
    compiled, compiled_stats = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2, compile=True))
    assert compiled_stats == eager_stats                       # same frames selective, same token counts
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)  # the compiler may reorder float sums


def test_a_failed_compilation_runs_eager_says_why_once_and_gives_the_eager_answer(monkeypatch, caplog):
    from stc.cacher import compiled

    def broken(device_type):
        def fail(*args, **kwargs):
            raise torch._dynamo.exc.InternalTorchDynamoError("no C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_failure", [])
    tower, clip = build_tiny_tower("siglip"), noisy_clip(4)
    eager, _ = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2))
    with caplog.at_level("WARNING", logger="stc.cacher.compiled"):
        fallback, _ = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2, compile=True))
    assert torch.equal(fallback, eager)
    assert compiled.compile_failure() == "InternalTorchDynamoError: no C++ compiler found"
    assert caplog.text.count("torch.compile failed, running eager (InternalTorchDynamoError: no C++ compiler found)") == 1


def test_an_error_of_the_computation_itself_is_not_taken_for_a_compiler_failure(monkeypatch):
    from stc.cacher import compiled

    def out_of_memory(device_type):
        def fail(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return fail

    monkeypatch.setattr(compiled, "_compiled", out_of_memory)
    monkeypatch.setattr(compiled, "_failure", [])
    tower, clip = build_tiny_tower("siglip"), noisy_clip(4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2, compile=True))
    assert compiled.compile_failure() is None
