#!/usr/bin/env bash
# livecc: baseline vs +STC (cacher only).
# Usage: GPU=0 bash speed_benchmark/run_livecc.sh [stc-bench livecc options]
source "$(dirname "$0")/lib.sh"
run_stc_bench livecc "$@"
