#!/usr/bin/env bash
# The GPU device check (see bench/device_check.py): GPU tests, then rows/s of
# the Kaggle-shape DLRM for torch fp32/bf16/fp16 with and without CUDA graphs
# and ONNX Runtime CUDA.  Needs only this repository and a CUDA build of torch
# (2.11+) on the machine's python3; no venv, Java, TorchServe or internet.
# Writes device_check.md/.json/.png into $OUT, or bench/results/ when unset.
#
#   bench/device_check.sh                       # on a GPU machine, < 8 minutes
#   bench/device_check.sh --device cpu --quick  # checks the script on a CPU, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "device_check.sh: $PY not found (set PYTHON=...)" >&2; exit 2; }
"$PY" -c 'import torch' 2>/dev/null || { echo "device_check.sh: $PY cannot import torch" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The CUDA graphs and the parity checks want a quiet, deterministic GPU setup.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
exec "$PY" bench/device_check.py "$@"
