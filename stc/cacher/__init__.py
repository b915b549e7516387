"""STC-Cacher: streaming state, the full/selective layer forwards, and their batched dispatch."""

from stc.cacher.block import LayerOps, LayerReference, full_forward, selective_forward
from stc.cacher.graph import GraphStats, SelectiveGraphs
from stc.cacher.state import CacherState, CacherStats, CallRecord
from stc.cacher.stream import cached_layer_forward
from stc.streams import DEFAULT_STREAM, StreamId

__all__ = [
    "DEFAULT_STREAM", "CacherState", "CacherStats", "CallRecord", "StreamId", "GraphStats", "LayerOps", "LayerReference", "SelectiveGraphs",
    "cached_layer_forward", "full_forward", "selective_forward",
]
