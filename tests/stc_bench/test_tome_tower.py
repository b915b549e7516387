"""ToMe inside a HuggingFace CLIP/SigLIP tower: exactness, token counts, attach/detach, refusals, MACs."""

import inspect
import types

import pytest
import torch
from torch import nn

import stc
from stc.flops import vit_layer_macs
from stc.integrations import find_vision_layers
from stc_bench.methods.tome import (
    ToMePatchError,
    attach_tome,
    layer_token_counts,
    schedule_for_budget,
    tome_attached,
    tome_layer_forward,
    tome_tower_macs,
)
from tests.conftest import build_tiny_tower, moving_clip

TOL = 1e-5
CLASS_TOKEN = {"clip": True, "siglip": False}


def snapshot(model):
    """Every module's instance __dict__, shallow-copied (values compared by identity or ==)."""
    return {name: dict(m.__dict__) for name, m in model.named_modules()}


def unpatched(layer, x):
    """The layer's own class forward (transformers' code), whatever is patched on the instance,
    with None for every mask it requires (4.x CLIP layers also take a causal mask)."""
    params = list(inspect.signature(type(layer).forward).parameters.values())[2:]   # after self, hidden_states
    masks = [None for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    out = type(layer).forward(layer, x, *masks)
    return out[0] if isinstance(out, tuple) else out


def layer_names(tower):
    """The module names of the tower's encoder layers, in order."""
    layers = {id(layer) for layer in find_vision_layers(tower)[1]}
    return [name for name, module in tower.named_modules() if id(module) in layers]


def vision_transformer(tower):
    """The module holding the tower's encoder and post-layernorm: the tower itself in transformers
    5.x, its ``vision_model`` in 4.x."""
    return getattr(tower, "vision_model", tower)


@pytest.fixture(params=["clip", "siglip"])
def kind(request):
    return request.param


@torch.inference_mode()
def test_zero_schedule_reproduces_the_tower_and_restores_every_module(kind):
    tower = build_tiny_tower(kind)
    frames = moving_clip(3)
    baseline = tower(frames, output_hidden_states=True)   # installs transformers' capture hooks before the snapshot
    before = snapshot(tower)
    with tome_attached(tower, [0, 0]) as handle:
        assert tower._stc_handle is handle and all("forward" in layer.__dict__ for layer in find_vision_layers(tower)[1])
        out = tower(frames, output_hidden_states=True)
        assert handle.token_counts == (225 + CLASS_TOKEN[kind],) * 3
        assert torch.equal(handle.sizes, torch.ones(3, 225 + CLASS_TOKEN[kind]))
    assert (out.last_hidden_state - baseline.last_hidden_state).abs().max() <= TOL
    assert (out.pooler_output - baseline.pooler_output).abs().max() <= TOL
    for mine, theirs in zip(out.hidden_states, baseline.hidden_states, strict=True):
        assert (mine - theirs).abs().max() <= TOL
    assert snapshot(tower) == before and not handle.attached
    assert torch.equal(tower(frames).last_hidden_state, baseline.last_hidden_state)
    handle.detach()   # detaching twice is harmless


@pytest.mark.parametrize(("kind", "use_head"), [("clip", True), ("siglip", True), ("siglip", False)])
@torch.inference_mode()
def test_token_counts_sizes_and_cls_follow_the_schedule(kind, use_head):
    overrides = {"num_hidden_layers": 3} | ({"vision_use_head": use_head} if kind == "siglip" else {})
    tower = build_tiny_tower(kind, **overrides)
    class_token = CLASS_TOKEN[kind]
    n = 225 + class_token
    schedule = schedule_for_budget(n, 3, 64, class_token)
    counts = layer_token_counts(n, schedule, class_token)
    assert counts[-1] == 64 + class_token
    frames = moving_clip(3)
    baseline = tower(frames, output_hidden_states=True)
    with tome_attached(tower, schedule) as handle:
        out = tower(frames, output_hidden_states=True)
    # transformers records hidden_states from each layer's output: embeddings, then one per layer.
    assert [h.shape[1] for h in out.hidden_states] == counts
    assert out.last_hidden_state.shape == (3, counts[-1], 32) and handle.token_counts == tuple(counts)
    assert handle.sizes.shape == (3, counts[-1])
    assert torch.equal(handle.sizes.sum(dim=-1), torch.full((3,), float(n)))       # sizes conserve the tokens
    assert torch.isfinite(out.last_hidden_state).all()
    if class_token:
        # Layer 0 attends over the unmerged frame, so CLS leaves it exactly as in the plain tower;
        # it is never merged, stays first, and the pooler reads it.
        assert (out.hidden_states[1][:, 0] - baseline.hidden_states[1][:, 0]).abs().max() <= TOL
        assert torch.equal(handle.sizes[:, 0], torch.ones(3))
        assert torch.allclose(out.pooler_output, vision_transformer(tower).post_layernorm(out.last_hidden_state[:, 0]))
    elif use_head:
        assert out.pooler_output.shape == (3, 32) and torch.isfinite(out.pooler_output).all()
    else:
        assert out.pooler_output is None


@torch.inference_mode()
def test_frames_in_a_batch_are_merged_independently(kind):
    tower = build_tiny_tower(kind)
    frames = moving_clip(3)
    with tome_attached(tower, [60, 40]):
        batched = tower(frames).last_hidden_state
        single = torch.cat([tower(frames[i : i + 1]).last_hidden_state for i in range(3)])
    assert (batched - single).abs().max() <= TOL


@torch.inference_mode()
def test_a_duplicated_token_is_merged_and_the_next_layer_sees_it_counted_twice(kind):
    # Tokens 2 (set A) and 3 (set B) are equal, so their keys have cosine 1 and r = 1 merges exactly
    # them; the merged token (size 2) must then act in layer 1 as the pair did (proportional
    # attention), so the encoder output is the plain encoder's with token 2 dropped.
    tower = build_tiny_tower(kind)
    torch.manual_seed(1)
    x = torch.randn(2, 8, 32)
    x[:, 3] = x[:, 2]
    encoder = vision_transformer(tower).encoder
    reference = encoder(inputs_embeds=x).last_hidden_state                          # (2, 8, 32)
    with tome_attached(tower, [1, 0]) as handle:
        merged = encoder(inputs_embeds=x).last_hidden_state                         # (2, 7, 32)
        assert handle.token_counts == (8, 7, 7)
        assert handle.sizes.tolist() == [[1, 1, 1, 1, 2, 1, 1]] * 2
    order = [0, 4, 6, 1, 3, 5, 7]                     # kept A tokens (0, 4, 6), then all B tokens
    assert (merged - reference[:, order]).abs().max() <= TOL


@pytest.mark.parametrize("copies", [2, 3])
@torch.inference_mode()
def test_proportional_attention_equals_attention_over_the_duplicated_tokens(kind, copies):
    # A token of size s attends and is attended to exactly like s copies of itself.
    layer = find_vision_layers(build_tiny_tower(kind))[1][0]
    torch.manual_seed(2)
    x = torch.randn(2, 7, 32)
    size = torch.ones(2, 7)
    size[:, 3] = copies
    expanded = torch.cat([x[:, :3], x[:, 3:4].expand(-1, copies, -1), x[:, 4:]], dim=1)   # (2, 6 + copies, 32)
    reference = unpatched(layer, expanded)
    y, out_size = tome_layer_forward(layer, x, 0, size, CLASS_TOKEN[kind])
    assert out_size is size                           # nothing merged: sizes pass through
    keep = [0, 1, 2, 3, *range(3 + copies, 6 + copies)]
    assert (y - reference[:, keep]).abs().max() <= TOL
    assert (reference[:, 3:3 + copies] - reference[:, 3:4]).abs().max() <= TOL


@torch.inference_mode()
def test_layer_forward_merges_the_identical_pair_by_hand():
    layer = find_vision_layers(build_tiny_tower("siglip"))[1][0]
    torch.manual_seed(3)
    x = torch.randn(1, 6, 32)
    x[:, 5] = x[:, 4]                                 # A token 4 equals B token 5
    reference = unpatched(layer, x)
    y, size = tome_layer_forward(layer, x, 1)
    assert size.tolist() == [[1, 1, 1, 1, 2]]
    assert (y - reference[:, [0, 2, 1, 3, 5]]).abs().max() <= TOL


@torch.inference_mode()
def test_the_merge_follows_the_keys_not_the_tokens():
    # Keys read only channels 0..15 of LN1's output. Tokens 2 and 3 differ only by a permutation of
    # channels 16..31, which keeps LN1's mean and variance: equal keys, different tokens (large
    # channels 16..31 make the tokens themselves far apart). ToMe must merge exactly that pair and
    # leave every other token as the plain layer computes it.
    layer = find_vision_layers(build_tiny_tower("siglip"))[1][0]
    layer.self_attn.k_proj.weight[:, 16:] = 0
    torch.manual_seed(4)
    x = torch.randn(1, 8, 32)
    x[..., 16:] *= 10
    x[:, 3] = x[:, 2]
    x[:, 3, 16:] = x[:, 2, 16:].flip(-1)
    reference = unpatched(layer, x)
    y, size = tome_layer_forward(layer, x, 1)
    assert size.tolist() == [[1, 1, 1, 1, 2, 1, 1]]   # kept A tokens 0, 4, 6; B tokens 1, 3 (merged), 5, 7
    assert (y[:, [0, 1, 2, 3, 5, 6]] - reference[:, [0, 4, 6, 1, 5, 7]]).abs().max() <= TOL
    assert (y[:, 4] - reference[:, 3]).abs().max() > 1e-3


class Qwen2VLVisionBlock(nn.Module):
    """Stands in for transformers' Qwen2-VL vision block (matched by class name)."""


class FakeVisionTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Qwen2VLVisionBlock(), Qwen2VLVisionBlock()])


