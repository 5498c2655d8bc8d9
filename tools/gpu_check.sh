#!/usr/bin/env bash
# One-script GPU performance check: tools/gpu_check.sh OUT_DIR [--smoke]
#
# For a machine with one CUDA GPU, PyTorch, torchvision and this project's other
# dependencies (h5py, click, opencv-python-headless, pyyaml, matplotlib; DALI optional),
# no network. Writes into OUT_DIR (at most six files):
#   gpu_check.log        everything the steps printed
#   compute.json         compute-only images/s (synthetic backend) per architecture, eager
#   compute_compiled.json  the same with --compile
#   pipeline.json        pipeline-only images/s per backend on the GPU, with the notebook
#                        loader and decode-only figures of the same images, and the torch
#                        backend over a decoded cache (--cache ram and device)
#   train.json           end-to-end training images/s and data-wait fraction per architecture
#   summary.json         the headline figures against the targets
# --smoke runs every step at toy sizes on the CPU in seconds (a test calls it, so the
# script cannot rot). Budget on one H200: under 8 minutes.
set -uo pipefail

usage() { echo "usage: tools/gpu_check.sh OUT_DIR [--smoke]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
OUT=$1; shift
SMOKE=0
for arg in "$@"; do
  case $arg in --smoke) SMOKE=1 ;; *) usage ;; esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT

if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu; AMP=off; ARCHS=resnet18; IMAGES=40; MIN=40; MAX=60; SIZE=32; BATCH=8; STEPS=2; WARMUP=1; WORKERS=1
else
  DEVICE=cuda; AMP=bf16; ARCHS=mobilenet_v2,resnet18,resnet50; IMAGES=20000; MIN=250; MAX=450; SIZE=224; BATCH=256
  STEPS=30; WARMUP=5; WORKERS=$(nproc)
fi
BACKENDS=torch
if $PY -c "import nvidia.dali" >/dev/null 2>&1; then BACKENDS=torch,dali; fi

status=0
step() { echo "== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }
run() { "$@" >>"$LOG" 2>&1 || { echo "   failed: $*" | tee -a "$LOG"; status=1; }; }

step "environment"
run $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
echo "backends: $BACKENDS; device $DEVICE" >>"$LOG"

if [[ $SMOKE == 0 ]]; then
  step "1/4 tests marked cuda"
  run $PY -m pytest -m cuda -q -p no:cacheprovider "$ROOT/tests"
fi

step "2/4 compute only (synthetic backend), eager and compiled"
run $PY "$ROOT/tools/bench_train.py" --archs "$ARCHS" --backends none --image-size "$SIZE" --batch-size "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --amp "$AMP" --device "$DEVICE" --json "$OUT/compute.json"
run $PY "$ROOT/tools/bench_train.py" --archs "$ARCHS" --backends none --image-size "$SIZE" --batch-size "$BATCH" \
    --steps "$STEPS" --warmup "$WARMUP" --amp "$AMP" --device "$DEVICE" --compile --json "$OUT/compute_compiled.json"

step "3/4 data: $IMAGES images of $MIN-$MAX px"
run $PY "$ROOT/tools/make_demo_dataset.py" "$DATA/src" --classes 10 --per-class $((IMAGES / 10)) --min-size "$MIN" \
    --max-size "$MAX" --png-every 0 --workers "$WORKERS"
run $PY "$ROOT/tools/pack_dataset.py" "$DATA/src" "$DATA/pack.h5" --quiet --workers "$WORKERS"

step "4/4 pipelines alone, then end-to-end training ($BACKENDS)"
run $PY "$ROOT/tools/bench_pipeline.py" --src "$DATA/src" --backends "$BACKENDS" --device "$DEVICE" --batch-size "$BATCH" \
    --epochs 1 --workers "$WORKERS" --cache ram,device --json "$OUT/pipeline.json"
run $PY "$ROOT/tools/bench_train.py" --pack "$DATA/pack.h5" --archs "$ARCHS" --backends "$BACKENDS" --image-size "$SIZE" \
    --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --amp "$AMP" --device "$DEVICE" --workers "$WORKERS" \
    --json "$OUT/train.json"

step "summary"
run $PY "$ROOT/tools/gpu_summary.py" "$OUT" --json "$OUT/summary.json"
tail -n 30 "$LOG"
exit $status
