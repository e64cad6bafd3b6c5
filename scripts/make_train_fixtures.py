#!/usr/bin/env python3
"""Training references: 15 full-batch AdamW steps of the GPT2 fixture model (HF
transformers + torch.optim, float64), the loss of each step from its own forward pass
before its update, fairseq's label-smoothed cross entropy averaged over target tokens,
gradient norm before clipping. Writes tests/fixtures/train/gpt2.json.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import ragged_ids  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def fairseq_loss(logits, targets, eps):
    lp = logits.log_softmax(-1)
    v = lp.shape[-1]
    nll = -lp.gather(1, targets[:, None])[:, 0]
    smooth = -lp.sum(-1)
    eps_i = eps / (v - 1)
    return ((1 - eps - eps_i) * nll + eps_i * smooth).sum(), nll.sum()


def run(rows, ls, clip, steps=15):
    from transformers import GPT2LMHeadModel
    torch.set_default_dtype(torch.float64)
    model = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, "gpt2"), dtype=torch.float32).double()
    model.train()  # dropout is 0 in the fixture config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    tokens = sum(len(r) - 1 for r in rows)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        total, nll = 0.0, 0.0
        for r in rows:
            ids = torch.tensor([r[:-1]])
            logits = model(input_ids=ids).logits[0]
            l, n = fairseq_loss(logits, torch.tensor(r[1:]), ls)
            total = total + l
            nll = nll + n
        loss = total / tokens
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        opt.step()
        out.append({"loss": loss.item(), "nll_loss": (nll / tokens).item(), "grad_norm": norm.item()})
    torch.set_default_dtype(torch.float32)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "train"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = ragged_ids(300, 101, [6, 11, 4, 9, 13])
    cases = []
    for ls, clip in [(0.1, 1.0), (0.0, None)]:
        cases.append({"label_smoothing": ls, "clip_norm": clip, "steps": run(rows, ls, clip)})
    with open(os.path.join(args.out, "gpt2.json"), "w") as f:
        json.dump({"model": "gpt2", "rows": rows, "lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-8,
                   "weight_decay": 0.01, "cases": cases}, f, indent=1)
    print([[round(s["loss"], 5) for s in c["steps"]][:4] for c in cases])


if __name__ == "__main__":
    main()
