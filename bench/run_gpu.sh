#!/usr/bin/env bash
# The one script for a lent GPU machine: build, GPU acceptance tests, GPU benchmarks, the rest of the suite.
#
#   bench/run_gpu.sh                # on the GPU machine, from the repo root (OUT=folder whose files come back)
#   DRY=1 bench/run_gpu.sh          # a CPU dry run here: every phase at tiny sizes, .venv's python, no build
#
# Phases run in order, each under `timeout` with its own budget, and a failing phase is logged and the next one
# runs (no `set -e`). The whole run stays under TOTAL seconds (default 540): the later phases get what remains.
# On an H200 (2026-12-04) the build took 109 s and the non-Triton GPU tests over 110 s (the compiled-step tests
# compile with inductor); with 15 minutes of device time a session has room for this run and a short second one.
# Order = priority: the C++ build and the Triton part of tests/test_gpu.py run side by side (the Triton tests
# need no extension, and their compiles warm Triton's disk cache for the benchmarks), then the rest of
# tests/test_gpu.py but its compiled-step tests, the iteration benchmark and its profile
# (bench/profile_iteration.py), the compiled-step tests (they compile with inductor, and the compiled step is a
# diagnostic, not a candidate for the targets), the genaug benchmark and its profile, and last the rest of the
# suite (pytest-xdist).
# Everything goes to $OUT in at most 8 files: summary.txt, env.txt, build.log, gpu_tests.log, bench.log,
# suite.log and results.tar.gz (bench/results, junit xml files, every log). GPU settings are never changed.
# SKIP="suite build" skips phases by name (build gpu_triton gpu_rest iteration iprofile iprofile_a gpu_compiled
# genaug profile suite), e.g. for a rerun; EXTRA_CMD="..." runs one more command before the suite (phase extra, log extra.log in
# the tarball). Overrides: PYTHON, TOTAL, B_BUILD, B_GPU, B_ITER, B_IPROFILE, B_IPROFILE_A, B_GENAUG, B_PROFILE,
# B_EXTRA, B_SUITE (seconds), GPU_WORKERS (default 4), SUITE_WORKERS (default 8; pytest-xdist when installed).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
START=$(date +%s)
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=cpu
  OUT=${OUT:-$(mktemp -d /tmp/run_gpu_dry.XXXXXX)}
  # the Triton tests under the interpreter on CPU tensors, small cases only
  export HABA_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1
  export ROUNDS=1  # one round of the iteration benchmark's timed comparison
  GPU_TRITON_K="triton and (n7-cb1-C1-8x8 or 1ch-8x8 or refuses or (augment_float32 and (color or flip)) or info)"
  GPU_REST_K="not triton and not compiled_step and (c1-d2-groupnorm or first_order or distiller or device_mix)"
  GPU_COMPILED_K="compiled_step"  # skipped off CUDA: the phase's plumbing only
  SUITE_ARGS=(tests/test_cli_info_export.py tests/test_ops_generate.py -k "bad_inputs or info")
else
  PY=${PYTHON:-python3}
  DEVICE=cuda
  OUT=${OUT:?set OUT to the folder whose files come back}
  GPU_TRITON_K="triton"
  GPU_REST_K="not triton and not compiled_step"
  GPU_COMPILED_K="compiled_step"
  SUITE_ARGS=(tests/ --ignore=tests/test_gpu.py -m "not slow")
