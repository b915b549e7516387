import pickle

import pytest

from stc import CacherConfig, PrunerConfig, STCConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_ratio=0.0), "update_ratio=0.0 is out of range: update_ratio must be in (0, 1]"),
        (dict(update_ratio=1.5), "update_ratio=1.5 is out of range: update_ratio must be in (0, 1]"),
        (dict(cache_interval=0), "cache_interval=0 is out of range: cache_interval must be an integer >= 1"),
        (dict(cache_interval=2.0), "cache_interval=2.0 is out of range"),
        (dict(metric="dot"), "metric='dot' is out of range: metric must be one of 'cosine', 'l1', 'l2'"),
        (dict(selection="all"), "selection='all' is out of range: selection must be one of 'shared', 'per_layer'"),
        (dict(cuda_graph="yes"), "cuda_graph='yes' is out of range: cuda_graph must be True or False"),
    ],
)
def test_cacher_config_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        CacherConfig(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens_per_frame=0), "tokens_per_frame=0 is out of range: tokens_per_frame must be an integer >= 1"),
        (dict(strategy="random"), "strategy='random' is out of range: strategy must be one of 'gaussian', 'dual_anchor'"),
        (dict(channel_keep_ratio=0.0), "channel_keep_ratio=0.0 is out of range: channel_keep_ratio must be in (0, 1]"),
        (dict(alpha=-0.1), "alpha=-0.1 is out of range: alpha must be in [0, 1]"),
        (dict(gaussian_scales=()), "gaussian_scales=() is out of range"),
        (dict(gaussian_scales=(1.0, -2.0)), "gaussian_scales must be a non-empty tuple of positive widths"),
    ],
)
def test_pruner_config_errors_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        PrunerConfig(**kwargs)
    assert message in str(err.value)


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
        ({"STC_PATCH_VISION": "maybe"}, "STC_PATCH_VISION='maybe' is not a boolean: set it to 1 or 0"),
        ({"STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "a lot"}, "STC_UPDATE_TOKEN_RATIO='a lot' is not a number"),
        ({"STC_PATCH_VISION": "1", "STC_CACHE_INTERVAL": "2.5"}, "STC_CACHE_INTERVAL='2.5' is not an integer"),
        ({"STC_PATCH_VISION": "1", "STC_UPDATE_TOKEN_RATIO": "2"}, "update_ratio=2.0 is out of range: update_ratio must be in (0, 1] (read from STC_* environment variables)"),
        ({"STC_TOKEN_PER_FRAME": "0"}, "tokens_per_frame=0 is out of range: tokens_per_frame must be an integer >= 1 (read from STC_TOKEN_PER_FRAME)"),
    ],
)
def test_from_env_errors_name_the_variable(env, message):
    with pytest.raises(ValueError) as err:
        STCConfig.from_env(env)
    assert message in str(err.value)
