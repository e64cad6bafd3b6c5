#!/usr/bin/env bash
# GPU checks, run on the GPU machine from the repository root after scripts/build-device.sh:
#   bash scripts/gpu-check.sh [BINARY] [TEST_DIR]
# 1. the CUDA op and model tests (CUDA vs CPU, every dtype; fixtures vs HF), GPU required;
#    the linear-op binaries again with LIGHTSEQ_TILED_GEMM=all, which sends every GEMM of
#    more than 128 rows on sm_90 to the pipelined warpgroup-MMA kernel (by default it
#    takes only those whose activation cuBLASLt lacks), with every activation and the
#    residual, and with LIGHTSEQ_FUSED_LN=1 (post-norm GEMMs with the layer norm in their
#    epilogue, off by default); and the op binary's CUDA-against-CPU test again with
#    LIGHTSEQ_LN_PACKED=0, which keeps layer norm off the packed kernel (the scalar and
#    register-cached kernels then take the rows of whole 16-byte packs too);
# 2. `lightseq forward` at real sizes (scripts/gpu_parity.py: twelve models from BERT-base to
#    BART-large, HF's seeded initialization) against HF PyTorch on the same GPU: f32 vs
#    float64 (1e-4), f16 and bf16 vs float32 (1e-2, 3e-2).
set -uo pipefail
BIN=${1:-.device/lightseq}
TESTS=${2:-.device/tests}
export LIGHTSEQ_REQUIRE_GPU=1 LIGHTSEQ_REQUIRE_NVRTC=1
# Decode steps that can be captured as CUDA graphs must be (no silent eager fallback).
export LIGHTSEQ_CUDA_GRAPHS=require
export LIGHTSEQ_FIXTURES=$PWD/tests/fixtures
export LIGHTSEQ_CACHE_DIR=${LIGHTSEQ_CACHE_DIR:-/tmp/lightseq-kernels}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for t in "$TESTS"/*; do
  echo "== $(basename "$t")"
  if ! "$t" --test-threads=1 --nocapture 2>&1; then status=1; fi
done
# Reruns: binary, test filter, then the variables it runs under.
for t in "ops cuda_ops_match_cpu LIGHTSEQ_TILED_GEMM=all LIGHTSEQ_FUSED_LN=1" \
  "train_ops linear LIGHTSEQ_TILED_GEMM=all LIGHTSEQ_FUSED_LN=1" \
  "ops cuda_ops_match_cpu LIGHTSEQ_LN_PACKED=0"; do
  read -r bin filter vars <<< "$t"
  [ -x "$TESTS/$bin" ] || continue
  echo "== $bin $filter, $vars"
  # $vars unquoted: each assignment its own word.
  if ! env $vars "$TESTS/$bin" --test-threads=1 "$filter" 2>&1; then status=1; fi
done
echo "== real-size parity"
python3 scripts/gpu_parity.py --bin "$BIN" || status=1
echo "== gpu-check: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