def test_refusals_leave_the_tower_untouched():
    with pytest.raises(ToMePatchError, match="PatchMerger") as error:
        attach_tome(FakeVisionTower(), [0, 0])
    assert "\n" not in str(error.value)
    tower = build_tiny_tower("clip")
    before = snapshot(tower)
    with pytest.raises(ToMePatchError, match="3 entries but CLIPVisionModel has 2 encoder layers"):
        attach_tome(tower, [1, 1, 1])
    with pytest.raises(ToMePatchError, match=">= 0"):
        attach_tome(tower, [1, -1])
    with pytest.raises(stc.UnsupportedModelError):
        attach_tome(nn.Linear(2, 2), [0])
    with stc.cacher_attached(tower):
        with pytest.raises(ToMePatchError, match="already patched"):
            attach_tome(tower, [1, 1])
    with tome_attached(tower, [1, 1]):
        with pytest.raises(ToMePatchError, match="already patched"):
            attach_tome(tower, [1, 1])
    assert snapshot(tower) == before


@torch.inference_mode()
def test_errors_inside_the_block_restore_the_tower(kind):
    tower = build_tiny_tower(kind)
    frames = moving_clip(2)
    tower(frames, output_attentions=True)   # transformers installs its capture hooks once
    baseline = tower(frames).last_hidden_state   # (4.x computes attention weights with another kernel)
    before = snapshot(tower)
    with pytest.raises(RuntimeError, match="boom"):
        with tome_attached(tower, [10, 10]):
            tower(frames)
            raise RuntimeError("boom")
    assert snapshot(tower) == before
    layers = find_vision_layers(tower)[1]
    with tome_attached(tower, [10, 10]):
        with pytest.raises(ToMePatchError, match="attention mask"):
            layers[0](torch.randn(1, 4, 32), torch.zeros(1, 1, 4, 4))
    assert snapshot(tower) == before
    assert torch.equal(tower(frames).last_hidden_state, baseline)
    with tome_attached(tower, [10, 10]):
        with pytest.raises(ToMePatchError, match="output_attentions"):
            tower(frames, output_attentions=True)
    # Only the layers: transformers 4.57 leaves its own output-capture wrappers on modules when a call raises.
    assert [dict(layer.__dict__) for layer in layers] == [before[name] for name in layer_names(tower)]
    assert torch.equal(tower(frames).last_hidden_state, baseline)


