"""Integrations: the only code that knows third-party (transformers) attribute names."""

from stc.integrations.handle import CacherHandle
from stc.integrations.hf_vit import attach_cacher, cacher_attached, detach_cacher, find_vision_layers

__all__ = ["CacherHandle", "attach_cacher", "cacher_attached", "detach_cacher", "find_vision_layers"]
