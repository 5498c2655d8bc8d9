#!/usr/bin/env bash
# The GPU performance check in one script: tools/gpu_check.sh OUT_DIR [--part PART] [--smoke]
#
# For one CUDA GPU with PyTorch, torchvision and this project's other dependencies (h5py,
# click, opencv, pyyaml, matplotlib, pytest; DALI optional), no network, run from the
# checkout as it is (it puts the checkout on PYTHONPATH). Parts, in order (--part runs one):
#   tests     the tests marked cuda
#   compute   compute-only images/s (synthetic backend) per architecture: compute.json, eager;
#             compute_compiled.json, compiled as `trainer run --compile` does (ResNet-50 only:
#             compiling takes most of a minute)
#   pipeline  pipeline-only images/s per backend on the GPU (and the torch backend over a decoded
#             cache, --cache ram and device), beside the notebook loader and a
#             decode-only ceiling on the CPU: pipeline.json
#   train     end-to-end training images/s and data-wait fraction per architecture: train.json
# Each JSON file is written as soon as its step ends (bench_train.py rewrites its file after
# every architecture), and summary.json (the headline figures against the targets) after
# every part, so a check cut short keeps what it measured. Every step has a time budget
# (STEP_BUDGET below), 345 s in all: the whole check ends within 6 minutes on one H200.
# gpu_check.log holds everything the steps printed.
# --smoke runs every part but the tests at toy sizes on the CPU in seconds (a test runs it,
# so the script cannot rot); compiling there uses torch.compile's "eager" backend.
set -uo pipefail

usage() { echo "usage: tools/gpu_check.sh OUT_DIR [--part tests|compute|pipeline|train] [--smoke]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
OUT=$1; shift
SMOKE=0
PARTS="tests compute pipeline train"
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --part) [[ $# -ge 2 ]] || usage
            case $2 in tests|compute|pipeline|train) PARTS=$2 ;; *) usage ;; esac
            shift ;;
    *) usage ;;
  esac
  shift
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

# Seconds each step may take at most (the smoke run's are generous: a loaded CI machine).
declare -A STEP_BUDGET=([tests]=110 [data]=30 [compute]=110 [pipeline]=45 [train]=50)
if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu; AMP=off; ARCHS=resnet18; COMPILED_ARCHS=resnet18; COMPILE_BACKEND=eager
  CLASSES=4; PER_CLASS=5; MIN=40; MAX=60; SIZE=32; BATCH=4; STEPS=1; WARMUP=1; WORKERS=1; CAP_SECONDS=1
  PARTS=${PARTS/tests/}
  for step in "${!STEP_BUDGET[@]}"; do STEP_BUDGET[$step]=300; done
  # One thread per process: on a small shared CPU, two OpenMP threads contending made each step ~8x slower.
  export OMP_NUM_THREADS=1
else
  DEVICE=cuda; AMP=bf16; ARCHS=mobilenet_v2,resnet18,resnet50; COMPILED_ARCHS=resnet50; COMPILE_BACKEND=inductor
  CLASSES=10; PER_CLASS=400; MIN=250; MAX=450; SIZE=224; BATCH=256; STEPS=20; WARMUP=5; WORKERS=$(nproc)
  CAP_SECONDS=8
fi
status=0
say() { echo "== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }
# run BUDGET_NAME COMMAND...: the command within its budget, its output in the log.
run() {
  local budget=${STEP_BUDGET[$1]}; shift
  timeout -k 5 "$budget" "$@" >>"$LOG" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 || $rc -eq 137 ]] && echo "   over its ${budget} s budget: $*" | tee -a "$LOG" \
      || echo "   failed ($rc): $*" | tee -a "$LOG"
    status=1
  fi
}
summary() { $PY "$ROOT/tools/gpu_summary.py" "$OUT" --json "$OUT/summary.json" >>"$LOG" 2>&1 || status=1; }
data() {
  [[ -f "$DATA/pack.h5" ]] && return
  say "data: $((CLASSES * PER_CLASS)) images of $MIN-$MAX px"
  run data $PY "$ROOT/tools/make_demo_dataset.py" "$DATA/src" --classes "$CLASSES" --per-class "$PER_CLASS" \
      --min-size "$MIN" --max-size "$MAX" --png-every 0 --workers "$WORKERS"
  run data $PY "$ROOT/tools/pack_dataset.py" "$DATA/src" "$DATA/pack.h5" --quiet --workers "$WORKERS"
}
bench_train() {  # BUDGET_NAME JSON ARGS...
  local budget=$1 json=$2; shift 2
  run "$budget" $PY "$ROOT/tools/bench_train.py" --pack "$DATA/pack.h5" --image-size "$SIZE" --batch-size "$BATCH" \
      --steps "$STEPS" --warmup "$WARMUP" --amp "$AMP" --device "$DEVICE" --workers "$WORKERS" --json "$OUT/$json" "$@"
}

say "environment"
# Versions from the installed metadata: importing torch only to print them costs seconds on a busy CPU
# (the benchmarks' JSON files name the GPU). The smoke run measures what the device image has: no DALI.
BACKENDS=$($PY -c "import importlib.metadata as m, importlib.util as u, sys
print(*(f'{p} {m.version(p)}' for p in ('torch', 'torchvision')), sep=', ', file=sys.stderr)
print('torch,dali' if u.find_spec('nvidia') and u.find_spec('nvidia.dali') and not $SMOKE else 'torch')" \
  2>>"$LOG") || BACKENDS=torch
echo "backends: $BACKENDS; device $DEVICE; parts: $PARTS" >>"$LOG"

for part in $PARTS; do
  case $part in
    tests)
      say "tests marked cuda"
      run tests $PY -m pytest -m cuda -q -p no:cacheprovider "$ROOT/tests" ;;
    compute)
      data
      say "compute only (synthetic backend): eager, then compiled ($COMPILED_ARCHS)"
      bench_train compute compute.json --archs "$ARCHS" --backends none --compiled-json "$OUT/compute_compiled.json" \
          --compiled-archs "$COMPILED_ARCHS" --compile-backend "$COMPILE_BACKEND" ;;
    pipeline)
      data
      say "pipelines alone ($BACKENDS on $DEVICE), the notebook loader and decode-only on the CPU"
      run pipeline $PY "$ROOT/tools/bench_pipeline.py" --src "$DATA/src" --pack "$DATA/pack.h5" --backends "$BACKENDS" \
          --device "$DEVICE" --batch-size "$BATCH" --epochs 1 --seconds "$CAP_SECONDS" --workers "$WORKERS" \
          --cache ram,device --json "$OUT/pipeline.json" ;;
    train)
      data
      say "end-to-end training ($BACKENDS)"
      bench_train train train.json --archs "$ARCHS" --backends "$BACKENDS" ;;
  esac
  summary
done

say "summary"
tail -n 30 "$LOG"
exit $status
