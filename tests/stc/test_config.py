import pickle

import pytest

from stc import CacherConfig, PrunerConfig, STCConfig, STCError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_ratio=0.0), "update_ratio=0.0 is out of range: update_ratio must be in (0, 1]"),
        (dict(update_ratio=1.5), "update_ratio=1.5 is out of range: update_ratio must be in (0, 1]"),
        (dict(update_ratio=float("nan")), "update_ratio=nan is out of range: update_ratio must be in (0, 1]"),
        (dict(update_ratio=True), "update_ratio=True is not a number: update_ratio must be a number in (0, 1], e.g. 0.25"),
        (dict(update_ratio="0.5"), "update_ratio='0.5' is not a number: update_ratio must be a number in (0, 1], e.g. 0.25"),
        (dict(update_ratio=None), "update_ratio=None is not a number: update_ratio must be a number in (0, 1], e.g. 0.25"),
        (dict(cache_interval=0), "cache_interval=0 is out of range: cache_interval must be an integer >= 1"),
        (dict(cache_interval=2.0), "cache_interval=2.0 is not an integer: cache_interval must be an integer >= 1, e.g. 2"),
        (dict(cache_interval=True), "cache_interval=True is not an integer: cache_interval must be an integer >= 1, e.g. 2"),
        (dict(metric="dot"), "metric='dot' is not a valid choice: metric must be one of 'cosine', 'l1', 'l2'"),
        (dict(metric=["cosine"]), "metric=['cosine'] is not a valid choice: metric must be one of 'cosine', 'l1', 'l2'"),
        (dict(selection="all"), "selection='all' is not a valid choice: selection must be one of 'shared', 'per_layer'"),
        (dict(cuda_graph="yes"), "cuda_graph='yes' is not a boolean: cuda_graph must be True or False"),
        (dict(cuda_graph=1), "cuda_graph=1 is not a boolean: cuda_graph must be True or False"),
        (dict(compile="yes"), "compile='yes' is not a boolean: compile must be True or False"),
        (dict(compile=True, cuda_graph=True), "cuda_graph=True and compile=True are two ways to cut the same launches: "
                                              "choose one (compile on CUDA replays CUDA graphs of its own)"),
    ],
)
def test_cacher_config_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        CacherConfig(**kwargs)
    assert str(err.value) == message
    assert isinstance(err.value, STCError)
    copy = pickle.loads(pickle.dumps(err.value))  # errors may cross process boundaries
    assert str(copy) == message and copy.allowed == err.value.allowed


SCALES = "gaussian_scales={} is invalid: gaussian_scales must be a non-empty tuple of positive widths, e.g. (0.125, 0.25, 0.5, 1.0, 2.0)"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens_per_frame=0), "tokens_per_frame=0 is out of range: tokens_per_frame must be an integer >= 1"),
        (dict(tokens_per_frame=True), "tokens_per_frame=True is not an integer: tokens_per_frame must be an integer >= 1, e.g. 64"),
        (dict(tokens_per_frame=64.0), "tokens_per_frame=64.0 is not an integer: tokens_per_frame must be an integer >= 1, e.g. 64"),
        (dict(strategy="random"), "strategy='random' is not a valid choice: strategy must be one of 'gaussian', 'dual_anchor'"),
        (dict(channel_keep_ratio=0.0), "channel_keep_ratio=0.0 is out of range: channel_keep_ratio must be in (0, 1]"),
        (dict(channel_keep_ratio=True),
         "channel_keep_ratio=True is not a number: channel_keep_ratio must be a number in (0, 1], e.g. 0.5"),
        (dict(alpha=-0.1), "alpha=-0.1 is out of range: alpha must be in [0, 1]"),
        (dict(alpha=False), "alpha=False is not a number: alpha must be a number in [0, 1], e.g. 0.5"),
        (dict(gaussian_scales=()), SCALES.format("()")),
        (dict(gaussian_scales=(1.0, -2.0)), SCALES.format("(1.0, -2.0)")),
        (dict(gaussian_scales=[1.0]), SCALES.format("[1.0]")),  # a list would make the config unhashable
        (dict(gaussian_scales=1.0), SCALES.format("1.0")),
        (dict(gaussian_scales=("1",)), SCALES.format("('1',)")),
        (dict(gaussian_scales=(True,)), SCALES.format("(True,)")),
    ],
)
def test_pruner_config_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        PrunerConfig(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cacher=PrunerConfig()), "cacher must be a stc.CacherConfig or None (off), got PrunerConfig"),
        (dict(cacher={"update_ratio": 0.5}), "cacher must be a stc.CacherConfig or None (off), got dict"),
        (dict(pruner=64), "pruner must be a stc.PrunerConfig or None (off), got int"),
    ],
)
def test_stc_config_components_of_the_wrong_type_are_refused(kwargs, message):
    with pytest.raises(TypeError) as err:
        STCConfig(**kwargs)
    assert str(err.value) == message


