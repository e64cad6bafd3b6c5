#!/usr/bin/env bash
# Interleaved timings of `lightseq` binaries on the inference workloads of the grid
# (BERT-base forward, Transformer-base beam 4, GPT2 top-k sampling), in one call on the GPU
# machine, so that their ratios come from one run on one GPU:
#   [ROUNDS=2] [PIN=CORE] bash scripts/bench/ab_inference.sh SIDE SIDE...
# A side is a binary's path, with environment settings for it in front if any:
# "ENV=V,ENV2=V:path". The sides' order rotates from round to round. PIN runs every
# process on that one CPU core (taskset): unpinned, generation times moved 5-8% between
# processes on an H200 machine, pinned ~2-3% (docs/performance.md, inference run 15).
set -u
[ $# -ge 1 ] || { echo "usage: ab_inference.sh SIDE SIDE..." >&2; exit 2; }
ROUNDS=${ROUNDS:-2}
export LIGHTSEQ_CACHE_DIR=${LIGHTSEQ_CACHE_DIR:-/tmp/lightseq-kernels}
run() {
  local spec=$1 envs="" bin=$1
  if [[ $spec == *:* ]]; then envs=${spec%%:*}; bin=${spec#*:}; fi
  local -a e=()
  [ -n "$envs" ] && IFS=, read -r -a e <<<"$envs"
  shift
  local -a pin=()
  [ -n "${PIN:-}" ] && pin=(taskset -c "$PIN")
  env ${e[@]+"${e[@]}"} ${pin[@]+"${pin[@]}"} "$bin" bench --device cuda --dtype f16 "$@" | grep median \
    | sed 's/ on cuda.*median/ median/'
}
sides=("$@")
n=${#sides[@]}
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((n - 1))); do
    side=${sides[$(((i + r - 1) % n))]}
    echo "== $side (round $r)"
    run "$side" --preset bert-base --task forward --batch 1,8,32 --seq 8,32,128 --iters 30 --warmup 5
    run "$side" --preset transformer-base --task generate --batch 1,8,32 --seq 8,32,128 \
      --new-tokens-like-seq --num-beams 4 --iters 3 --warmup 1
    run "$side" --preset gpt2 --task generate --batch 1,8,32 --seq 32 --max-new-tokens 32 \
      --do-sample true --top-k 50 --iters 5 --warmup 1
  done
done
