#!/usr/bin/env python3
"""`lightseq forward` against HF PyTorch on the same GPU at real model sizes.

Builds bert-base and gpt2 (HF's own seeded initialization), saves them with
save_pretrained, runs a ragged batch through `lightseq forward` in f32, f16 and bf16, and
compares over real positions: f32 with HF float64, f16/bf16 with HF float32.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import ragged_ids, reference  # noqa: E402

LIMITS = {"f32": ("float64", 1e-4), "f16": ("float32", 1e-2), "bf16": ("float32", 3e-2)}


def models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    yield "bert-base", BertModel(BertConfig()), "hidden", 30522
    torch.manual_seed(1)
    yield "gpt2", GPT2LMHeadModel(GPT2Config()), "logits", 50257


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".device/lightseq")
    args = ap.parse_args()
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, kind, vocab in models():
            d = os.path.join(tmp, name)
            model.save_pretrained(d)
            ids = ragged_ids(7, vocab, [128, 77, 5, 100])
            with open(os.path.join(d, "input.json"), "w") as f:
                json.dump({"input_ids": ids}, f)
            refs = {p: reference(model, kind, ids, dtype=getattr(torch, p), device="cuda")
                    for p in ("float64", "float32")}
            mask = torch.zeros(refs["float32"].shape[:2], dtype=torch.bool)
            for i, s in enumerate(ids):
                mask[i, : len(s)] = True
            for dt, (ref_name, limit) in LIMITS.items():
                out = os.path.join(tmp, f"{name}-{dt}.safetensors")
                r = subprocess.run([args.bin, "forward", d, "--input", os.path.join(d, "input.json"),
                                    "--out", out, "--device", "cuda", "--dtype", dt],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    rows.append((name, dt, ref_name, float("nan"), limit, "ERROR " + r.stderr.strip()))
                    failed += 1
                    continue
                got = load_file(out)[kind].double()
                ref = refs[ref_name]
                err = ((got - ref)[mask].norm() / ref[mask].norm()).item()
                ok = err <= limit
                failed += not ok
                rows.append((name, dt, ref_name, err, limit, "ok" if ok else "MISMATCH"))
    print(f"{'model':<10} {'dtype':<5} {'HF ref':<8} {'rel err':>10} {'limit':>7}")
    for n, dt, rn, e, lim, st in rows:
        print(f"{n:<10} {dt:<5} {rn:<8} {e:>10.2e} {lim:>7.0e}  {st}")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
