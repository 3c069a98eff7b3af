#!/bin/sh
# The GPU check (a few minutes on one NVIDIA GPU): see bench/gpu_check.py. Uses whichever python has
# torch (the project's .venv if built). Writes gpu_check.json, gpu_check.md and gpu_check.log to $OUT
# (or the current folder); arguments go to bench/gpu_check.py.
set -eu
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT="${OUT:-.}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
PYTHONUNBUFFERED=1 "$PY" bench/gpu_check.py --out "$OUT" "$@" 2>"$OUT/gpu_check.log" \
  || { tail -40 "$OUT/gpu_check.log"; exit 1; }
