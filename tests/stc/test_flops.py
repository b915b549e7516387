import pytest

from stc import CacherConfig
from stc.flops import LLMShape, ViTShape, prefill_macs, streamed_prefill_macs, vit_layer_macs, vit_tower_macs


def test_vit_layer_against_hand_counts():
    # n=5 tokens, d=4, f=6: q,k,v,o 4*5*16=320; QK^T and AV 2*25*4=200; MLP 2*5*4*6=240.
    assert vit_layer_macs(5, 4, 6) == 320 + 200 + 240
    # r=2: keys 5*16=80; q,v 2*2*16=64; attention 2*2*5*4=80; out 2*16=32; MLP 2*2*4*6=96.
    assert vit_layer_macs(5, 4, 6, recomputed=2) == 80 + 64 + 80 + 32 + 96


def test_tower_counts_refresh_and_selective_frames():
    shape = ViTShape(tokens=5, width=4, mlp_width=6, layers=3, prefix_tokens=1)
    full, sel = vit_layer_macs(5, 4, 6), vit_layer_macs(5, 4, 6, recomputed=1 + 2)  # floor(0.5*4)=2 + CLS
    assert vit_tower_macs(shape, 5) == 15 * full
    assert vit_tower_macs(shape, 5, CacherConfig(update_ratio=0.5, cache_interval=2)) == 3 * (3 * full + 2 * sel)
    assert vit_tower_macs(shape, 5, CacherConfig(update_ratio=1.0)) == 15 * full


def test_siglip_so400m_matches_the_spec_figures():
    shape = ViTShape(tokens=729, width=1152, mlp_width=4304, layers=26)
    base = vit_tower_macs(shape, 16)
    assert vit_tower_macs(shape, 16, CacherConfig(cache_interval=2)) / base == pytest.approx(0.654, abs=1e-3)
    assert vit_tower_macs(shape, 16, CacherConfig(cache_interval=4)) / base == pytest.approx(0.481, abs=1e-3)


def test_prefill_against_hand_counts():
    shape = LLMShape(width=8, mlp_width=10, layers=2, heads=4, kv_heads=2, vocab=7)
    # m=3 new over p=2: q,o 2*3*64=384; k,v 2*3*8*4=192; attention 2*8*(3*2+6)=192; MLP 3*3*8*10=720.
    per_layer = 384 + 192 + 192 + 720
    assert prefill_macs(shape, 3, 2) == 2 * per_layer + 8 * 7
    assert streamed_prefill_macs(shape, [3, 3], past_tokens=2) == prefill_macs(shape, 3, 2) + prefill_macs(shape, 3, 5)
