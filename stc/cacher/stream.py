"""One patched layer's forward over a call of several frames, batched.

Refresh frames of the call run together through the full forward; selective frames run
together through the selective forward, each reading the reference of the latest refresh frame
at or before it. Layer by layer this is exactly what feeding the frames one at a time computes,
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

    The first layer plans the call (and advances the stream); the last one records its
    statistics. References are replaced only by refresh frames, and only when some frame of
    the stream can read them. ``graph_key`` tells ``graphs`` which weights this layer has.
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
    refreshed = len(plan.refresh_frames)
    selected = len(plan.selective_frames)

    layer_key = (layer_index, *graph_key)
    graphed = graphs is not None and graphs.active_for(x)

    def keep(reference: LayerReference, frame: int) -> LayerReference:
        """The reference later frames read: in a graph's reference slot when graphs replay."""
        if graphed:
            if layer_index == 0:
                state.slot_writes += 1
            return graphs.keep_reference(layer_key, reference, frame, state.references[layer_index])
        return reference.frame(frame)

    if selected == 0 and plan.keeps_references:  # only refresh frames: keep the last as reference
        y, reference = full_forward(ops, x)
        state.references[layer_index] = keep(reference, frames - 1)
    elif selected == 0 or count >= patch_tokens:  # nothing to keep: the unpatched layer's work, exactly
        y = plain_forward(ops, x)
    else:
        # With no refresh frame in the call (the common one-frame step), every frame is
        # selective and in order: work on x and return the result without scatter copies.
        y = torch.empty_like(x) if refreshed else None
        sources: list[LayerReference] = []
        stored = state.references[layer_index]
        if plan.uses_stored:
            assert stored is not None
            sources.append(stored)
        if refreshed:
            y_refresh, reference = full_forward(ops, x.index_select(0, plan.refresh))    # (R, n, d)
            y.index_copy_(0, plan.refresh, y_refresh)
            sources.append(reference)
            state.references[layer_index] = keep(reference, refreshed - 1)
        if len(sources) == 1 and sources[0].keys.shape[0] == 1:  # one reference for all frames
            frame_refs = sources[0].expand(selected)
        else:  # pool [stored?, refresh frames of the call] and pick each frame's own
            offset = 0 if plan.uses_stored else 1
            frame_refs = LayerReference.concat(sources).gather(plan.source - offset)
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

    per_selective = tokens if count >= patch_tokens else count + ops.prefix_tokens
    plan.recomputed.append(refreshed * tokens + selected * per_selective)
    if layer_index == state.num_layers - 1:
        state.end_call()
    return y

