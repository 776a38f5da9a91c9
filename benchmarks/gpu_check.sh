#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): correctness and throughput on one CUDA device, bounded to 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