def test_configs_are_frozen_hashable_and_picklable():
    config = STCConfig(cacher=CacherConfig(), pruner=PrunerConfig())
    with pytest.raises(AttributeError):
        config.cacher.update_ratio = 0.5
    assert hash(config) == hash(pickle.loads(pickle.dumps(config)))
    assert CacherConfig() == CacherConfig(update_ratio=0.25, cache_interval=2, metric="cosine", selection="shared")


def test_from_env_reads_the_stc_variables():
    env = {
        "STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "0.5", "STC_CACHE_INTERVAL": "4",
        "STC_TOKEN_PER_FRAME": "64", "STC_CUDA_GRAPH": "1", "STC_SHARE_SELECTION": "0",
    }
    config = STCConfig.from_env(env)
    assert config.cacher == CacherConfig(update_ratio=0.5, cache_interval=4, cuda_graph=True, selection="per_layer")
    assert config.pruner == PrunerConfig(tokens_per_frame=64)


def test_from_env_without_variables_is_the_baseline():
    assert STCConfig.from_env({}) == STCConfig(cacher=None, pruner=None)
    assert STCConfig.from_env({"STC_PATCH_VISION": "0", "STC_UPDATE_TOKEN_RATIO": "0.5"}).cacher is None


@pytest.mark.parametrize(
    "env, message",
    [
        ({"STC_PATCH_VISION": "maybe"}, "STC_PATCH_VISION='maybe' is not a boolean: set it to 1 or 0, e.g. STC_PATCH_VISION=1"),
        ({"STC_PATCH_VISION": "1", "STC_CUDA_GRAPH": "2"}, "STC_CUDA_GRAPH='2' is not a boolean: set it to 1 or 0, e.g. STC_CUDA_GRAPH=1"),
        ({"STC_PATCH_VISION": "1", "STC_SHARE_SELECTION": "per_layer"},
         "STC_SHARE_SELECTION='per_layer' is not a boolean: set it to 1 or 0, e.g. STC_SHARE_SELECTION=0"),
        ({"STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "a lot"},
         "STC_UPDATE_TOKEN_RATIO='a lot' is not a number: set it to a number, e.g. STC_UPDATE_TOKEN_RATIO=0.25"),
        ({"STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "2"},
         "STC_UPDATE_TOKEN_RATIO='2' is out of range: it must be in (0, 1], e.g. STC_UPDATE_TOKEN_RATIO=0.25"),
        ({"STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "nan"},
         "STC_UPDATE_TOKEN_RATIO='nan' is out of range: it must be in (0, 1], e.g. STC_UPDATE_TOKEN_RATIO=0.25"),
        ({"STC_PATCH_VISION": "1", "STC_CACHE_INTERVAL": "2.5"},
         "STC_CACHE_INTERVAL='2.5' is not a whole number: set it to a whole number, e.g. STC_CACHE_INTERVAL=2"),
        ({"STC_PATCH_VISION": "1", "STC_CACHE_INTERVAL": "0"},
         "STC_CACHE_INTERVAL='0' is out of range: it must be an integer >= 1, e.g. STC_CACHE_INTERVAL=2"),
        ({"STC_TOKEN_PER_FRAME": "1e3"},
         "STC_TOKEN_PER_FRAME='1e3' is not a whole number: set it to a whole number, e.g. STC_TOKEN_PER_FRAME=64"),
        ({"STC_TOKEN_PER_FRAME": "0"}, "STC_TOKEN_PER_FRAME='0' is out of range: it must be an integer >= 1, e.g. STC_TOKEN_PER_FRAME=64"),
    ],
)
def test_from_env_errors_name_the_variable_its_value_and_a_valid_example(env, message):
    with pytest.raises(ValueError) as err:
        STCConfig.from_env(env)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "env, message",
    [
        ({"STC_TOKEN_PER_FRAME": 64}, "STC_TOKEN_PER_FRAME=64 is not a string: environment values are strings, e.g. STC_TOKEN_PER_FRAME='64'"),
        ({"STC_PATCH_VISION": True}, "STC_PATCH_VISION=True is not a string: environment values are strings, e.g. STC_PATCH_VISION='1'"),
        ([("STC_PATCH_VISION", "1")], "env must be a mapping of variable names to strings, such as os.environ; got list"),
    ],
)
def test_from_env_of_the_wrong_type_says_what_to_pass(env, message):
    with pytest.raises(TypeError) as err:
        STCConfig.from_env(env)
    assert str(err.value) == message
