"""Where serving S streams turns a GPU from launch-bound to compute-bound, from a run's own counts.

    python speed_benchmark/serving_projection.py reports/<run>/results.json --peak-tflops P --launch-us L

Reads a ``stc-bench ... --streams`` run (any device: the counts are exact, not timed) and, per
arm, stage and number of streams S, prints one streaming step's multiply-adds (the FLOP model,
``macs``) and operators dispatched (``operators_per_frame`` times the frames of a step), then
the two floors of that step on a device that does ``P`` dense TFLOP/s and spends ``L`` us of
host time per operator launch: math ``2 * MACs / P`` and launches ``operators * L``. The step is
launch-bound while the launch floor is the larger; batching streams multiplies the math by S
and leaves the launches of a step almost unchanged, so the last column gives the S from which
the math dominates (the crossover), extrapolated from the largest S measured.

P and L are the device's, not this script's: P from its datasheet (dense, the dtype you run),
L measured on it (``stc-bench doctor --gpu 0`` reports timer spans against wall clock). Nothing
here is a measurement of latency: check the projection with ``stc-bench <framework> --streams
... --gpu 0``, whose report judges each stage launch-bound or not from its own timings.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from stc_bench.results import arm_name, is_missing, load_results


def step_counts(result) -> list[dict]:
    """Per arm, stage and S: frames, steps, MACs and operators of one streaming step."""
    table = result.table()
    rows = []
    for r in table.itertuples():
        shard = None if is_missing(r.shard) else int(r.shard)  # a merged run: each row's own shard
        arm = next(a.arm for a in result.arms if a.arm.label == r.arm)
        m = result.measurement(r.frames, arm, r.stage, shard, r.streams)
        steps = len(m.chunk_ms[0]) if m is not None and m.chunk_ms else None
        if not steps or is_missing(r.macs) or is_missing(r.operators_per_frame):
            continue
        rows.append({"arm": arm_name(r.arm, shard), "stage": r.stage, "streams": int(r.streams), "frames": int(r.frames),
                     "macs_per_step": r.macs / steps,
                     "operators_per_step": r.operators_per_frame * r.streams * r.frames / steps})
    return rows


def main() -> None:
    """Print the projection table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="results.json of a stc-bench run (or its folder)")
    parser.add_argument("--peak-tflops", type=float, required=True, help="the device's dense TFLOP/s in the run's dtype")
    parser.add_argument("--launch-us", type=float, required=True, help="host time per operator launch on the device, us")
    args = parser.parse_args()
    result = load_results(args.results)
    peak, launch = args.peak_tflops * 1e12, args.launch_us * 1e-6
    print(f"{'arm':<32} {'stage':<9} {'S':>3} {'GMAC/step':>10} {'ops/step':>9} {'math us':>9} {'launch us':>10}  bound    "
          "compute-bound from S")
    for row in step_counts(result):
        math_s = 2 * row["macs_per_step"] / peak
        launch_s = row["operators_per_step"] * launch
        per_stream = math_s / row["streams"]
        crossover = math.ceil(launch_s / per_stream) if per_stream > 0 else None
        bound = "launch" if launch_s > math_s else "compute"
        print(f"{row['arm']:<32} {row['stage']:<9} {row['streams']:>3} {row['macs_per_step'] / 1e9:>10.2f} "
              f"{row['operators_per_step']:>9.0f} {1e6 * math_s:>9.1f} {1e6 * launch_s:>10.1f}  {bound:<8} {crossover}")


if __name__ == "__main__":
    main()
