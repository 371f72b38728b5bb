#!/usr/bin/env bash
# The GPU check (issues 7 and 15), as one prepared script for a lent GPU machine: about 9 minutes.
#
# Such hosts have torch, timm, transformers, accelerate and OpenCV but not `datasets` or `pydicom`, and
# reach no network: those come as wheels carried with the tree in bench/wheels/ (fill it here with
# `bash bench/fetch_wheels.sh`, then carry "bench/wheels"). Each step has its own time limit and the
# script goes on when one fails, so that what did finish comes back.
#
# Usage: bash bench/gpu_check.sh [all|bench|train|arms]. Writes to $OUT (or bench/gpu_out), at most 9 files:
#   machine.txt        card, driver, torch/timm/transformers versions
#   bench_model.json   DeiT-S, batch 256, bf16: timm vs ours paper/cxr, eager: train and inference img/s,
#                      peak memory, interleaved rounds; top kernels of one training step
#   count_ops.json     compute operations per training step: timm and every SCM solver (auto = dense here)
#   bench_model_compiled.json   one JSON line per SCM variant x compile mode (default, reduce-overhead),
#                      each against a compiled timm in the same process, compile time included
#   bench_train.json   the training data path (uint8 cache -> augmentation -> step) vs synthetic tensors
#   all_results.json   a short from-scratch deit-tiny 224 run of run_wsol.py with --mixed_precision bf16
#   wsol_sample.png, wsol_maps.png   one heatmap comparison and one F0/S0/F0*S0 sample of that run
#   arms.tar.gz        with ARMS="a b": bench/ablation.py's runs of those arms, seeds 0-2 (models, results)
#   logs.txt           every step's log
# Mode `arms` (issue 31) runs only bench/ablation.py in the foreground: ARMS over seeds 0-2, ARMS_PARALLEL at a
# time, with ARMS_EXTRA as every run's flags (e.g. the deit-tiny 224 regime; the peers get its data flags);
# arms.tar.gz then holds results, logs and the table (ablation.md), pictures.tar.gz the first arm's seed-0 pictures.
# COMPILED_VARIANTS="" skips the compiled timings, BENCH_TRAIN_LIMIT=0 the data-path benchmark.
set -uo pipefail
MODE=${1:-all}  # all | bench | train | arms
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the arms' pictures are packed from another folder
START=$(date +%s)
LOG="$OUT/logs.txt"
: >"$LOG"
PY=${PYTHON:-python3}
step() { echo "=== $1 ($(($(date +%s) - START)) s)" | tee -a "$LOG"; }

