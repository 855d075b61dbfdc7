#!/usr/bin/env bash
# Regenerates bench/results/iteration.json and bench/results/ITERATION.md: one full HaBa iteration
# (haba_fast.distill.Distiller.step on random CIFAR-shaped data, ConvNet-128, 5 hallucinators) per engine.
# Every configuration runs in a fresh process so its peak RSS is its own.
#
#   bench/run_iteration.sh                 # the issue's targets (CPU); takes a while on 2 cores
#   DEVICE=cuda bench/run_iteration.sh     # the same table on a GPU (writes iteration_cuda.json / the GPU section)
#   NAIVE40=1 bench/run_iteration.sh       # also the naive unroll at 40 steps (needs a lot of memory)
#   ROUNDS=5 bench/run_iteration.sh        # rounds of the timed comparison (default 3)
#   QUICK=1 bench/run_iteration.sh         # small syn-steps: a smoke run of the script
# Every row is one iteration in a fresh process (no warm-up: at tens of seconds per iteration the first-call
# overheads are noise); the timed comparison interleaves the engines round by round so that they see the same
# machine load, and ITERATION.md reports the median over rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
ROUNDS=${ROUNDS:-3}
SUFFIX=$([ "$DEVICE" = cpu ] && echo "" || echo "_$DEVICE")
OUT=bench/results/iteration${SUFFIX}.json
TMP=$(mktemp)
trap 'rm -f "$TMP"' EXIT

run() {  # run ENGINE IPC STEPS BATCH [extra args]
  local engine=$1 ipc=$2 steps=$3 batch=$4
  shift 4
  echo "bench iteration: engine=$engine ipc=$ipc syn_steps=$steps batch_syn=$batch $*" >&2
  if ! $PY -m haba_fast.cli bench iteration --engine "$engine" --ipc "$ipc" --n-hallucinators 5 \
      --syn-steps "$steps" --batch-syn "$batch" --device "$DEVICE" --warmup 0 --repeats 1 \
      --json "$@" >> "$TMP"; then
    echo "{\"bench\": \"iteration\", \"engine\": \"$engine\", \"ipc\": $ipc, \"syn_steps\": $steps, \"batch_syn\": $batch, \"failed\": true}" >> "$TMP"
  fi
}

if [ "${QUICK:-0}" = 1 ]; then S10=2; S20=4; S40=8; S30=2; else S10=10; S20=20; S40=40; S30=30; fi

# Time at syn_steps 20, engines interleaved round by round.
for round in $(seq "$ROUNDS"); do
  for engine in exact naive first-order; do run "$engine" 10 $S20 100; done
done
# Memory growth with syn_steps (bpc 10, batch 100).
run exact 10 $S10 100
run exact 10 $S40 100
run naive 10 $S10 100
if [ "${NAIVE40:-0}" = 1 ]; then run naive 10 $S40 100; fi
# The reference's CIFAR-10 IPC-50 setting: bpc 50, batch 500, syn_steps 30.
run exact 50 $S30 500

$PY - "$TMP" "$OUT" <<'PYEOF'
import json, sys
from haba_fast.benchmarks.iteration import write_report
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
write_report(rows, sys.argv[2])
PYEOF
echo "wrote $OUT and bench/results/ITERATION.md" >&2
