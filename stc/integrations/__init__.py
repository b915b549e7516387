"""Integrations: the only code that knows third-party (transformers) attribute names."""

from stc.integrations.handle import CacherHandle, PatchHandle
from stc.integrations.hf_vit import (
    attach_batched_attention,
    attach_cacher,
    batched_attention,
    cacher_attached,
    detach_cacher,
    find_vision_layers,
)

__all__ = [
    "CacherHandle", "PatchHandle", "attach_batched_attention", "attach_cacher", "batched_attention", "cacher_attached",
    "detach_cacher", "find_vision_layers",
]
