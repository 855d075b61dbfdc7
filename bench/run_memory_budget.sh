#!/usr/bin/env bash
# Regenerates bench/results/memory_budget.json and bench/results/MEMORY_BUDGET.md: one full HaBa iteration
# (haba_fast.distill.Distiller.step on random CIFAR-shaped data, ConvNet-128, 5 hallucinators) per memory budget,
# each in a fresh process so its peak RSS is its own.
#
#   bench/run_memory_budget.sh             # rows (a) bpc 10 / batch 100 / syn_steps 20 and (b) bpc 50 / 500 / 30
#   ROWS=a bench/run_memory_budget.sh      # only row (a) (row (b) takes many minutes per budget on 2 cores)
#   A_BUDGETS=..., B_BUDGETS="unlimited"   # rows (a) / (b): the budgets after 0 (defaults "2GB 8GB unlimited min"
#                                          # and "8GB 2GB unlimited"; (b) unlimited keeps all 30 steps, ~15 GB over
#                                          # budget 0's ~3 GB: it needs ~18 GB free)
#   FLAT=1 bench/run_memory_budget.sh      # also budgets 0 and min at syn_steps 10 and 80 (memory flat in
#                                          # syn_steps; FLAT_BUDGETS="0 min offload", offload = budget 0 with
#                                          # --offload-weights), FLAT_REPEATS times each (default 3), interleaved,
#                                          # under MALLOC_ENV
#   APPEND=1 ...                           # add the new rows to the committed JSON instead of replacing it
#   BACKEND=torch bench/run_memory_budget.sh   # budgets above 0 on the torch backend (autograd graphs)
#   THREADS=1 PASSES=2 bench/run_memory_budget.sh   # torch threads per process (default: torch's); rows (a)/(b)
#                                          # repeated PASSES times (the report takes medians)
#   WARMUP=1 ...                           # rows (a)/(b) time the iteration after one untimed one in the same
#                                          # process (the steady state of a long run; own sections in the report)
#   RESULTS=/tmp/r, PYTHON=...             # output folder (default bench/results), interpreter
# On a shared machine THREADS=1 makes CPU time the work done: with 2 threads on 2 busy cores, the OpenMP threads
# spin at barriers while their sibling is descheduled, and that spinning counts as CPU time.
# Every budget runs the default engine (backend auto: on CPU tensors the C++ op, which keeps steps within the
# budget); the budgets above 0 get budget 0's peak RSS as --baseline-rss-mb, so each row carries the predicted peak
# (budget 0's peak + the stored steps) next to the measured one.
# The syn_steps rows compare peak RSS across processes: glibc's dynamic mmap threshold moves the peak by ~200 MB
# between identical runs, so they run with a fixed threshold (MALLOC_ENV) and the report takes medians.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RESULTS=${RESULTS:-bench/results}
ROWS=${ROWS:-ab}
BACKEND_ARGS=()
if [ -n "${BACKEND:-}" ]; then BACKEND_ARGS=(--backend "$BACKEND"); fi
THREAD_ARGS=()
if [ -n "${THREADS:-}" ]; then THREAD_ARGS=(--threads "$THREADS"); fi
MALLOC_ENV=${MALLOC_ENV:-MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072 MALLOC_ARENA_MAX=2}
mkdir -p "$RESULTS"
OUT=$RESULTS/memory_budget.json
TMP=$OUT.partial.jsonl
touch "$TMP"

run() {  # run IPC STEPS BATCH BUDGET [extra args]
  local ipc=$1 steps=$2 batch=$3 budget=$4
  shift 4
  echo "bench memory budget: ipc=$ipc syn_steps=$steps batch_syn=$batch budget=$budget $*" >&2
  ${RUN_ENV:-} $PY -m haba_fast.cli bench iteration --engine exact --ipc "$ipc" --n-hallucinators 5 --syn-steps "$steps" \
    --batch-syn "$batch" --warmup "${ROW_WARMUP:-0}" --repeats 1 --memory-budget "$budget" --json "${THREAD_ARGS[@]}" "$@" \
    | tail -1 > "$TMP.row" || {
    local offload=false
    case " $* " in *" --offload-weights "*) offload=true ;; esac
    echo "{\"bench\": \"iteration\", \"engine\": \"exact\", \"ipc\": $ipc, \"syn_steps\": $steps, \"batch_syn\": $batch, \"memory_budget\": \"$budget\", \"offload_weights\": $offload, \"failed\": true}" > "$TMP.row"
  }
  cat "$TMP.row" >> "$TMP"
}

base_rss() {  # the peak RSS of the last row
  $PY -c 'import json,sys; r=json.loads(open(sys.argv[1]).read()); print(r.get("peak_rss_mb", 0))' "$TMP.row"
}

config() {  # config IPC STEPS BATCH BUDGETS...
  local ipc=$1 steps=$2 batch=$3
  shift 3
  run "$ipc" "$steps" "$batch" 0
  local rss
  rss=$(base_rss)
  for b in "$@"; do run "$ipc" "$steps" "$batch" "$b" "${BACKEND_ARGS[@]}" --baseline-rss-mb "$rss"; done
}

for _ in $(seq "${PASSES:-1}"); do
  case $ROWS in *a*) ROW_WARMUP=${WARMUP:-0} config 10 20 100 ${A_BUDGETS:-2GB 8GB unlimited min} ;; esac
done
if [ "${FLAT:-0}" = 1 ]; then
  for _ in $(seq "${FLAT_REPEATS:-3}"); do
    for b in ${FLAT_BUDGETS:-0 min offload}; do
      extra=()
      if [ "$b" = offload ]; then b=0; extra=(--offload-weights); fi
      RUN_ENV="env $MALLOC_ENV" run 10 10 100 "$b" "${extra[@]}"
      RUN_ENV="env $MALLOC_ENV" run 10 80 100 "$b" "${extra[@]}"
    done
  done
fi
for _ in $(seq "${PASSES:-1}"); do
  case $ROWS in *b*) ROW_WARMUP=${WARMUP:-0} config 50 30 500 ${B_BUDGETS:-8GB 2GB unlimited} ;; esac
done

$PY - "$TMP" "$OUT" "${APPEND:-0}" <<'PYEOF'
import json, os, sys
from haba_fast.benchmarks.iteration import write_budget_report
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if sys.argv[3] == "1" and os.path.exists(sys.argv[2]):
    rows = json.load(open(sys.argv[2])) + rows
write_budget_report(rows, sys.argv[2])
PYEOF
rm -f "$TMP" "$TMP.row"
echo "wrote $OUT and $RESULTS/MEMORY_BUDGET.md" >&2
