import pytest

from stc_bench.config import BenchConfig, STCPoint


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratios=(0.0,)), "--ratio 0.0: must be in (0, 1]"),
        (dict(ratios=(1.2,)), "--ratio 1.2: must be in (0, 1]"),
        (dict(intervals=(0,)), "--interval 0: must be a whole number >= 1"),
        (dict(frames=(0,)), "--frames 0: must be a whole number >= 1"),
        (dict(frames=()), "--frames (none): must be given at least once"),
        (dict(tokens_per_frame=(0,)), "--tokens-per-frame 0: must be a whole number >= 1"),
        (dict(repeats=0), "--repeats 0: must be a whole number >= 1"),
        (dict(warmup=-1), "--warmup -1: must be a whole number >= 0"),
        (dict(scale="huge"), "--scale huge: must be one of auto, full, small, tiny"),
        (dict(dtype="int8"), "--dtype int8: must be one of auto, float32, float16, bfloat16"),
        (dict(fps=0), "--fps 0: must be > 0"),
        (dict(fps=float("inf")), "--fps inf: must be a finite number of frames per second"),
        (dict(fps=float("nan")), "--fps nan: must be a finite number of frames per second"),
        (dict(seed=2**63), f"--seed {2**63}: must fit in 64 bits"),
        (dict(chunk_frames=0), "--chunk-frames 0: must be a whole number >= 1"),
        (dict(checkpoint="/x", scale="small"), "--scale small: must be auto or full with --checkpoint"),
        (dict(compile=True, cuda_graph=True), "--compile with --cuda-graph: must be used without --cuda-graph"),
    ],
)
def test_bad_values_name_the_option(kwargs, message):
    with pytest.raises(ValueError) as err:
        BenchConfig(**kwargs)
    assert message in str(err.value)


def test_points_are_the_cartesian_product():
    config = BenchConfig(ratios=(0.1, 0.5), intervals=(2, 4), tokens_per_frame=(64,))
    assert config.points == [STCPoint(0.1, 2, 64), STCPoint(0.1, 4, 64), STCPoint(0.5, 2, 64), STCPoint(0.5, 4, 64)]
    assert STCPoint(0.25, 2, 64).label == "r0.25 N2 k64"


def test_round_trip_through_dict():
    config = BenchConfig(frames=(4, 8), ratios=(0.1, 0.25), video="clip.mp4")
    assert BenchConfig.from_dict(config.to_dict()) == config
    assert BenchConfig.from_dict({**config.to_dict(), "added_in_a_later_version": 1}) == config


def test_a_compiled_arm_says_so_in_its_label_and_an_eager_one_does_not():
    from stc_bench.methods import get_method

    stc = get_method("stc")
    assert stc.arm(compile=True).label == "stc r0.25 N2 k64 compiled"
    assert stc.arm().label == "stc r0.25 N2 k64"