fi
TOTAL=${TOTAL:-540}
B_BUILD=${B_BUILD:-150}
B_GPU=${B_GPU:-150}
B_GENAUG=${B_GENAUG:-75}
B_ITER=${B_ITER:-330}  # 2026-12-04 on an H200: ~20 s a row, a compiled-step row 67 s at (a), > 110 s at (b)
B_IPROFILE=${B_IPROFILE:-60}
B_IPROFILE_A=${B_IPROFILE_A:-30}
B_SUITE=${B_SUITE:-120}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/run_gpu_logs.XXXXXX)
RES=$LOGS/results  # benchmark outputs: the committed CPU results are copied in, so the documents show both
mkdir -p "$RES"
cp bench/results/* "$RES"/ 2>/dev/null
SUMMARY=()

left() { echo $((TOTAL - ($(date +%s) - START))); }

budget() {  # budget WANTED -> min(WANTED, time left - 5), at least 10
  local l
  l=$(($(left) - 5))
  if [ "$1" -lt "$l" ]; then echo "$1"; elif [ "$l" -gt 10 ]; then echo "$l"; else echo 10; fi
}

phase() {  # phase NAME BUDGET LOG CMD...: run CMD under timeout, append to LOG, record rc and seconds
  local name=$1 b=$2 log=$3 t0 rc
  shift 3
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "=== phase $name skipped (SKIP)" | tee -a "$log"
    SUMMARY+=("$(printf '%-12s %5s %7s' "$name" skip 0)")
    echo "=== phase $name rc=skip in 0s" >> "$log"
    return 0
  fi
  t0=$(date +%s)
  echo "=== phase $name (budget ${b}s, $(left)s left of ${TOTAL}s): $*" | tee -a "$log"
  timeout -k 10 "$b" "$@" >> "$log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && echo "=== phase $name TIMED OUT after ${b}s" | tee -a "$log"
  echo "=== phase $name rc=$rc in $(($(date +%s) - t0))s" | tee -a "$log"
  SUMMARY+=("$(printf '%-12s %5s %7s' "$name" "$rc" "$(($(date +%s) - t0))")")
  return "$rc"
}

# ---- environment -------------------------------------------------------------------------------------------------
{
  echo "date: $(date -u)"; echo "host: $(hostname)"; echo "dry: $DRY"
  if command -v nvidia-smi > /dev/null; then nvidia-smi -L; nvidia-smi; else echo "nvidia-smi: not found"; fi
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available());
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  $PY -c "import xdist; print('pytest-xdist', xdist.__version__)" || echo "pytest-xdist: not importable"
  # The toolchain: on the 2026-11-26 device run the extension was compiled by /opt/gcc/bin/g++ against
  # /usr/include/c++/13 headers, and every TORCH_CHECK whose message formats an integer segfaulted (strings,
  # dtypes and devices did not): a libstdc++ header/library mismatch is suspected. See docs/RESULTS.md.
  echo "CXX=${CXX:-}"; which -a g++ c++ 2>/dev/null; g++ --version 2>/dev/null | head -1
  /usr/bin/g++ --version 2>/dev/null | head -1
  git log -1 --format='commit %h %s' 2>/dev/null || echo "commit: unknown (no git)"
  git status --short 2>/dev/null | head -30
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- build (side by side with the Triton tests) ---------------------------------------------------------------------
build() {
  if [ "$DRY" = 1 ]; then  # never rebuild the shared checkout's extension here: only check that it loads
    echo "dry run: no build, only a check that the extension loads"
  else
    build_ext || return 1
  fi
  $PY -c "
import sys
import haba_fast.kernels
from haba_fast._ext import extension_available, extension_error
ok = extension_available()
print('extension loaded:', ok, '' if ok else extension_error())
sys.exit(0 if ok else 1)" || return 1
  # Bad input must raise, not crash: one integer-formatting error message, in a child process.
  $PY - <<'PYEOF'
import subprocess, sys
code = ("import torch, haba_fast._ext as e; e.extension_available(); "
        "torch.ops.haba_fast.trajectory_match(torch.zeros(1, 1, 3, 8, 8), torch.zeros(1, 1, dtype=torch.long), "
        "torch.zeros(5), torch.ones(5), torch.tensor(0.1), [3, 10, 8, 1, 1, 0, 1, 1], False)")
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
ok = r.returncode == 1 and "RuntimeError" in r.stderr
print("error-path check:", "raises RuntimeError (ok)" if ok else f"FAILED rc={r.returncode}: {r.stderr[-300:]}")
PYEOF
  ldd haba_fast/_C*.so 2>/dev/null | grep -E "stdc\+\+|gomp" || true
}

build_ext() {
  if ! MAX_JOBS=16 PIP_BREAK_SYSTEM_PACKAGES=1 $PY -m pip install --no-build-isolation --no-deps -v -e .; then
    # A compiler that cannot build the per-ISA copies of the fused CPU loops (setup.py's HABA_FAST_ISA_COPIES):
    # the CUDA paths do not use them, so the GPU checks still run.
    echo "BUILD FAILED: pip install -e; retrying with HABA_FAST_ISA_COPIES=0 (baseline CPU loops only)"
    HABA_FAST_ISA_COPIES=0 MAX_JOBS=16 PIP_BREAK_SYSTEM_PACKAGES=1 \
      $PY -m pip install --no-build-isolation --no-deps -v -e . && return 0
    echo "pip install -e failed again; trying HABA_FAST_ISA_COPIES=0 setup.py build_ext --inplace"
    HABA_FAST_ISA_COPIES=0 MAX_JOBS=16 $PY setup.py build_ext --inplace || return 1
  fi  # haba_fast.kernels: linked before the build when the package could not find it (below)
}

XDIST_GPU=""
XDIST=()
if $PY -c "import xdist" 2> /dev/null; then XDIST_GPU="-n ${GPU_WORKERS:-4}"; XDIST=(-n "${SUITE_WORKERS:-8}"); fi

gpu_tests() {  # gpu_tests K JUNIT  (xdist workers compile the Triton kernels side by side)
  # shellcheck disable=SC2086  # XDIST_GPU is "" or "-n 4"
  $PY -m pytest -q -rA -p no:cacheprovider $XDIST_GPU tests/test_gpu.py -m gpu -k "$1" \
    --junitxml="$LOGS/$2" --durations=15
}
# `timeout` runs programs, not shell functions: run them through bash with what they use exported.
export PY LOGS DRY XDIST_GPU
export -f build build_ext gpu_tests

# haba_fast.kernels lives in kernels/ (setup.py's package_dir), found through the editable install's finder. The
# Triton tests start before that install exists: without it, link the folder into the package (same files).
if ! $PY -c "import haba_fast.kernels" 2> /dev/null; then
  ln -sfn ../kernels haba_fast/kernels && echo "linked haba_fast/kernels -> ../kernels (no editable install yet)"
fi

B=$(budget "$B_BUILD")
phase build "$B" "$LOGS/build.log" bash -c build &
BUILD_PID=$!
# The Triton tests need no extension: run them while the C++ extension compiles (a separate summary line).
# Their log goes to its own file; phase() runs in this shell so that its summary line is kept.
phase gpu_triton "$(budget "$B_GPU")" "$LOGS/gpu_tests.log" bash -c 'gpu_tests "$@"' _ "$GPU_TRITON_K" junit_gpu_triton.xml
wait "$BUILD_PID"
BUILD_RC=$?
# phase() ran in a background subshell: read its rc and seconds back from its log line
BUILD_LINE=$(grep -o "phase build rc=[a-z0-9]* in [0-9]*s" "$LOGS/build.log" | tail -1)
BUILD_S=${BUILD_LINE##* in }
BUILD_RC2=${BUILD_LINE#*rc=}
SUMMARY+=("$(printf '%-12s %5s %7s' build "${BUILD_RC2%% *}" "${BUILD_S%s}")")
[ "$BUILD_RC" = 0 ] || echo "build failed (rc $BUILD_RC): the C++ engine tests will skip or fail; see build.log"
if grep -q "retrying with HABA_FAST_ISA_COPIES=0" "$LOGS/build.log"; then  # which build the rows below ran
  SUMMARY+=("build: the first try FAILED; the extension (if any) has the baseline CPU loops only (HABA_FAST_ISA_COPIES=0)")
fi
tail -5 "$LOGS/build.log"

# ---- the rest of the GPU tests (C++ engine on CUDA, Distiller, CLI, bad input) -------------------------------------
phase gpu_rest "$(budget "$B_GPU")" "$LOGS/gpu_tests.log" bash -c 'gpu_tests "$@"' _ "$GPU_REST_K" junit_gpu_rest.xml
grep -E "passed|failed|error" "$LOGS/gpu_tests.log" | tail -4

# ---- benchmarks ----------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then QUICK=1; else QUICK=0; fi
# The iteration rows first (the memory-budget targets on the GPU), then where their time goes, then genaug.
phase iteration "$(budget "$B_ITER")" "$LOGS/bench.log" \
  env DEVICE="$DEVICE" PYTHON="$PY" RESULTS="$RES" QUICK="$QUICK" bench/run_iteration.sh
if [ "$DRY" = 1 ]; then
  IPROFILE=(--device cpu --ipc 2 --batch-syn 10 --syn-steps 2 --width 32 --repeats 1 --variants exact:0 naive)
  IPROFILE_A=("${IPROFILE[@]}")
else
  # (b): bpc 50, batch 500, 30 steps; then (a). exact:auto:auto:triton: the C++ op's blocks in the Triton kernels;
  # ...:graphs: its steps replayed from CUDA graphs (what stays eager at (a), where the host is the limit)
  IPROFILE=(--variants exact:0 exact:auto exact:auto:auto:triton exact:auto:auto:triton:graphs exact:auto:torch naive)
  IPROFILE_A=(--ipc 10 --batch-syn 100 --syn-steps 20 --variants exact:auto:auto:triton:graphs exact:0 exact:auto
    exact:auto:auto:triton exact:auto:torch naive)
fi
# PYTHONPATH: the script imports the package from the checkout also when the editable install failed.
phase iprofile "$(budget "$B_IPROFILE")" "$LOGS/iprofile.log" bash -c \
  'PYTHONPATH=. $PY bench/profile_iteration.py "$@"' _ "${IPROFILE[@]}"
phase iprofile_a "$(budget "$B_IPROFILE_A")" "$LOGS/iprofile.log" bash -c \
  'PYTHONPATH=. $PY bench/profile_iteration.py "$@"' _ "${IPROFILE_A[@]}"
grep -E "^=====|profiled step" "$LOGS/iprofile.log"
# The compiled-step tests (torch.compile with inductor: a minute of compiling) after the target rows.
phase gpu_compiled "$(budget "$B_GPU")" "$LOGS/gpu_tests.log" bash -c 'gpu_tests "$@"' _ "$GPU_COMPILED_K" \
  junit_gpu_compiled.xml
grep -E "passed|failed|error" "$LOGS/gpu_tests.log" | tail -2
phase genaug "$(budget "$B_GENAUG")" "$LOGS/bench.log" \
  env DEVICE="$DEVICE" PYTHON="$PY" RESULTS="$RES" QUICK="$QUICK" bench/run_genaug.sh
# A benchmark cut short by its budget leaves its rows so far: turn them into the documents all the same.
for f in "$RES"/genaug*.json.tmp; do
  [ -s "$f" ] || continue
  mv "$f" "${f%.tmp}"
  echo "genaug: kept the partial rows of $f" | tee -a "$LOGS/bench.log"
  $PY -m haba_fast.benchmarks.genaug report "$RES/genaug.json" "${f%.tmp}" > "$RES/GENAUG.md" 2>> "$LOGS/bench.log"
done
for f in "$RES"/iteration*.json.partial.jsonl; do
  [ -s "$f" ] || continue
  echo "iteration: writing the report from the partial rows of $f" | tee -a "$LOGS/bench.log"
  $PY - "$f" "${f%.partial.jsonl}" >> "$LOGS/bench.log" 2>&1 <<'PYEOF'
import json, sys
from haba_fast.benchmarks.iteration import write_report
write_report([json.loads(line) for line in open(sys.argv[1]) if line.strip()], sys.argv[2])
PYEOF
done

# ---- a profile of one genaug step (a map for the next optimization), and an optional one-off command ----------------
if [ "$DRY" = 1 ]; then PROFILE_ARGS=(--device cpu --backend cpu --batch 64 --steps 2); else PROFILE_ARGS=(); fi
phase profile "$(budget "${B_PROFILE:-60}")" "$LOGS/profile.log" $PY bench/profile_genaug.py ${PROFILE_ARGS[@]+"${PROFILE_ARGS[@]}"}
grep -E "reduction:" "$LOGS/profile.log"
if [ -n "${EXTRA_CMD:-}" ]; then  # EXTRA_CMD="..." runs one more command here (log: extra.log in the tarball)
  phase extra "$(budget "${B_EXTRA:-90}")" "$LOGS/extra.log" bash -c "$EXTRA_CMD"
fi

# ---- the rest of the suite -------------------------------------------------------------------------------------------
phase suite "$(budget "$B_SUITE")" "$LOGS/suite.log" \
  $PY -m pytest -q -rfEs -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --junitxml="$LOGS/junit_suite.xml" \
  "${SUITE_ARGS[@]}"
tail -3 "$LOGS/suite.log"

# ---- collect (at most 8 files in $OUT) ----------------------------------------------------------------------------
cp "$LOGS/build.log" "$LOGS/gpu_tests.log" "$LOGS/bench.log" "$LOGS/suite.log" "$OUT"/ 2> /dev/null
tar -czf "$OUT/results.tar.gz" -C "$LOGS" . 2> /dev/null
{
  echo "run_gpu.sh summary (dry=$DRY, total $(($(date +%s) - START))s of ${TOTAL}s; OUT=$OUT)"
  printf '%-12s %5s %7s\n' phase rc seconds
  for line in "${SUMMARY[@]}"; do echo "$line"; done
} > "$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
