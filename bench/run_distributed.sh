#!/usr/bin/env bash
# Regenerates bench/results/distributed.json: one full HaBa iteration (haba-fast bench iteration: bpc 10, batch 100,
# 20 unrolled steps, ConvNet-128, exact engine) on 2 processes x 1 thread (torchrun, gloo, data-parallel: every step's
# batch split over the processes, Python adjoint with the per-step all-reduce) against 1 process x 2 threads (the
# same Python adjoint, and the default C++ op). Rounds interleave the three so they see the same machine load.
#
#   bench/run_distributed.sh                # ROUNDS=2 by default; RESULTS=/tmp/r to write elsewhere
#   QUICK=1 bench/run_distributed.sh        # width 32, 2 steps: a smoke run of the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${RESULTS:-bench/results}
ROUNDS=${ROUNDS:-2}
ARGS="--ipc 10 --batch-syn 100 --syn-steps 20 --engine exact --warmup 0 --repeats 1 --device cpu"
if [ "${QUICK:-0}" = 1 ]; then ARGS="--ipc 2 --batch-syn 20 --syn-steps 2 --width 32 --engine exact --warmup 0 --repeats 1"; fi
mkdir -p "$RESULTS"
OUT="$RESULTS/distributed.jsonl.tmp"
: > "$OUT"
PORT=${PORT:-29611}
for r in $(seq "$ROUNDS"); do
  OMP_NUM_THREADS=2 $PY -m haba_fast.cli bench iteration $ARGS --threads 2 --backend python >> "$OUT"
  OMP_NUM_THREADS=2 $PY -m haba_fast.cli bench iteration $ARGS --threads 2 --backend auto >> "$OUT"
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc-per-node 2 --master-port $((PORT + r)) \
    -m haba_fast.cli bench iteration $ARGS --threads 1 >> "$OUT" 2> >(grep -v "^\*\|OMP_NUM_THREADS" >&2)
done
$PY - "$OUT" "$RESULTS/distributed.json" "$ARGS" <<'PY'
import json, subprocess, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
doc = {"command": "bench/run_distributed.sh", "bench_args": sys.argv[3], "commit": commit, "rows": rows}
json.dump(doc, open(sys.argv[2], "w"), indent=1)
PY
rm -f "$OUT"
