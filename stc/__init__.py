"""STC: Streaming Token Compression for streaming video LLMs.

STC-Cacher reuses each ViT layer's outputs for the tokens of a frame that barely changed;
STC-Pruner keeps the most salient visual tokens per frame before LLM pre-fill::

    import stc
    with stc.cacher_attached(vision_tower, stc.CacherConfig(update_ratio=0.25)) as handle:
        features = vision_tower(frames)                       # one call per chunk of a video
    kept = stc.STCPruner(stc.PrunerConfig(tokens_per_frame=64)).compress(visual_tokens)
"""

from stc.config import CacherConfig, PrunerConfig, STCConfig
from stc.errors import STCError, StreamStateError, UnsupportedModelError
from stc.integrations import CacherHandle, attach_cacher, cacher_attached, detach_cacher
from stc.pruner import PrunedTokens, STCPruner

__version__ = "0.1.0"

__all__ = [
    "CacherConfig",
    "CacherHandle",
    "PrunedTokens",
    "PrunerConfig",
    "STCConfig",
    "STCError",
    "STCPruner",
    "StreamStateError",
    "UnsupportedModelError",
    "__version__",
    "attach_cacher",
    "cacher_attached",
    "detach_cacher",
]
