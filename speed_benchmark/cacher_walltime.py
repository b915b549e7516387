"""Wall time of one SigLIP-so400m-sized tower with and without STC-Cacher, next to the FLOP ratio.

    python speed_benchmark/cacher_walltime.py --layers 4 --frames 16 --ratio 0.25 --interval 2
    python speed_benchmark/cacher_walltime.py --layer --scale small --threads 1

Builds a random-weight SigLIP with so400m's width (1152), MLP (4304), heads (16) and 729
tokens per frame (``--scale small``: stc-bench's small preset, width 256), but only
``--layers`` layers so it runs on a CPU; streams the synthetic clip one frame per call (as STC
streams ReKV), alternating baseline and +STC repeats, and prints the median wall-time ratio
STC / full beside the analytic multiply-add ratio. ``--layer`` times one encoder layer alone
instead: its full forward, and its selective forward when it selects the tokens (layer 0) and
when it reuses a selection (later layers), each beside its multiply-add ratio: the efficiency
of the cacher's own arithmetic, without the rest of the tower around it.
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
    parser.add_argument("--scale", choices=("full", "small"), default="full",
                        help="full: so400m's width; small: stc-bench's small preset (width 256, MLP 1024, 4 heads)")
    parser.add_argument("--layer", action="store_true", help="time one layer's full and selective forwards alone")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from transformers import SiglipVisionConfig, SiglipVisionModel

    device = resolve_device(args.device)
    dtype = device.default_dtype()
    width, mlp, heads = (1152, 4304, 16) if args.scale == "full" else (256, 1024, 4)
    vision = SiglipVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=args.layers,
                                num_attention_heads=heads, image_size=384, patch_size=14)
    tower = build_random(lambda: SiglipVisionModel(vision), device.torch_device, dtype, seed=0)
    clip = load_clip(args.frames, 384, None, 0.5, seed=0).to(device.torch_device, dtype)
    config = stc.CacherConfig(update_ratio=args.ratio, cache_interval=args.interval)
    if args.layer:
        time_one_layer(tower, clip, config, device, args.repeats * 10, width, mlp)
        return

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
    shape = ViTShape(tokens=729, width=width, mlp_width=mlp, layers=args.layers)
    flop_ratio = vit_tower_macs(shape, args.frames, config) / vit_tower_macs(shape, args.frames)
    wall_ratio = statistics.median(cached) / statistics.median(full)
    print(f"SigLIP-so400m width, {args.layers} layers, {args.frames} frames one per call, ratio {args.ratio}, "
          f"interval {args.interval}, {device.label} ({device.name}), {str(dtype).removeprefix('torch.')}")
    print(f"full  ms per stream: median {statistics.median(full):.1f}  min {min(full):.1f}  (n={len(full)})")
    print(f"+STC  ms per stream: median {statistics.median(cached):.1f}  min {min(cached):.1f}  (n={len(cached)})")
    print(f"wall-time ratio STC/full (median): {wall_ratio:.3f}   (min/min: {min(cached) / min(full):.3f})")
    print(f"FLOP ratio STC/full:               {flop_ratio:.3f}")


def time_one_layer(tower, clip: torch.Tensor, config: stc.CacherConfig, device, repeats: int, width: int, mlp: int) -> None:
    """Full and selective forwards of the tower's first layer on two consecutive frames' hidden
    states, alternated so drift hits each alike; medians and their ratios to the full forward."""
    from stc.cacher.block import full_forward, selective_forward
    from stc.core import dynamic_token_count
    from stc.flops import vit_layer_macs
    from stc.integrations.hf_vit import HFViTLayerOps, find_vision_layers

    _, layers, _ = find_vision_layers(tower)
    ops = HFViTLayerOps(layers[0], prefix_tokens=0)
    count = dynamic_token_count(729, config.update_ratio)
    with torch.inference_mode():
        reference_frame, frame = (tower.vision_model if hasattr(tower, "vision_model") else tower).embeddings(clip[:2])
        reference_frame, frame = reference_frame[None], frame[None]                         # (1, 729, d) each
        _, reference = full_forward(ops, reference_frame)
        _, chosen = selective_forward(ops, frame, reference, count, config.metric)
        forwards = {
            "full": lambda: full_forward(ops, frame),
            "selective, selecting": lambda: selective_forward(ops, frame, reference, count, config.metric),
            "selective, reusing": lambda: selective_forward(ops, frame, reference, count, config.metric, chosen),
        }
        times: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(repeats):
            for name, forward in forwards.items():
                times[name] += time_call(device, forward, repeats=1, warmup=1 if not times[name] else 0)
    full = statistics.median(times["full"])
    mac_ratio = vit_layer_macs(729, width, mlp, count) / vit_layer_macs(729, width, mlp)
    print(f"one SigLIP layer, width {width}, MLP {mlp}, 729 tokens, {count} recomputed, {torch.get_num_threads()} threads, "
          f"{device.label}; MAC ratio selective/full {mac_ratio:.3f}")
    for name, samples in times.items():
        ratio = statistics.median(samples) / full
        efficiency = "" if name == "full" else f"  efficiency {(1 - ratio) / (1 - mac_ratio):.3f}"
        print(f"{name:22s} median {statistics.median(samples):8.3f} ms  ratio {ratio:.3f}{efficiency}  (n={len(samples)})")


if __name__ == "__main__":
    main()
