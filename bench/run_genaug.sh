#!/usr/bin/env bash
# Regenerates bench/results/genaug.json (one JSON line per configuration) and bench/results/GENAUG.md.
# Run on a quiet machine: the numbers are medians of same-run timings of the fused op and the reference path.
#   bench/run_genaug.sh                 # CPU rows (cpu backend, batch 1/64/500)
#   DEVICE=cuda bench/run_genaug.sh     # GPU rows (triton backend, batch 500/4096), on a machine with CUDA
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
REPEATS=${REPEATS:-7}
OUT=bench/results/genaug${SUFFIX:-}.json
mkdir -p bench/results
: > "$OUT.tmp"
if [ "$DEVICE" = cpu ]; then
  for batch in 500 64 1; do
    $PY -m haba_fast.cli bench genaug --backend cpu --device cpu --batch "$batch" --size 32 --channels 3 --k 3 \
      --repeats "$REPEATS" --json >> "$OUT.tmp"
  done
  $PY -m haba_fast.cli bench genaug --backend cpu --device cpu --batch 500 --size 28 --channels 1 --k 5 \
    --repeats "$REPEATS" --json >> "$OUT.tmp"
else
  for batch in 500 4096; do
    $PY -m haba_fast.cli bench genaug --backend triton --device cuda --batch "$batch" --size 32 --channels 3 --k 3 \
      --repeats "$REPEATS" --json >> "$OUT.tmp"
  done
fi
mv "$OUT.tmp" "$OUT"
$PY -m haba_fast.benchmarks.genaug report "$OUT" > bench/results/GENAUG${SUFFIX:-}.md
echo "wrote $OUT and bench/results/GENAUG${SUFFIX:-}.md"
