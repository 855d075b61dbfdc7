#!/usr/bin/env bash
# Regenerates bench/results/iteration.json and bench/results/ITERATION.md: one full HaBa iteration
# (haba_fast.distill.Distiller.step on random CIFAR-shaped data, ConvNet-128, 5 hallucinators) per engine.
# Every configuration runs in a fresh process so its peak memory is its own.
#
#   bench/run_iteration.sh                 # the issue's targets (CPU); takes a while on 2 cores
#   DEVICE=cuda bench/run_iteration.sh     # the same table on a GPU (writes iteration_cuda.json / the GPU section),
#                                          # plus naive at bpc 50 / batch 500 / 30 steps, and at both sizes exact
#                                          # with --memory-budget auto, as chosen (the C++ op) and with --backend
#                                          # torch (the memory-budget targets), exact with --compile-step, and
#                                          # exact at budget 0 with --inputs stacked and streamed-step-checks,
#                                          # and exact at auto and 0 with --block-kernels triton, and exact at auto
#                                          # with --cuda-graphs (ATen and Triton blocks)
#   NAIVE40=1 bench/run_iteration.sh       # also the naive unroll at 40 steps on CPU (needs a lot of memory)
#   ROUNDS=5 bench/run_iteration.sh        # rounds of the timed comparison (default 3 on CPU, 1 on CUDA)
#   QUICK=1 bench/run_iteration.sh         # small syn-steps and width 32: a smoke run of the script
#   AUTO_ROWS=1 bench/run_iteration.sh     # the budget-auto, compiled-step and --inputs rows on CPU too
#   GROWTH=0 / GROWTH=1                    # without / with the rows of memory growth in syn_steps (CPU: with;
#                                          # GPU: without)
#   RESULTS=/tmp/r bench/run_iteration.sh  # output folder (default bench/results); PYTHON picks the interpreter
# CPU: every row is one iteration in a fresh process (no warm-up: at tens of seconds per iteration the first-call
# overheads are noise); the timed comparison interleaves the engines round by round so that they see the same
# machine load, and ITERATION.md reports the median over rounds.
# CUDA: warm-up 1 and 3 timed iterations per process (first calls compile Triton kernels and autotune cuDNN, which
# would dominate a sub-second iteration); a row that fails (naive out of memory) is recorded as failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}
RESULTS=${RESULTS:-bench/results}
if [ "$DEVICE" = cpu ]; then
  SUFFIX=""; DEF_ROUNDS=3; WARMUP=${WARMUP:-0}; REPEATS=${REPEATS:-1}; NAIVE40=${NAIVE40:-0}; NAIVE_BIG=${NAIVE_BIG:-0}
  GROWTH=${GROWTH:-1}
else
  SUFFIX="_${DEVICE%%:*}"; DEF_ROUNDS=1; WARMUP=${WARMUP:-1}; REPEATS=${REPEATS:-3}; NAIVE40=${NAIVE40:-1}
  NAIVE_BIG=${NAIVE_BIG:-1}; GROWTH=${GROWTH:-0}
fi
ROUNDS=${ROUNDS:-$DEF_ROUNDS}
mkdir -p "$RESULTS"
OUT=$RESULTS/iteration${SUFFIX}.json
# Rows collect here, one JSON line each; the file is removed once the report is written. A run cut short leaves it
# behind with the rows done so far (bench/run_gpu.sh turns those into the report).
TMP=$OUT.partial.jsonl
: > "$TMP"
EXTRA=()
if [ "${QUICK:-0}" = 1 ]; then S10=2; S20=4; S40=8; S30=2; EXTRA=(--width 32); else S10=10; S20=20; S40=40; S30=30; fi

run() {  # run ENGINE IPC STEPS BATCH [extra args]
  local engine=$1 ipc=$2 steps=$3 batch=$4
  shift 4
  echo "bench iteration: engine=$engine ipc=$ipc syn_steps=$steps batch_syn=$batch device=$DEVICE $*" >&2
  if ! $PY -m haba_fast.cli bench iteration --engine "$engine" --ipc "$ipc" --n-hallucinators 5 \
      --syn-steps "$steps" --batch-syn "$batch" --device "$DEVICE" --warmup "$WARMUP" --repeats "$REPEATS" \
      --json "${EXTRA[@]}" "$@" >> "$TMP"; then
    echo "bench iteration: engine=$engine ipc=$ipc syn_steps=$steps batch_syn=$batch FAILED (recorded)" >&2
    # the row's options too, so that the report labels a failed variant as itself (not as the engine's own row)
    local opts="" prev="" a
    for a in "$@"; do
      case "$prev" in
        --memory-budget) opts+=", \"memory_budget\": \"$a\"" ;;
        --backend) opts+=", \"backend_requested\": \"$a\"" ;;
        --inputs) opts+=", \"inputs\": \"$a\"" ;;
        --block-kernels) opts+=", \"block_kernels\": \"$a\"" ;;
      esac
      [ "$a" = --compile-step ] && opts+=", \"compile_step\": true"
      [ "$a" = --cuda-graphs ] && opts+=", \"cuda_graphs\": true"
      prev=$a
    done
    echo "{\"bench\": \"iteration\", \"engine\": \"$engine\", \"ipc\": $ipc, \"syn_steps\": $steps, \"batch_syn\": $batch, \"device\": \"$DEVICE\", \"failed\": true$opts}" >> "$TMP"
  fi
}

