"""Like for like: the null arm (--interval 1) dispatches exactly the baseline's ViT kernels.

A reduction is only STC's if both arms run the same kernels wherever they do the same work. The
test counts the operators that one streamed pass dispatches inside its ``vit`` spans, per
framework, with the baseline and with a cacher that refreshes every frame, and requires the same
counts of every operator that launches work (views and metadata operators aside). No timing is
involved.
"""

import collections

import pytest
import torch

from stc_bench.device import resolve_device
from stc_bench.frameworks import FRAMEWORK_MODULES, get_framework
from stc_bench.launches import CountingTimer, OperatorCounter
from stc_bench.measurement import BASELINE
from stc_bench.methods import get_method
from stc_bench.timing import StageTimer

NULL_ARM = get_method("stc").arm(ratio=0.25, interval=1)


def kernels_of_one_pass(pipeline, clip, arm) -> collections.Counter:
    with torch.inference_mode():
        pipeline.stream(clip, arm, StageTimer(resolve_device("cpu")), pipeline.default_chunk_frames)  # one-time work first
        counter = OperatorCounter()
        with counter:
            pipeline.stream(clip, arm, CountingTimer(resolve_device("cpu"), counter), pipeline.default_chunk_frames)
    return counter.by_owner["vit"]  # views left out by the counter


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_MODULES))
def test_null_arm_dispatches_the_baselines_kernels(framework):
    pipeline = get_framework(framework).build("tiny", torch.device("cpu"), torch.float32, 0, None)
    clip = torch.randn(6, 3, pipeline.image_size, pipeline.image_size)
    baseline, null = kernels_of_one_pass(pipeline, clip, BASELINE), kernels_of_one_pass(pipeline, clip, NULL_ARM)
    attention = {op: n for op, n in baseline.items() if "scaled_dot_product" in op}
    assert attention, "the pass ran no attention kernel"
    assert {op: n for op, n in null.items() if "scaled_dot_product" in op} == attention
    assert null == baseline, {op: (baseline[op], null[op]) for op in baseline.keys() | null.keys() if baseline[op] != null[op]}
