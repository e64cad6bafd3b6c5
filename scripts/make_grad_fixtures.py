#!/usr/bin/env python3
"""Gradients and optimizer steps from torch autograd / torch.optim (float64), for the
training tests: tests/fixtures/grad/*.safetensors.
Usage: python3 scripts/make_grad_fixtures.py [--out tests/fixtures/grad]
"""
import argparse
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

D = torch.float64


def rnd(g, *shape):
    return torch.randn(*shape, generator=g, dtype=D)


def save(out, name, tensors):
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()},
              os.path.join(out, f"{name}.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "grad"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    # Linear with bias and each activation: y = act(x w^T + b), loss = sum(y * dy).
    m, n, k = 7, 11, 13
    for act in ["gelu", "gelu_new", "relu", "silu"]:
        x, w, b, dy = rnd(g, m, k), rnd(g, n, k), rnd(g, n), rnd(g, m, n)
        for t in (x, w, b):
            t.requires_grad_(True)
        z = x @ w.T + b
        y = {"gelu": F.gelu(z), "gelu_new": F.gelu(z, approximate="tanh"), "relu": F.relu(z), "silu": F.silu(z)}[act]
        (y * dy).sum().backward()
        save(args.out, f"linear_{act}", dict(x=x, w=w, b=b, dy=dy, pre=z, dx=x.grad, dw=w.grad, db=b.grad))

    # Layer norm.
    rows, h = 5, 17
    x, gm, bt, dy = rnd(g, rows, h), rnd(g, h), rnd(g, h), rnd(g, rows, h)
    for t in (x, gm, bt):
        t.requires_grad_(True)
    (F.layer_norm(x, (h,), gm, bt, 1e-5) * dy).sum().backward()
    save(args.out, "layer_norm", dict(x=x, gamma=gm, dy=dy, dx=x.grad, dgamma=gm.grad, dbeta=bt.grad))

    # Attention, causal and not, ragged key lengths.
    b_, l, heads, d = 2, 6, 3, 4
    lengths = [6, 4]
    for causal in (False, True):
        q, kk, v, do = rnd(g, b_, l, heads * d), rnd(g, b_, l, heads * d), rnd(g, b_, l, heads * d), rnd(g, b_, l, heads * d)
        for i, n_ in enumerate(lengths):
            do[i, n_:] = 0  # padded query rows carry no gradient
        for t in (q, kk, v):
            t.requires_grad_(True)
        sh = lambda t: t.view(b_, l, heads, d).transpose(1, 2)
        s = sh(q) @ sh(kk).transpose(-1, -2) * 0.37
        mask = torch.zeros(b_, 1, l, l, dtype=torch.bool)
        for i, n_ in enumerate(lengths):
            mask[i, :, :, n_:] = True
        if causal:
            mask = mask | torch.triu(torch.ones(l, l, dtype=torch.bool), 1)
        p = s.masked_fill(mask, float("-inf")).softmax(-1)
        o = (p @ sh(v)).transpose(1, 2).reshape(b_, l, heads * d)
        (o * do).sum().backward()
        save(args.out, f"attention_{'causal' if causal else 'full'}",
             dict(q=q, k=kk, v=v, dout=do, dq=q.grad, dk=kk.grad, dv=v.grad))

    # Label-smoothed cross entropy (fairseq's formula), pad ignored, mean over tokens.
    n, vocab, pad = 9, 23, 1
    logits = rnd(g, n, vocab).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[3] = pad
    for eps in (0.0, 0.1):
        lp = logits.log_softmax(-1)
        keep = targets != pad
        nll = -lp.gather(1, targets[:, None])[:, 0][keep]
        smooth = -lp.sum(-1)[keep]
        eps_i = eps / (vocab - 1)
        loss = ((1 - eps - eps_i) * nll + eps_i * smooth).sum() / keep.sum()
        logits.grad = None
        loss.backward()
        save(args.out, f"cross_entropy_{eps}", dict(logits=logits, targets=targets.to(D), loss=loss[None],
                                                   nll=(nll.sum() / keep.sum())[None], dlogits=logits.grad))

    # Adam / AdamW: three steps from the same gradients, with weight decay.
    for kind in ("adam", "adamw"):
        p0 = rnd(g, 19)
        grads = [rnd(g, 19) for _ in range(3)]
        p = p0.clone().float().requires_grad_(True)
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        opt = cls([p], lr=3e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.05)
        out = {"p0": p0}
        for i, gr in enumerate(grads):
            p.grad = gr.float().clone()
            opt.step()
            out[f"g{i}"] = gr
            out[f"p{i + 1}"] = p.detach().double()
        save(args.out, f"optim_{kind}", out)

    # clip_grad_norm_.
    a, c = rnd(g, 7) * 3, rnd(g, 5) * 3
    ta, tc = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    ta.grad, tc.grad = a.clone(), c.clone()
    total = torch.nn.utils.clip_grad_norm_([ta, tc], 2.0)
    save(args.out, "clip", dict(a=a, c=c, a_clipped=ta.grad, c_clipped=tc.grad, norm=total[None]))

    # HF linear and cosine schedules, lr of updates 1..20.
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    lrs = {}
    for name, make in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.5)
        sch = make(opt, num_warmup_steps=4, num_training_steps=16)
        vals = []
        for _ in range(20):
            vals.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        lrs[name] = torch.tensor(vals, dtype=D)
    save(args.out, "schedules", lrs)


if __name__ == "__main__":
    main()
