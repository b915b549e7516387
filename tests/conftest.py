"""Shared fixtures: tiny random CLIP/SigLIP towers (transformers' own test sizes) and clips."""

from __future__ import annotations

import gc

import pytest
import torch

# One intra-op thread for the whole suite: its models are tiny, so a second thread only adds a
# wake-up to every op, and on a 2-core machine shared with other work an op waits for whichever
# of its threads was preempted (measured: the not-slow tests in 43 s with one thread, 296 s with
# two, on a machine also running a benchmark). A run's own thread pinning never raises it.
torch.set_num_threads(1)


def pytest_collection_finish(session):
    """Every test module is imported now (torch, transformers, hypothesis, module-level models):
    freeze those objects out of the garbage collector's generations, so the full collections that
    the tests' allocations trigger stop scanning them each time (measured: 2.4 s of the not-slow
    run in the collector, 1.8 s frozen)."""
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests, with a visible reason, where CUDA is absent (the suite runs on CPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_VIT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=2)


def build_tiny_tower(kind: str, **overrides):
    """A random-weight CLIP or SigLIP vision tower in eval mode, float32, on CPU."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config_cls, model_cls = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
    }[kind]
    return model_cls(config_cls(**{**TINY_VIT, **overrides})).eval()


@pytest.fixture(scope="session", params=["clip", "siglip"])
def tower(request):
    """A tiny CLIP and a tiny SigLIP tower (the test runs once for each)."""
    return build_tiny_tower(request.param)


def moving_clip(frames: int, size: int = 30, seed: int = 0) -> torch.Tensor:
    """(frames, 3, size, size): a fixed random scene where only a small square moves."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(3, size, size, generator=g)
    clip = scene.expand(frames, -1, -1, -1).clone()
    for i in range(frames):
        top = (2 * i) % (size - 6)
        clip[i, :, top : top + 6, 4:10] = torch.randn(3, 6, 6, generator=g)
    return clip


def noisy_clip(frames: int, size: int = 30, seed: int = 0) -> torch.Tensor:
    """(frames, 3, size, size): a scene plus fresh noise of a random amplitude in every pixel.

    Every token changes by a different amount, so the ranking of changed tokens has clear
    gaps and float noise (batch vs single-frame kernels) cannot flip which tokens are chosen.
    """
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(3, size, size, generator=g)
    amplitude = torch.rand(1, 1, size, size, generator=g)
    return scene + amplitude * torch.randn(frames, 3, size, size, generator=g)


@pytest.fixture
def frames() -> torch.Tensor:
    """Eight frames of a mostly static clip with one moving patch region."""
    return moving_clip(8)