step "install carried wheels"
if ! $PY -c "import datasets, pydicom" 2>/dev/null; then
  # --no-deps: the host's numpy/pyarrow/torch stay; only the missing pure-Python packages are added.
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls bench/wheels/*.whl | grep -v transformers) >>"$LOG" 2>&1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The transformers the project is developed with, if it imports on this host (else the host's own).
if ls bench/wheels/transformers-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_tf \
    bench/wheels/transformers-*.whl >>"$LOG" 2>&1
  if PYTHONPATH="/tmp/site_tf:${PYTHONPATH:-}" $PY -c "import transformers; from transformers import PreTrainedModel, BaseImageProcessor" >>"$LOG" 2>&1; then
    export PYTHONPATH="/tmp/site_tf:${PYTHONPATH:-}"
  fi
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HF_HOME=/tmp/hf_home
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, timm, transformers, accelerate, datasets; print('python', __import__('sys').version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('timm', timm.__version__); print('transformers', transformers.__version__); print('accelerate', accelerate.__version__); print('datasets', datasets.__version__)" 2>&1
  nproc
  date -u
} >"$OUT/machine.txt"
cat "$OUT/machine.txt" | tee -a "$LOG"

if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  # Eager and compiled in separate processes: a compilation that overruns its limit keeps the eager figures.
  step "bench_model eager (timm vs ours), with the top kernels"
  timeout "${BENCH_EAGER_LIMIT:-90}" $PY bench/bench_model.py --variants timm,paper,cxr --rounds 3 --steps 10 \
    --profile >"$OUT/bench_model.json" 2>>"$LOG" || echo "bench_model eager failed or timed out" | tee -a "$LOG"
  step "compute operations per training step (timm and every SCM solver)"
  timeout 120 $PY bench/bench_model.py --count_ops >"$OUT/count_ops.json" 2>>"$LOG" || echo "count_ops failed" | tee -a "$LOG"
  # Each SCM variant compiled in its own process beside a compiled timm (first_step_seconds = compile
  # time): one variant's long compile cannot take the others' figures with it. Then CUDA graphs.
  [ -n "${COMPILED_VARIANTS-paper cxr}" ] && : >"$OUT/bench_model_compiled.json"
  for variant in ${COMPILED_VARIANTS-paper cxr}; do
    for mode in default reduce-overhead; do
      step "bench_model compiled: $variant, mode $mode"
      timeout "${BENCH_COMPILED_LIMIT:-150}" $PY bench/bench_model.py --variants "timm_compiled,${variant}_compiled" \
        --compile_mode "$mode" --rounds 3 --steps 10 >>"$OUT/bench_model_compiled.json" 2>>"$LOG" \
        || echo "bench_model compiled $variant $mode failed or timed out" | tee -a "$LOG"
    done
  done
  if [ "${BENCH_TRAIN_LIMIT:-100}" != 0 ]; then
    step "bench_train (data path)"
    timeout "${BENCH_TRAIN_LIMIT:-100}" $PY bench/bench_train.py --images 2048 >"$OUT/bench_train.json" 2>>"$LOG" \
      || echo "bench_train failed or timed out" | tee -a "$LOG"
  fi
fi
if [ "$MODE" = arms ]; then
  ARMS_DIR=/tmp/arms
  step "bench/ablation.py: $ARMS, seeds 0-2, ${ARMS_PARALLEL:-3} at a time"
  timeout $(( ${TOTAL_LIMIT:-570} - ($(date +%s) - START) - 15 )) $PY bench/ablation.py --arms $ARMS --seeds 0 1 2 \
    --parallel "${ARMS_PARALLEL:-3}" --output_dir "$ARMS_DIR" ${ARMS_EXTRA:+-- $ARMS_EXTRA} >"$ARMS_DIR.json" 2>"$ARMS_DIR.log" \
    || echo "ablation failed or timed out" | tee -a "$LOG"
  tail -n 40 "$ARMS_DIR.log" >>"$LOG"
  cp "$ARMS_DIR.json" "$ARMS_DIR.log" "$ARMS_DIR"/ 2>/dev/null
  # Results, logs and wall times; no weights, caches or pictures (a returned file holds at most 16 MB).
  tar czf "$OUT/arms.tar.gz" -C /tmp --exclude='*.png' --exclude='*.jpg' --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='*.bin' --exclude=cache --exclude=checkpoints arms || echo "tar of the arms failed" | tee -a "$LOG"
  first=$(echo $ARMS | cut -d' ' -f1)
  ( cd "$ARMS_DIR" && tar czf "$OUT/pictures.tar.gz" $first-seed0/heatmap_comparisons $first-seed0/localization_samples ) \
    2>>"$LOG" || echo "no pictures" | tee -a "$LOG"
  step "done"
  cat "$ARMS_DIR/ablation.md"
  exit 0
fi
[ "$MODE" = bench ] && { step "done"; tail -n 1 "$OUT"/bench_*.json | cut -c1-2500; exit 0; }

ARMS_DIR=/tmp/arms
if [ -n "${ARMS:-}" ]; then
  # The default CPU recipe's seed arms, six at a time beside the deit-tiny run (issue 10's levers).
  step "seed arms in the background: $ARMS"
  ( timeout $(( ${TOTAL_LIMIT:-570} - ($(date +%s) - START) - 25 )) $PY bench/ablation.py --arms $ARMS --seeds 0 1 2 \
      --parallel "${ARMS_PARALLEL:-6}" --output_dir "$ARMS_DIR" ${ARMS_EXTRA:+-- $ARMS_EXTRA} >"$ARMS_DIR.json" 2>"$ARMS_DIR.log" ) &
  ARMS_PID=$!
fi

step "run_wsol.py: deit-tiny 224 from scratch, bf16"
TRAIN_DIR=/tmp/wsol-deit-tiny
LEFT=$(( ${TOTAL_LIMIT:-570} - ($(date +%s) - START) - 20 ))
timeout "$LEFT" $PY run_wsol.py --preset deit-tiny --image_size 224 --phantom_size 256 \
  --num_phantoms "${NUM_PHANTOMS:-4800}" --max_eval_samples "${MAX_EVAL:-400}" --per_device_train_batch_size 128 \
  --mixed_precision bf16 --preprocessing_num_workers 8 --output_dir "$TRAIN_DIR" --overwrite_output_dir \
  ${TRAIN_EXTRA:-} >>"$LOG" 2>&1 || echo "run_wsol failed or timed out after $LEFT s" | tee -a "$LOG"
if [ -n "${ARMS:-}" ]; then
  wait "$ARMS_PID" || echo "seed arms failed or timed out" | tee -a "$LOG"
  step "seed arms done"
  tail -n 30 "$ARMS_DIR.log" >>"$LOG"
  cp "$ARMS_DIR.json" "$ARMS_DIR"/ 2>/dev/null
  # Models and results, no pictures: the folder must stay under the 16 MB a returned file may have.
  tar czf "$OUT/arms.tar.gz" -C "$(dirname "$ARMS_DIR")" --exclude='*.png' --exclude='*.jpg' --exclude=cache \
    --exclude=checkpoints "$(basename "$ARMS_DIR")" || echo "tar of the arms failed" | tee -a "$LOG"
fi
cp "$TRAIN_DIR/all_results.json" "$OUT/" 2>/dev/null
sample=$(ls "$TRAIN_DIR"/heatmap_comparisons/*.png 2>/dev/null | head -n 1)
[ -n "$sample" ] && cp "$sample" "$OUT/wsol_sample.png"
sample=$(ls "$TRAIN_DIR"/localization_samples/*.png 2>/dev/null | head -n 1)
[ -n "$sample" ] && cp "$sample" "$OUT/wsol_maps.png"
step "done"
tail -n 1 "$OUT"/bench_*.json 2>/dev/null | cut -c1-2500
$PY - "$OUT/all_results.json" <<'PYEOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
methods = r["localization"]["methods"]
print(json.dumps({"test_balanced_accuracy": r["classification"]["test"]["balanced_accuracy"],
                  "MaxBoxAccV2": {m: round(v["calibrated_on_validation"]["MaxBoxAccV2"], 1) for m, v in methods.items()}}))
PYEOF
