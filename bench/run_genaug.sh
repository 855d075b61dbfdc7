#!/usr/bin/env bash
# Regenerates bench/results/genaug.json (CPU) or genaug_cuda.json (GPU), one JSON line per configuration, and
# bench/results/GENAUG.md from both files (CPU section, then the GPU section with achieved bandwidth).
# Run on a quiet machine: the numbers are medians of same-run timings of the fused op and the reference path.
#   bench/run_genaug.sh                 # CPU rows (cpu backend, batch 1/64/500)
#   DEVICE=cuda bench/run_genaug.sh     # GPU rows (triton backend, batch 500/4096), on a machine with CUDA
#   QUICK=1 bench/run_genaug.sh         # a smoke run of the script (batch 8, 1 repeat); writes *_quick files
# PYTHON (default python), REPEATS (default 7 on CPU, 20 on CUDA: a GPU step takes ~1 ms), SUFFIX (output names),
# RESULTS (output folder, default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then DEF_SUFFIX=""; DEF_REPEATS=7; else DEF_SUFFIX="_${DEVICE%%:*}"; DEF_REPEATS=20; fi
if [ "${QUICK:-0}" = 1 ]; then DEF_SUFFIX="${DEF_SUFFIX}_quick"; DEF_REPEATS=1; fi
SUFFIX=${SUFFIX:-$DEF_SUFFIX}
REPEATS=${REPEATS:-$DEF_REPEATS}
RESULTS=${RESULTS:-bench/results}
OUT=$RESULTS/genaug${SUFFIX}.json
mkdir -p "$RESULTS"
: > "$OUT.tmp"
bench() {  # bench BATCH SIZE CHANNELS K BACKEND
  $PY -m haba_fast.cli bench genaug --backend "$5" --device "$DEVICE" --batch "$1" --size "$2" --channels "$3" \
    --k "$4" --repeats "$REPEATS" --json >> "$OUT.tmp"
}
if [ "${QUICK:-0}" = 1 ]; then
  bench 8 16 3 3 "$([ "$DEVICE" = cpu ] && echo cpu || echo triton)"
elif [ "$DEVICE" = cpu ]; then
  for batch in 500 64 1; do bench "$batch" 32 3 3 cpu; done
  bench 500 28 1 5 cpu
else
  for batch in 4096 500; do bench "$batch" 32 3 3 triton; done  # 4096 first: the bandwidth target's batch
fi
mv "$OUT.tmp" "$OUT"
# The document shows every result file present: the committed CPU rows and, when there, the GPU rows.
if [ "${QUICK:-0}" = 1 ]; then
  JSONS=("$OUT"); MD=$RESULTS/GENAUG${SUFFIX}.md
else
  JSONS=()
  for f in "$RESULTS/genaug.json" "$RESULTS/genaug_cuda.json"; do
    if [ -f "$f" ]; then JSONS+=("$f"); fi
  done
  if [ "$OUT" != "$RESULTS/genaug.json" ] && [ "$OUT" != "$RESULTS/genaug_cuda.json" ]; then JSONS+=("$OUT"); fi
  MD=$RESULTS/GENAUG.md
fi
$PY -m haba_fast.benchmarks.genaug report "${JSONS[@]}" > "$MD.tmp"
mv "$MD.tmp" "$MD"
echo "wrote $OUT and $MD"
