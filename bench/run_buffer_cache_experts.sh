#!/usr/bin/env bash
# `haba-fast buffer` end to end with the C++ buffer cache on and off (train_network's batches: haba_fast._ext.BatchBuffers):
# one ConvNet expert, 2 epochs on 10,000 real Fashion-MNIST images (1,000 per class: 39 batches of 256 and a ragged
# 16), a test pass on the 10,000 test images after each epoch; one OpenMP thread; rounds interleaved.
#
#   bench/run_buffer_cache_experts.sh [ROUNDS] > bench/results/buffer_cache_experts.txt
#
# Prints one line per run (GNU time: user / sys CPU seconds, wall, peak RSS, minor page faults) and whether the two
# settings wrote the same expert files, byte for byte. Needs /usr/share/datasets/fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
HABA=${HABA:-.venv/bin/haba-fast}
TMP=$(mktemp -d /tmp/buffer_cache_experts.XXXXXX)
echo "# commit $(git log -1 --format=%h 2>/dev/null || echo unknown), $(date -u +%Y-%m-%d), $(nproc) cores"
for round in $(seq "$ROUNDS"); do
  for cache in 1 0; do
    rm -rf "$TMP/buf_$cache"
    /usr/bin/time -f "cache=$cache round=$round user=%U sys=%S wall=%e maxrss_kb=%M minflt=%R" \
      env HABA_FAST_BUFFER_CACHE=$cache OMP_NUM_THREADS=1 "$HABA" buffer --dataset FashionMNIST \
      --data_path /usr/share/datasets/fashion-mnist --num_experts 1 --train_epochs 2 --subset-per-class 1000 \
      --buffer_path "$TMP/buf_$cache" --device cpu --quiet --seed 0 > "$TMP/out_$cache" 2>&1
    tail -1 "$TMP/out_$cache"
  done
done
if diff -r -q "$TMP/buf_1" "$TMP/buf_0" > /dev/null; then echo "same expert files"; else echo "expert files DIFFER"; fi
rm -rf "$TMP"
