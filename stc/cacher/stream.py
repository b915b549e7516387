"""One patched layer's forward over a call of several frames, batched.

Refresh frames of the call run together through the full forward; selective frames run
together through the selective forward, each reading the reference of the latest refresh frame
of its own stream at or before it (a call may carry frames of several streams). Layer by layer this is exactly what feeding the frames one at a time computes,
so a call with T frames gives the output of T one-frame calls.
"""

from __future__ import annotations

import torch

from stc.cacher.block import LayerOps, LayerReference, full_forward, plain_forward, selective_forward
from stc.cacher.compiled import compiled_selective_forward
from stc.cacher.graph import SelectiveGraphs
from stc.cacher.state import CacherState
from stc.core import dynamic_token_count
from stc.errors import StreamStateError


def cached_layer_forward(
    ops: LayerOps,
    x: torch.Tensor,
    layer_index: int,
    state: CacherState,
    graphs: SelectiveGraphs | None = None,
    graph_key: tuple = (),
) -> torch.Tensor:
    """Forward of layer ``layer_index`` on the frames x (B, n, d) of the current call.

    The first layer plans the call (and advances each stream it carries); the last one records
    its statistics. References are replaced only by refresh frames, and only when some frame of
    a stream can read them. ``graph_key`` tells ``graphs`` which weights this layer has.
    """
    frames, tokens, _ = x.shape
    if layer_index == 0:
        state.begin_call(frames, tokens, x.device, ops.prefix_tokens)
    plan = state.plan
    if plan is None:
        raise StreamStateError(
            f"layer {layer_index} of a patched tower ran outside a call that started at layer 0: "
            "call the tower, or its layers in order from layer 0"
        )
    config = state.config
    patch_tokens = tokens - ops.prefix_tokens
    count = dynamic_token_count(patch_tokens, config.update_ratio)
    refreshed = plan.refresh.shape[0]
    selected = plan.selective.shape[0]

    layer_key = (layer_index, *graph_key)
    graphed = graphs is not None and graphs.active_for(x)
    streams = state.streams
    # Every refresh frame of the batch is kept (each is its stream's last): stored references may
    # be views of the batch. Otherwise each kept frame is copied out, so it does not pin the batch.
    views = len(plan.kept) == refreshed

    def keep(reference: LayerReference) -> None:
        """Each stream's new reference: its last refresh frame of the call, in the stream's graph
        reference slot when graphs replay."""
        if graphed and layer_index == 0:
            state.slot_writes += 1
        for stream_id, frame in plan.kept:
            stream = streams[stream_id]
            if graphed:
                kept = graphs.keep_reference((*layer_key, stream_id), reference, frame, stream.references[layer_index])
            else:
                kept = reference.frame(frame, view=views)
            stream.references[layer_index] = kept

    if selected == 0 and plan.keeps_references:  # only refresh frames: keep each stream's last as reference
        y, reference = full_forward(ops, x)
        keep(reference)
    elif selected == 0 or count >= patch_tokens:  # nothing to keep: the unpatched layer's work, exactly
        y = plain_forward(ops, x)
    else:
        # With no refresh frame in the call (the common step), every frame is selective and in
        # order: work on x and return the result without scatter copies.
        y = torch.empty_like(x) if refreshed else None
        sources = [streams[stream_id].references[layer_index] for stream_id in plan.stored]     # (1, n, d) each
        assert all(ref is not None for ref in sources)
        if refreshed:
            y_refresh, reference = full_forward(ops, x.index_select(0, plan.refresh))    # (R, n, d)
            y.index_copy_(0, plan.refresh, y_refresh)
            sources.append(reference)
            keep(reference)
        if len(sources) == 1 and sources[0].keys.shape[0] == 1:  # one reference for all frames
            frame_refs = sources[0].expand(selected)
        elif plan.source_is_pool:  # one stored reference per frame, in order: the pool is the batch
            frame_refs = LayerReference.concat(sources)
        else:  # pool [stored..., refresh frames of the call] and pick each frame's own
            frame_refs = LayerReference.concat(sources).gather(plan.source)
        shared = config.selection == "shared" and layer_index > 0
        x_sel = x.index_select(0, plan.selective) if refreshed else x                    # (S, n, d)
        index = plan.index if shared else None
        if graphs is not None:
            y_sel, index = graphs.run(layer_key, ops, x_sel, frame_refs, count, config.metric, index)
        elif config.compile:
            y_sel, index = compiled_selective_forward(ops, x_sel, frame_refs, count, config.metric, index)
        else:
            y_sel, index = selective_forward(ops, x_sel, frame_refs, count, config.metric, index)
        if layer_index == 0:
            plan.index = index
        if y is None:
            # A replayed graph's output is its own buffer, overwritten by the next frame: fine for
            # the next layer, which reads it now, but the tower's output must outlive the call.
            last = layer_index == state.num_layers - 1
            y = y_sel.clone() if graphed and last else y_sel
        else:
            y.index_copy_(0, plan.selective, y_sel)

    plan.recomputed.append(tokens if count >= patch_tokens else count + ops.prefix_tokens)  # per selective frame
    if layer_index == state.num_layers - 1:
        state.end_call()
    return y

