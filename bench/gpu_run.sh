#!/usr/bin/env bash
# One GPU session, one command: check the Triton kernels on the device, then measure the GPU
# rows of every benchmark side by side with its peers. Results land in ${OUT:-bench/results}.
#   bash bench/gpu_run.sh            # on a CUDA machine with torch, triton, transformers, peft
# Ordered by what matters most, so a session cut short keeps the checks and the kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
status=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step $PY bench/gpu_check.py --device cuda --out "$OUT/gpu_check.json"
step $PY bench/train_step.py --device cuda --out "$OUT/train_step_cuda.json"
step $PY bench/serve.py --device cuda --models minilm-l6,stories-260k,llama-1b \
    --out "$OUT/serve_cuda.json"
step $PY bench/llm_scale.py --device cuda --shapes 1b --checkpointing off \
    --full-max-gib 100 --out "$OUT/llm_scale_cuda.json"
exit $status
