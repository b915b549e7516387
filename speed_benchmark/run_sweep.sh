#!/usr/bin/env bash
# Sweep STC's knobs on ReKV against one shared baseline per frame count.
# Usage: GPU=0 bash speed_benchmark/run_sweep.sh [stc-bench sweep options]
#   e.g. --ratio 0.1,0.25,0.5 --interval 2,4 --tokens-per-frame 32,64 --frames 16,32
# An interrupted sweep continues with: stc-bench sweep --resume reports/<run folder>
source "$(dirname "$0")/lib.sh"
run_stc_bench sweep "$@"
