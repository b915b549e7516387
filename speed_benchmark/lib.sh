# Shared by the run_<framework>.sh entry points: pick the stc-bench to run and the device.
# GPU=N selects CUDA device N when CUDA is available; without CUDA the run falls back to the CPU.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -x .venv/bin/stc-bench ]]; then STC_BENCH=(.venv/bin/stc-bench); PYTHON=.venv/bin/python
else STC_BENCH=(stc-bench); PYTHON=python3; fi

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE_ARGS=(--gpu "${GPU:-0}")
else
  echo "speed_benchmark: no CUDA device here, running on the CPU (--scale auto picks the small preset)" >&2
  DEVICE_ARGS=(--device cpu)
fi

run_stc_bench() {  # run_stc_bench COMMAND [OPTIONS...]
  local command=$1; shift
  exec "${STC_BENCH[@]}" "$command" "${DEVICE_ARGS[@]}" "$@"
}
