"""CacherConfig(compile=True): the selective layers through torch.compile give the eager results.

Compilation takes seconds per graph on CPU, so these tests are ``slow`` (CI runs them)."""

import pytest
import torch

import stc
from stc import CacherConfig
from tests.conftest import build_tiny_tower, noisy_clip

pytestmark = pytest.mark.slow


def _stream(tower, clip, config):
    with stc.cacher_attached(tower, config) as handle, torch.inference_mode():
        outputs = [tower(pixel_values=clip[i : i + 1]).last_hidden_state for i in range(clip.shape[0])]
    return torch.cat(outputs), handle.stats


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_compiled_selective_layers_match_eager_and_choose_the_same_tokens(kind):
    tower, clip = build_tiny_tower(kind), noisy_clip(6)
    eager, eager_stats = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2))
    compiled, compiled_stats = _stream(tower, clip, CacherConfig(update_ratio=0.25, cache_interval=2, compile=True))
    assert compiled_stats == eager_stats                       # same frames selective, same token counts
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)  # the compiler may reorder float sums
