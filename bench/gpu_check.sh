#!/bin/sh
# The GPU check (a few minutes on one NVIDIA GPU): throughput of each backbone in fp32/bf16/fp16 and
# agreement of GPU with CPU embeddings. Uses whichever python has torch (the project's .venv if built).
# Writes gpu_check.json to $OUT (or the current folder).
set -eu
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 exec "$PY" bench/gpu_check.py --json "${OUT:-.}/gpu_check.json" "$@"
