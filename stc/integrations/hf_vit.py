"""STC-Cacher for HuggingFace vision towers: CLIP, SigLIP and Qwen2-VL (transformers 4.46 to 5.24).

Together with ``qwen2_vl`` this is the only code that knows transformers' attribute names. It
finds the encoder layers of a vision tower (``CLIPVisionModel``, ``SiglipVisionModel``,
Qwen2-VL's vision transformer, or a larger model holding one, such as
``LlavaOnevisionForConditionalGeneration``), and replaces each layer *instance's* forward with
the batched streaming forward of ``stc.cacher.stream`` (and, in a whole model, its image and
video entry methods: ``vlm``). The classes are never touched, so ``type(layer)``,
``isinstance`` checks and hooks keep working.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from stc.cacher.graph import SelectiveGraphs
from stc.cacher.state import CacherState
from stc.cacher.stream import cached_layer_forward
from stc.config import CacherConfig
from stc.errors import STCError, UnsupportedModelError
from stc.integrations import qwen2_vl, vlm
from stc.integrations.handle import HANDLE_ATTRIBUTE, CacherHandle, PatchHandle, forward_attribute

logger = logging.getLogger(__name__)

PREFIX_TOKENS: dict[str, int] = {"CLIPEncoderLayer": 1, "SiglipEncoderLayer": 0, qwen2_vl.BLOCK_CLASS: 0}
"""Supported encoder-layer classes, by name, and how many leading tokens (CLS) each frame has."""

_TOWER_GRAPHS: weakref.WeakKeyDictionary[nn.Module, SelectiveGraphs] = weakref.WeakKeyDictionary()
"""Each tower's CUDA graphs, kept across attaches (a stream re-attaches; capture happens once)
and freed with the tower."""


def _weights_key(layer: nn.Module) -> tuple:
    """The device addresses of a layer's parameters: a captured graph reads weights by address,
    so a layer whose parameters were replaced or moved gets new graphs."""
    return tuple((p.device, p.data_ptr()) for p in layer.parameters())


def cuda_graphs_refused(layer_kind: str) -> str | None:
    """Why ``cuda_graph=True`` runs eager on a tower whose encoder layers are of class
    ``layer_kind`` (as ``find_vision_layers`` names it), as a phrase ("not available for ...");
    None where graphs are replayed."""
    if layer_kind == qwen2_vl.BLOCK_CLASS:
        # The block's rotary tables are new tensors on every call; a captured graph would read
        # freed memory. Until they become graph inputs, Qwen2-VL runs eager.
        return ("not available for Qwen2-VL towers yet: their rotary tables are new tensors on every call, "
                "which a captured graph cannot read")
    return None


def _class_names(module: nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(module).__mro__]


def _layer_kind(module: nn.Module) -> str | None:
    return next((name for name in _class_names(module) if name in PREFIX_TOKENS), None)


def _require_module(model: object, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{caller} needs the torch.nn.Module that holds the vision tower (a CLIPVisionModel, a SiglipVisionModel, "
            f"a Qwen2-VL vision tower, or a model holding one, such as LlavaOnevisionForConditionalGeneration); "
            f"got {'None' if model is None else type(model).__name__}"
        )


def find_vision_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module], str]:
    """The vision tower inside ``model``, its encoder layers in order, and their class name.

    The tower is the innermost module with "Vision" in its class name that holds a
    ``ModuleList`` of supported encoder layers (text encoders of CLIP/SigLIP are skipped), or the
    ``XVisionModel`` that wraps it when it is an ``XVisionTransformer`` (transformers 4.x nests
    ``CLIPVisionModel.vision_model``; 5.x merged the two): the same tower on every version.
    Raises ``UnsupportedModelError`` (a ``TypeError``) naming what was found when there is not
    exactly one, or when ``model`` is not a module.
    """
    _require_module(model, "find_vision_layers")
    modules = dict(model.named_modules())
    stacks = []
    for path, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {_layer_kind(layer) for layer in module}
            if len(kinds) == 1 and None not in kinds:
                stacks.append((path, module, kinds.pop()))
    towers = []
    for path, stack, kind in stacks:
        parts = path.split(".") if path else []
        ancestors = [modules[".".join(parts[:i])] for i in range(len(parts))]  # root first
        vision = [i for i, m in enumerate(ancestors) if "Vision" in type(m).__name__]
        if vision:
            inner = vision[-1]
            wrapper = type(ancestors[inner]).__name__.replace("VisionTransformer", "VisionModel")
            if inner > 0 and wrapper != type(ancestors[inner]).__name__ and type(ancestors[inner - 1]).__name__ == wrapper:
                inner -= 1
            towers.append((ancestors[inner], list(stack), kind, path))
    if len(towers) == 1:
        tower, layers, kind, _ = towers[0]
        return tower, layers, kind
    if len(towers) > 1:
        paths = ", ".join(repr(t[3]) for t in towers)
        raise UnsupportedModelError(
            f"{type(model).__name__} holds {len(towers)} vision encoders (layer stacks at {paths}): "
            "pass the one vision tower to patch"
        )
    found = sorted({type(m).__name__ for m in modules.values() if "Layer" in type(m).__name__})
    raise UnsupportedModelError(
        f"{type(model).__name__} has no vision encoder layers STC-Cacher can patch: expected a vision "
        f"tower with layers of class {', '.join(sorted(PREFIX_TOKENS))}; found layer classes "
        f"{found or 'none'}. Pass a CLIPVisionModel, a SiglipVisionModel, a Qwen2-VL vision tower, "
        "or a model that holds one."
    )


class HFViTLayerOps:
    """``LayerOps`` of a CLIP/SigLIP encoder layer: calls its own norms, projections and MLP."""

    def __init__(self, layer: nn.Module, prefix_tokens: int):
        attn = layer.self_attn
        self.prefix_tokens = prefix_tokens
        self.norm1 = layer.layer_norm1
        self.norm2 = layer.layer_norm2
        self.mlp = layer.mlp
        self._q, self._k, self._v, self._out = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        self._heads = attn.num_heads
        self._scale = attn.scale

    def query(self, h: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Queries of the given tokens (no position-dependent transform in CLIP/SigLIP)."""
        return self._q(h)

    def key(self, h: torch.Tensor) -> torch.Tensor:
        """Keys of the given tokens."""
        return self._k(h)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """Values of the given tokens."""
        return self._v(h)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Non-causal multi-head SDPA of q (B, m, d) over k, v (B, n, d), then the output projection."""
        batch, m, width = q.shape
        head_dim = width // self._heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self._heads, head_dim).transpose(1, 2)  # (B, H, len, hd)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=self._scale)  # (B, H, m, hd)
        return self._out(out.transpose(1, 2).reshape(batch, m, width))


def _check_call(args: tuple, kwargs: dict) -> None:
    masks = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if masks:
        raise STCError(
            "STC-Cacher got an attention mask; vision towers run unmasked. Detach the cacher "
            "(handle.detach()) to run this call with a mask."
        )
    if kwargs.get("output_attentions"):
        raise STCError("STC-Cacher does not return attention weights: call without output_attentions=True")


def _make_forward(ops: HFViTLayerOps, layer_index: int, state: CacherState, graphs, graph_key: tuple,
                  returns_tuple: bool):
    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        _check_call(args, kwargs)
        y = cached_layer_forward(ops, hidden_states, layer_index, state, graphs, graph_key)
        return (y,) if returns_tuple else y

    forward.__doc__ = f"""STC-Cacher forward of encoder layer {layer_index}, mirroring
    ``CLIPEncoderLayer.forward`` / ``SiglipEncoderLayer.forward`` (transformers 4.46 to 5.24).

    Modifications:
    - frames are streamed: refresh frames run the full forward and store keys, values and both
      branch outputs; selective frames recompute queries, values, attention and MLP only for
      their most-changed tokens and take the rest from the reference;
    - attention runs through ``F.scaled_dot_product_attention`` on the layer's own projections;
    - attention masks and ``output_attentions`` are rejected; dropout is not applied.
    """
    forward._stc_layer_index = layer_index
    return forward


def _unless_passthrough(state: CacherState, streamed, original):
    """``streamed``, or ``original`` during a call outside the stream (an image through a whole model)."""

    @functools.wraps(streamed)
    def forward(*args, **kwargs):
        if state.passthrough:
            return original(*args, **kwargs)
        return streamed(*args, **kwargs)

    return forward


def _guard_tower(state: CacherState, streamed, original):
    """The tower's forward under STC-Cacher: ``streamed`` (the original forward, or an
    integration's wrapper of it), its frames undone in the stream when it raises; the original
    itself during a call outside the stream."""

    def forward(*args, **kwargs):
        if state.passthrough:
            return original(*args, **kwargs)
        checkpoint = state.checkpoint()
        try:
            return streamed(*args, **kwargs)
        except BaseException:  # a failed call leaves the stream as it was: a retry continues it exactly
            state.restore(checkpoint)
            raise

    forward.__doc__ = ("STC-Cacher guard of the vision tower's forward: runs it, and rolls the stream back "
                       "(frame counter, references, statistics) when it raises.")
    return forward


def attach_cacher(model: nn.Module, config: CacherConfig | None = None) -> CacherHandle:
    """Patch the vision tower in ``model`` with STC-Cacher and return the handle that undoes it.

    ``model`` is a vision tower (CLIP, SigLIP, Qwen2-VL) or a module holding one. Each encoder
    layer gets an instance-level forward (``_old_forward`` when accelerate hooked the layer), and
    the tower's forward a guard that rolls the stream back when a call raises part-way, so a
    failed call can simply be retried. Attaching to an already patched tower detaches the old
    patch first.

    Every call to the tower continues one stream, whatever its batch of frames; ``handle.reset()``
    starts the next video. To serve several streams through the tower, name each frame's stream
    (``with handle.streams(ids):``): each stream keeps its own references and schedule, and all
    streams' frames of a call still run batched. When ``model`` is a whole model (it has
    parameters outside the tower, such as ``LlavaOnevisionForConditionalGeneration``), its
    ``get_image_features`` and ``get_video_features`` are patched on the instance as well
    (``stc.integrations.vlm``):

    - images pass through: tower calls made inside ``get_image_features`` run the unpatched
      forwards, bit for bit, and leave the streams untouched;
    - a ``get_video_features`` call is streamed with each of its B videos as a stream of its own
      (video b is stream b, or ``ids[b]`` inside ``handle.streams(ids)``), so calls that carry the
      next frames of the same B videos serve B concurrent streams;
    - a whole model without ``get_video_features`` raises ``UnsupportedModelError``: attach to
      its tower instead.

    Raises ``UnsupportedModelError`` (a ``TypeError``) when ``model`` is not a module holding
    one supported tower, and ``TypeError`` when ``config`` is not a ``CacherConfig``.
    """
    _require_module(model, "attach_cacher")
    config = CacherConfig() if config is None else config
    if not isinstance(config, CacherConfig):
        raise TypeError(f"config must be a stc.CacherConfig (or None for the defaults), got {type(config).__name__}")
    tower, layers, kind = find_vision_layers(model)
    whole_model = vlm.entry_owners(model, tower)  # refuses a whole model before anything is touched
    existing = tower.__dict__.get(HANDLE_ATTRIBUTE)
    if existing is not None:
        existing.detach()
    qwen = kind == qwen2_vl.BLOCK_CLASS
    # A Qwen2-VL stream follows the video's resolution: a new (h, w) grid starts a new stream.
    state = CacherState(config, num_layers=len(layers), reset_on_resize=qwen)
    graphs = None
    refusal = cuda_graphs_refused(kind) if config.cuda_graph else None
    if refusal is not None:
        logger.warning("STC-Cacher: CUDA-graph replay is %s; running eager", refusal)
    elif config.cuda_graph:
        graphs = _TOWER_GRAPHS.setdefault(tower, SelectiveGraphs())
    handle = CacherHandle(tower, config, state, graphs)
    try:
        if whole_model is not None:
            vlm.patch_entries(handle, *whole_model, state)
        name = forward_attribute(tower)
        original = getattr(tower, name)
        streamed = qwen2_vl.make_tower_forward(original, state) if qwen else original
        handle._replace(tower, name, _guard_tower(state, streamed, original))
        for i, layer in enumerate(layers):
            name = forward_attribute(layer)
            original = getattr(layer, name)
            if qwen:
                streamed = qwen2_vl.make_block_forward(layer, i, state, graphs)
            else:
                returns_tuple = "output_attentions" in inspect.signature(original).parameters  # 4.x layers
                ops = HFViTLayerOps(layer, PREFIX_TOKENS[kind])
                graph_key = _weights_key(layer) if graphs is not None else ()
                streamed = _make_forward(ops, i, state, graphs, graph_key, returns_tuple)
            handle._replace(layer, name, _unless_passthrough(state, streamed, original))
    except BaseException:  # never leave a half-patched model behind
        handle.detach()
        raise
    handle._install()
    return handle


def attach_batched_attention(model: nn.Module) -> PatchHandle:
    """Run a Qwen2-VL vision tower's attention as one batched SDPA over its temporal groups.

    transformers' non-flash Qwen2-VL vision attention runs one SDPA per temporal group after a
    host sync on the group lengths; STC-Cacher's forwards run all groups of a call as one batch.
    The math is the same (attention never crosses a group); the kernels differ. A benchmark that
    compares the cacher with an unpatched tower would count that kernel change as STC's saving,
    so its baseline attaches this: the layer forward STC-Cacher runs on refresh frames, with no
    streaming state. Returns a handle whose ``detach()`` restores the tower exactly; attaching
    the cacher afterwards replaces it (one patch per tower at a time). CLIP and SigLIP towers
    already batch their attention and are refused.
    """
    _require_module(model, "attach_batched_attention")
    tower, layers, kind = find_vision_layers(model)
    if kind != qwen2_vl.BLOCK_CLASS:
        raise UnsupportedModelError(
            f"{type(tower).__name__}: batched attention is for Qwen2-VL vision towers; {kind} layers already "
            "run one attention call per batch"
        )
    existing = tower.__dict__.get(HANDLE_ATTRIBUTE)
    if existing is not None:
        existing.detach()
    handle = PatchHandle(tower)
    shape = qwen2_vl.CallShape()
    name = forward_attribute(tower)
    handle._replace(tower, name, qwen2_vl.make_tower_forward(getattr(tower, name), shape))
    for layer in layers:
        handle._replace(layer, forward_attribute(layer), qwen2_vl.make_batched_block_forward(layer, shape))
    handle._install()
    return handle


def detach_cacher(model: nn.Module) -> nn.Module:
    """Undo ``attach_cacher`` on the tower in ``model``; a no-op when it is not patched."""
    _require_module(model, "detach_cacher")
    tower, _, _ = find_vision_layers(model)
    handle = tower.__dict__.get(HANDLE_ATTRIBUTE)
    if handle is not None:
        handle.detach()
    return model


@contextlib.contextmanager
def batched_attention(model: nn.Module) -> Iterator[PatchHandle]:
    """``with batched_attention(qwen2_vl_tower):`` ``attach_batched_attention`` for the block."""
    handle = attach_batched_attention(model)
    try:
        yield handle
    finally:
        handle.detach()


@contextlib.contextmanager
def cacher_attached(model: nn.Module, config: CacherConfig | None = None) -> Iterator[CacherHandle]:
    """``with cacher_attached(tower, config) as handle:`` patch for the block, then restore."""
    handle = attach_cacher(model, config)
    try:
        yield handle
    finally:
        handle.detach()
