#!/usr/bin/env bash
# GPU smoke check: the worker's edit -> stream -> version path on a bf16 model, in a few minutes.
#
#   scripts/gpu_check.sh                                    SmolLM2 on cuda in bfloat16
#   scripts/gpu_check.sh --model /models/Meta-Llama-3-8B    a 7-8B model folder
#   scripts/gpu_check.sh --device cpu --dtype bfloat16 ...  the CPU run the tests make
#
# Writes bench/results/gpu-check-<date>.{json,md} and exits non-zero when a check fails (see
# scripts/gpu_check.py for the checks). Runs $PYTHON, else the checkout's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
