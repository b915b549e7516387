"""Wall time of one SigLIP-so400m-sized tower with and without STC-Cacher, next to the FLOP ratio.

    python speed_benchmark/cacher_walltime.py --layers 4 --frames 16 --ratio 0.25 --interval 2

Builds a random-weight SigLIP with so400m's width (1152), MLP (4304), heads (16) and 729
tokens per frame, but only ``--layers`` layers so it runs on a CPU; streams the synthetic clip
one frame per call (as STC streams ReKV), alternating baseline and +STC repeats, and prints
the median wall-time ratio STC / full beside the analytic multiply-add ratio.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import stc
from stc.flops import ViTShape, vit_tower_macs
from stc_bench.device import resolve_device
from stc_bench.frameworks.weights import build_random
from stc_bench.timing import time_call
from stc_bench.video import load_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (so400m has 27; LLaVA-OV runs 26)")
    parser.add_argument("--frames", type=int, default=16, help="frames per stream")
    parser.add_argument("--ratio", type=float, default=0.25, help="STC-Cacher update ratio")
    parser.add_argument("--interval", type=int, default=2, help="STC-Cacher cache interval")
    parser.add_argument("--repeats", type=int, default=10, help="timed streams per arm")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()

    from transformers import SiglipVisionConfig, SiglipVisionModel

    device = resolve_device(args.device)
    dtype = device.default_dtype()
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=args.layers,
                                num_attention_heads=16, image_size=384, patch_size=14)
    tower = build_random(lambda: SiglipVisionModel(vision), device.torch_device, dtype, seed=0)
    clip = load_clip(args.frames, 384, None, 0.5, seed=0).to(device.torch_device, dtype)
    config = stc.CacherConfig(update_ratio=args.ratio, cache_interval=args.interval)

    def stream() -> None:
        for i in range(args.frames):
            tower(pixel_values=clip[i : i + 1])

    def stream_stc() -> None:
        with stc.cacher_attached(tower, config):
            stream()

    full, cached = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):  # alternate arms so drift hits both alike
            full += time_call(device, stream, repeats=1, warmup=1 if not full else 0)
            cached += time_call(device, stream_stc, repeats=1, warmup=1 if not cached else 0)
    shape = ViTShape(tokens=729, width=1152, mlp_width=4304, layers=args.layers)
    flop_ratio = vit_tower_macs(shape, args.frames, config) / vit_tower_macs(shape, args.frames)
    wall_ratio = statistics.median(cached) / statistics.median(full)
    print(f"SigLIP-so400m width, {args.layers} layers, {args.frames} frames one per call, ratio {args.ratio}, "
          f"interval {args.interval}, {device.label} ({device.name}), {str(dtype).removeprefix('torch.')}")
    print(f"full  ms per stream: median {statistics.median(full):.1f}  min {min(full):.1f}  (n={len(full)})")
    print(f"+STC  ms per stream: median {statistics.median(cached):.1f}  min {min(cached):.1f}  (n={len(cached)})")
    print(f"wall-time ratio STC/full (median): {wall_ratio:.3f}   (min/min: {min(cached) / min(full):.3f})")
    print(f"FLOP ratio STC/full:               {flop_ratio:.3f}")


if __name__ == "__main__":
    main()
