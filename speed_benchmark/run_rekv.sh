#!/usr/bin/env bash
# ReKV (LLaVA-OneVision-7B): ViT encoding + LLM pre-fill, baseline vs +STC (cacher + pruner).
# Usage: GPU=0 bash speed_benchmark/run_rekv.sh [stc-bench rekv options, e.g. --frames 16,32,64]
source "$(dirname "$0")/lib.sh"
run_stc_bench rekv "$@"
