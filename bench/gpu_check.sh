#!/usr/bin/env bash
# The GPU check of issue 7, as one prepared script for a lent GPU machine (under 8 minutes).
#
# Such hosts have torch, timm, transformers, accelerate and OpenCV but not `datasets` or `pydicom`, and
# reach no network: those two come from wheels carried with the tree in bench/wheels/ (fill it here
# with `bash bench/fetch_wheels.sh PYTHON_VERSION`, then carry "bench/wheels").
# Results go to $OUT (or bench/gpu_out): bench_model.json (DeiT-S, batch 256, bf16: timm fused and
# compiled, ours paper/cxr fused and compiled, peak memory) and bench_train.json (224^2 phantoms).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! python -c "import datasets, pydicom" 2>/dev/null; then
  python -m pip install --no-index --find-links bench/wheels datasets pydicom >"$OUT/pip.log" 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python -c "import torch; print('torch', torch.__version__)"; date -u; } >"$OUT/machine.txt"
timeout 300 python bench/bench_model.py --compile --variants timm,paper,cxr --rounds 2 --steps 10 \
  >"$OUT/bench_model.json" 2>"$OUT/bench_model.log" || echo "bench_model failed: see $OUT/bench_model.log"
timeout 150 python bench/bench_train.py >"$OUT/bench_train.json" 2>"$OUT/bench_train.log" || echo "bench_train failed: see $OUT/bench_train.log"
tail -n 1 "$OUT/bench_model.json" "$OUT/bench_train.json"
