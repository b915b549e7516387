import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_bench.measurement import BASELINE, Measurement, StageSpec, paired_reduction
from stc_bench.methods.method import Arm

SPEC = StageSpec("rekv", "tiny", "cpu", "float32", 4, "vit", BASELINE)
STC_SPEC = StageSpec("rekv", "tiny", "cpu", "float32", 4, "vit", Arm("stc", (("ratio", 0.25), ("interval", 2))))


def test_statistics_against_hand_computed_samples():
    m = Measurement(SPEC, [4.0, 1.0, 10.0, 2.0, 3.0])
    assert (m.n, m.min, m.max, m.median, m.mean) == (5, 1.0, 10.0, 3.0, 4.0)
    assert m.iqr == 2.0  # 25th percentile 2, 75th 4
    std = math.sqrt(((0**2) + 3**2 + 6**2 + 2**2 + 1**2) / 4)
    assert m.cv == pytest.approx(std / 4.0)
    assert m.noisy and any("noisy" in w for w in m.warnings)
    steady = Measurement(SPEC, [10.0, 10.1, 9.9, 10.0, 10.0])
    assert not steady.noisy and steady.warnings == []


def test_reduction_against_hand_computed_samples():
    base = Measurement(SPEC, [10.0, 12.0, 11.0, 10.5])
    new = Measurement(STC_SPEC, [5.0, 6.0, 5.5, 5.2])
    r = paired_reduction(base, new)
    assert r.on_min == pytest.approx(1 - 5.0 / 10.0)
    assert r.on_median == pytest.approx(1 - 5.35 / 10.75)
    assert r.ci_low <= r.on_median <= r.ci_high and r.conclusive and r.pairs == 4


def test_identical_arms_give_an_inconclusive_zero_reduction():
    samples = list(np.random.default_rng(0).normal(10, 1, 20))
    r = paired_reduction(Measurement(SPEC, samples), Measurement(STC_SPEC, samples))
    assert r.on_median == 0 and r.ci_low <= 0 <= r.ci_high and not r.conclusive


samples = st.lists(st.floats(0.01, 1e4, allow_nan=False), min_size=1, max_size=30)


@settings(deadline=None, max_examples=50)
@given(times=samples)
def test_min_median_max_order_and_round_trip(times):
    m = Measurement(SPEC, times, warmup=2, chunk_ms=[[t] for t in times], metadata={"tokens": 5})
    assert m.min <= m.median <= m.max
    assert Measurement.from_dict(m.to_dict()) == m


@settings(deadline=None, max_examples=50)
@given(a=samples, b=samples)
def test_merge_keeps_every_sample(a, b):
    merged = Measurement.merge([Measurement(SPEC, a), Measurement(SPEC, b), Measurement(STC_SPEC, b)])
    assert sorted(m.n for m in merged) == sorted([len(a) + len(b), len(b)])


@settings(deadline=None, max_examples=50)
@given(base=samples, new=samples)
def test_reduction_sign_agrees_with_the_medians(base, new):
    n = min(len(base), len(new))
    r = paired_reduction(Measurement(SPEC, base[:n]), Measurement(STC_SPEC, new[:n]))
    assert np.sign(r.on_median) == np.sign(np.median(base[:n]) - np.median(new[:n]))