# Time at syn_steps 20, engines interleaved round by round (on a GPU first-order waits for the diagnostics below).
if [ "$DEVICE" = cpu ]; then ENGINES="exact naive first-order"; else ENGINES="exact naive"; fi
for round in $(seq "$ROUNDS"); do
  for engine in $ENGINES; do run "$engine" 10 $S20 100; done
done
# The rows below run only on a GPU (AUTO_ROWS=1: the first four kinds on CPU too).
# exact with --memory-budget auto (a fraction of free CUDA memory: per-step tensors kept, fewer recomputed) against
# naive at (a) bpc 10 / batch 100 / syn_steps 20 and (b) bpc 50 / batch 500 / syn_steps 30: as the engine chooses
# (the C++ op's kept steps, its composite path on CUDA tensors); --backend torch (kept autograd graphs) is
# auto_torch_row. Each its own row in the report.
auto_row() {  # auto_row IPC STEPS BATCH
  if [ "$DEVICE" != cpu ] || [ "${AUTO_ROWS:-0}" = 1 ]; then run exact "$1" "$2" "$3" --memory-budget auto; fi
}
auto_torch_row() {
  if [ "$DEVICE" != cpu ] || [ "${AUTO_ROWS:-0}" = 1 ]; then
    run exact "$1" "$2" "$3" --memory-budget auto --backend torch
  fi
}
# exact with the torch step compiled (--compile-step: torch.compile of the forward-over-reverse step, its
# elementwise work fused into Triton kernels; budget 0).
compiled_row() {
  if [ "$DEVICE" != cpu ] || [ "${AUTO_ROWS:-0}" = 1 ]; then run exact "$1" "$2" "$3" --compile-step; fi
}
# Budget 0 with the batches built otherwise (--inputs): stacked (all N in one call, the C++ op's whole unroll) and
# streamed with the per-step device checks of before 2026-12-04, beside the default (streamed, checked once on the
# host): where a streamed iteration's time goes on a host-bound GPU run.
inputs_rows() {
  if [ "$DEVICE" != cpu ] || [ "${AUTO_ROWS:-0}" = 1 ]; then
    run exact "$1" "$2" "$3" --inputs stacked
    run exact "$1" "$2" "$3" --inputs streamed-step-checks
  fi
}
# GPU only: the C++ op's steps replayed from CUDA graphs (--cuda-graphs, haba_fast/engines/graphs.py: a step costs
# the host a few launches instead of 60-230), and its blocks' norm/activation/pooling in the Triton kernels
# (--block-kernels triton; kernels/trajectory_block.py, one kernel per block and sweep in place of ~15 ATen
# passes), at budget auto: the candidates for the targets. The graphed rows warm up twice: a step op is captured at
# its second call, in the second iteration for one called once per iteration.
candidate_rows() {
  if [ "$DEVICE" != cpu ]; then
    run exact "$1" "$2" "$3" --memory-budget auto --cuda-graphs --warmup 2
    run exact "$1" "$2" "$3" --memory-budget auto --cuda-graphs --block-kernels triton --warmup 2
    run exact "$1" "$2" "$3" --memory-budget auto --block-kernels triton
  fi
}
blocks_zero_row() {
  if [ "$DEVICE" != cpu ]; then run exact "$1" "$2" "$3" --block-kernels triton; fi
}
# Order = priority, for a GPU run cut short by its time budget (bench/run_gpu.sh): each size's target rows (naive,
# auto, the candidates) first, then the diagnostics, the compiled step last (over 110 s at (b) on the H200,
# 2026-12-04, where the others take ~20 s).
auto_row 10 $S20 100
candidate_rows 10 $S20 100
# The reference's CIFAR-10 IPC-50 setting: bpc 50, batch 500, syn_steps 30 (naive: may run out of memory).
run exact 50 $S30 500
if [ "$NAIVE_BIG" = 1 ]; then run naive 50 $S30 500; fi
auto_row 50 $S30 500
candidate_rows 50 $S30 500
if [ "$DEVICE" != cpu ]; then run first-order 10 $S20 100; fi
for size in "10 $S20 100" "50 $S30 500"; do
  # shellcheck disable=SC2086  # word splitting wanted: IPC STEPS BATCH
  auto_torch_row $size; blocks_zero_row $size; inputs_rows $size
done
compiled_row 10 $S20 100
compiled_row 50 $S30 500
# Memory growth with syn_steps (bpc 10, batch 100); GROWTH=0 skips these rows (the default on a GPU, where the
# H100's rows of commit cfdd45e showed it: docs/RESULTS.md).
if [ "$GROWTH" = 1 ]; then
  run exact 10 $S10 100
  run exact 10 $S40 100
  run naive 10 $S10 100
  if [ "$NAIVE40" = 1 ]; then run naive 10 $S40 100; fi
fi

$PY - "$TMP" "$OUT" <<'PYEOF'
import json, sys
from haba_fast.benchmarks.iteration import write_report
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
write_report(rows, sys.argv[2])
PYEOF
rm -f "$TMP"
echo "wrote $OUT and $RESULTS/ITERATION.md" >&2
