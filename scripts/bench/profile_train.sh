#!/usr/bin/env bash
# Per-kernel GPU time of one training update (ncu, one metric pass per kernel), summed by
# kernel name, for: bash scripts/bench/profile_train.sh PRESET BATCH SEQ [BINARY]
set -u
PRESET=${1:-bert-base}; BATCH=${2:-128}; SEQ=${3:-128}; BIN=${4:-.device/lightseq}
OUT=${OUT:-/tmp}
export LIGHTSEQ_CACHE_DIR=${LIGHTSEQ_CACHE_DIR:-/tmp/lightseq-kernels}
# Warm the kernel cache so the profiled run compiles nothing.
$BIN bench --preset "$PRESET" --task train --batch "$BATCH" --seq "$SEQ" --iters 1 --warmup 0 >/dev/null 2>&1
ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  $BIN bench --preset "$PRESET" --task train --batch "$BATCH" --seq "$SEQ" --iters 1 --warmup 1 \
  > "$OUT/ncu-train.csv" 2>/dev/null
python3 - "$OUT/ncu-train.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("Metric Unit")
# One update: the launches after the previous optimizer step up to the last one (the run
# does two updates, each ending in adam_multi).
steps = [i for i, r in enumerate(rows) if r[ki].startswith("adam_multi")]
assert len(steps) >= 2, "expected two updates in the profile"
update = rows[steps[-2] + 1:steps[-1] + 1]
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in update:
    v = float(r[vi].replace(",", "")); u = r[ui]
    v *= {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[u]
    name = r[ki].split("(")[0][:60]
    tot[name] += v; cnt[name] += 1
s = sum(tot.values())
print(f"kernels in one update: {len(update)}, GPU time {s/1e3:.2f} ms")
for k, v in sorted(tot.items(), key=lambda x: -x[1])[:30]:
    print(f"{v/1e3:8.2f} ms {cnt[k]:6d}x  {k}")
PY
