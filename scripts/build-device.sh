#!/usr/bin/env bash
# Builds the release binary and the test binaries into .device/ for scripts/gpu-check.sh
# on the GPU machine (see ../shared/DEVICE.md). Nothing of CUDA is needed here.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p lightseq-cli
mkdir -p .device/tests
cp target/release/lightseq .device/
cargo test --release -p lightseq --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, shutil, sys, os
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        dst = os.path.join(".device/tests", m["target"]["name"])
        shutil.copy(m["executable"], dst)
        print("test binary:", dst)
'