@torch.inference_mode()
def test_accelerate_hooked_layers_get_old_forward_wrapped_and_restored():
    tower = build_tiny_tower("siglip")
    frames = moving_clip(2)
    layers = find_vision_layers(tower)[1]
    for layer in layers:
        layer._hf_hook = object()
        layer._old_forward = layer.forward
        layer.forward = types.MethodType(lambda self, *a, **k: self._old_forward(*a, **k), layer)
    hooked = [layer.forward for layer in layers]
    before = snapshot(tower)
    baseline = tower(frames).last_hidden_state
    with tome_attached(tower, [20, 20]):
        assert all(layer.forward is forward for layer, forward in zip(layers, hooked))
        assert tower(frames).last_hidden_state.shape == (2, 185, 32)
    assert snapshot(tower) == before
    assert torch.equal(tower(frames).last_hidden_state, baseline)


@torch.inference_mode()
def test_layers_with_the_4x_signature_return_a_tuple():
    tower = build_tiny_tower("clip")
    layer = find_vision_layers(tower)[1][0]

    def forward_4x(hidden_states, attention_mask, causal_attention_mask, output_attentions=False):
        return (unpatched(layer, hidden_states),)

    layer.forward = forward_4x
    x = torch.randn(1, 9, 32)
    with tome_attached(tower, [2, 0]):
        out = layer(x, None, None, output_attentions=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 7, 32)
    assert layer.forward is forward_4x


def test_macs_against_a_hand_count():
    # 5 tokens -> 3 -> 2, d = 4, f = 6. Layer 0: 4*5*16 + 2*25*4 + 2*3*4*6 = 664;
    # layer 1: 4*3*16 + 2*9*4 + 2*2*4*6 = 360; three frames: 3 * 1024.
    assert tome_tower_macs(5, 4, 6, [2, 1], 3) == 3072
    assert tome_tower_macs(5, 4, 6, [9, 9], 1) == 1024   # capped at half per layer, as the tower caps it
    assert tome_tower_macs(197, 64, 256, [0] * 4, 2) == 2 * 4 * vit_layer_macs(197, 64, 256)


def test_schedule_for_budget_counts_patch_tokens():
    clip = schedule_for_budget(226, 2, 64, class_token=True)
    assert layer_token_counts(226, clip, class_token=True)[-1] == 65          # 64 patch tokens + CLS
    siglip = schedule_for_budget(225, 3, 64, class_token=False)
    assert len(siglip) == 3 and layer_token_counts(225, siglip)[-1] == 64
    assert schedule_for_budget(226, 2, 225, class_token=True) == [0, 0]
    assert schedule_for_budget(225, 2, 500, class_token=False) == [0, 0]
    with pytest.raises(ValueError, match="must lie in"):
        schedule_for_budget(225, 2, 10, class_token=False)
