#!/usr/bin/env bash
# Quick look at where time goes on the GPU machine: our timings for three workloads, then
# ncu's per-kernel summary of one BERT-base forward. Run from the repository root.
set -u
BIN=${1:-.device/lightseq}
export LIGHTSEQ_CACHE_DIR=${LIGHTSEQ_CACHE_DIR:-/tmp/lightseq-kernels}
OUT=${OUT:-/tmp}
$BIN bench --preset bert-base --task forward --batch 32 --seq 128 --iters 10
$BIN bench --preset bert-base --task forward --batch 1 --seq 8 --iters 20
$BIN bench --preset transformer-base --task generate --batch 8 --seq 32 --max-new-tokens 32 --num-beams 4 --iters 3
$BIN bench --preset gpt2 --task generate --batch 8 --seq 32 --max-new-tokens 32 --do-sample true --top-k 50 --iters 3
if command -v ncu >/dev/null; then
  ncu --clock-control none --print-summary per-kernel $BIN bench --preset bert-base --task forward --batch 32 --seq 128 --iters 1 --warmup 0 > "$OUT/ncu-bert.txt" 2>&1
  grep -E "^\s+[a-zA-Z_].*\(|Duration|Invocations" "$OUT/ncu-bert.txt" | head -80
fi
