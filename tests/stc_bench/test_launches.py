"""Launch figures: operators per frame and stage, the same code path on CPU as on a GPU."""

import pytest
import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import get_framework
from stc_bench.launches import StageLaunches, launch_verdict, profile_launches
from stc_bench.measurement import BASELINE
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def rekv():
    pipeline = get_framework("rekv").build("tiny", torch.device("cpu"), torch.float32, 0, None)
    clip = torch.randn(4, 3, pipeline.image_size, pipeline.image_size)
    return pipeline, clip


def test_every_stage_gets_its_operators_per_frame_and_no_verdict_on_cpu(rekv):
    pipeline, clip = rekv
    stc = get_method("stc").arm(ratio=0.25, interval=2)
    with torch.inference_mode():
        for arm in (BASELINE, stc):
            pipeline.stream(clip, arm, StageTimer(CPU), 1)  # one-time work
    base = profile_launches(pipeline, clip, BASELINE, CPU, 1)
    arm = profile_launches(pipeline, clip, stc, CPU, 1)
    assert set(base) == set(arm) == {"vit", "compress", "prefill"}
    assert all(s.operators_per_frame > 0 and s.verdict is None and s.prequeued_ms is None for s in base.values())
    # Half the frames run selective layers, which dispatch more operators than full ones.
    assert arm["vit"].operators_per_frame > base["vit"].operators_per_frame
    again = profile_launches(pipeline, clip, stc, CPU, 1)
    assert again == arm                                       # a count, not a timing: it repeats exactly


def test_stage_launches_round_trip_and_derive_their_verdict():
    gpu = StageLaunches(operators_per_frame=310.5, prequeued_ms=10.0, span_ms=13.0, enqueue_ms=4.0, head_start_ms=40.0)
    assert StageLaunches.from_dict(gpu.to_dict()) == gpu
    assert gpu.verdict == launch_verdict(13.0, 10.0, 4.0, 40.0)
    assert gpu.verdict.startswith("launch-bound (+30% over pre-queued)")
