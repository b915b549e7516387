#!/usr/bin/env bash
# streamforest: baseline vs +STC (cacher only).
# Usage: GPU=0 bash speed_benchmark/run_streamforest.sh [stc-bench streamforest options]
source "$(dirname "$0")/lib.sh"
run_stc_bench streamforest "$@"
