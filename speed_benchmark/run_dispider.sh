#!/usr/bin/env bash
# dispider: baseline vs +STC (cacher only).
# Usage: GPU=0 bash speed_benchmark/run_dispider.sh [stc-bench dispider options]
source "$(dirname "$0")/lib.sh"
run_stc_bench dispider "$@"
