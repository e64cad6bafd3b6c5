#!/usr/bin/env bash
# Registers, stack (spills) and shared memory of a kernel file's functions for one GPU
# architecture, compiled here without a GPU, as NVRTC compiles it (common.cuh in front):
#   bash scripts/kernel-resources.sh MODULE [ARCH] [REGEX]
#   e.g. bash scripts/kernel-resources.sh attention_train 90 'attn_short_bwd_d64'
# With SASS=1 the regex's functions' SASS goes to $TMPDIR/lightseq-sass/MODULE.sass.
# nvcc, ptxas and cuobjdump come from pip wheels (installed once into
# ~/.cache/lightseq-ci/sass-deps); their versions must agree with each other (a newer nvvm
# emits PTX that ptxas 13.0 rejects).
set -euo pipefail
cd "$(dirname "$0")/.."
MODULE=${1:?usage: kernel-resources.sh MODULE [ARCH] [REGEX]}
ARCH=${2:-90}
REGEX=${3:-.}
SRC=crates/lightseq/src/backend/cuda/kernels
[ -f "$SRC/$MODULE.cu" ] || { echo "no kernel file $SRC/$MODULE.cu" >&2; exit 1; }
DEPS=${LIGHTSEQ_SASS_DEPS:-$HOME/.cache/lightseq-ci/sass-deps}
NV=$DEPS/nvidia/cu13
if [ ! -x "$NV/bin/nvcc" ] || [ ! -x "$NV/bin/cuobjdump" ] || [ ! -f "$NV/include/nv/target" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEPS" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
fi
WORK=${TMPDIR:-/tmp}/lightseq-sass
mkdir -p "$WORK"
{ cat "$SRC/common.cuh"; echo "#line 1 \"$MODULE.cu\""; cat "$SRC/$MODULE.cu"; } > "$WORK/$MODULE.cu"
PATH=$NV/bin:$PATH nvcc -cubin -arch="sm_$ARCH" -std=c++17 -O3 -I"$NV/include" \
  -o "$WORK/$MODULE.cubin" "$WORK/$MODULE.cu"
PATH=$NV/bin:$PATH cuobjdump -res-usage "$WORK/$MODULE.cubin" | python3 -c '
import re, sys
regex = re.compile(sys.argv[1])
name = None
for line in sys.stdin:
    m = re.search(r"Function (\S+):", line)
    if m:
        name = m.group(1)
        continue
    if name and regex.search(name) and "REG:" in line:
        f = dict(re.findall(r"(\w+):(\d+)", line))
        reg, stack, shared = (f.get(k, "?") for k in ("REG", "STACK", "SHARED"))
        print(f"{name:44s} REG {reg:>4s}  STACK {stack:>4s}  SHARED {shared:>6s}")
        name = None
' "$REGEX"
if [ "${SASS:-0}" = 1 ]; then
  : > "$WORK/$MODULE.sass"
  for f in $(PATH=$NV/bin:$PATH cuobjdump -res-usage "$WORK/$MODULE.cubin" | grep -oE "Function [^:]+" | cut -d' ' -f2 | grep -E "$REGEX"); do
    PATH=$NV/bin:$PATH cuobjdump -sass -fun "$f" "$WORK/$MODULE.cubin" >> "$WORK/$MODULE.sass"
  done
  echo "SASS: $WORK/$MODULE.sass"
fi
