#!/usr/bin/env python3
"""Training throughput on one GPU: lightseq (`lightseq bench --task train`, f16 with f32
master weights, AdamW) vs HF transformers with PyTorch AMP (autocast fp16 + GradScaler,
fused AdamW), eager and torch.compile, on the same shapes, dropout 0, label smoothing 0.1,
clipping at 1.0. Reports target tokens/s and peak memory; writes JSON and a markdown table.

Workloads: Transformer-base and Transformer-big (Marian layout) at batch tokens
{512, 4096, 15000} as rows of 32 source and 32 target tokens; BERT-base masked LM at batch
{8, 32, 128} x seq 128 with 1 position in 7 predicted (tokens/s counts every input token).

Usage (GPU machine, repository root):
  python3 scripts/bench/run_train_bench.py --bin .device/lightseq --out DIR [--only base,big,bert]
      [--modes eager,compile]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import transformers as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

SEQ = 32
TOKENS = [512, 4096, 15000]
BERT_BATCH = [8, 32, 128]


def preset(name):
    out = subprocess.run([ARGS.bin, "info", "--preset", name], capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout)
    raise SystemExit(f"lightseq info --preset {name} failed: {out.stderr}")


def ours(args):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ls-train-bench.json")
    cmd = [ARGS.bin, "bench", "--device", "cuda", "--dtype", "f16", "--task", "train", "--json", path] + args
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout + r.stderr, end="", flush=True)
    if r.returncode != 0:
        return {}
    return {(p["batch"], p["seq"]): p for p in json.load(open(path))}


def timed(step, warmup, iters):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


def hf_trainer(model, compile_):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=0.01, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    fwd = torch.compile(model) if compile_ else model

    def step(batch, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logits = fwd(**batch).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                   ignore_index=-100, label_smoothing=0.1)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return step


def rows_for(tokens):
    return max(1, round(tokens / SEQ))


def transformer(rows, name, preset_name):
    batches = [rows_for(t) for t in TOKENS]
    mine = ours(["--preset", preset_name, "--batch", ",".join(map(str, batches)), "--seq", str(SEQ),
                 "--iters", "10", "--warmup", "3"])
    cfg = tf.MarianConfig(**{k: v for k, v in preset(preset_name).items() if k != "model_type"},
                          dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    for mode in ARGS.modes:
        torch.manual_seed(0)
        model = tf.MarianMTModel(cfg).cuda().train()
        step = hf_trainer(model, mode == "compile")
        for b in batches:
            g = torch.Generator().manual_seed(b)
            src = torch.randint(5, cfg.vocab_size - 5, (b, SEQ), generator=g).cuda()
            tgt = src.flip(1)
            dec = torch.cat([torch.full((b, 1), cfg.decoder_start_token_id, device="cuda"), tgt[:, :-1]], 1)
            batch = dict(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=dec)
            t, mem = timed(lambda: step(batch, tgt), 3 if mode == "eager" else 5, 10)
            add(rows, f"{name} train", b, SEQ, b * SEQ, mode, t, mem, mine.get((b, SEQ)))
        del model, step
        torch.cuda.empty_cache()


def bert(rows):
    mine = ours(["--preset", "bert-base", "--batch", ",".join(map(str, BERT_BATCH)), "--seq", "128",
                 "--iters", "10", "--warmup", "3"])
    cfg = tf.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for mode in ARGS.modes:
        torch.manual_seed(0)
        model = tf.BertForMaskedLM(cfg).cuda().train()
        step = hf_trainer(model, mode == "compile")
        for b in BERT_BATCH:
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(5, cfg.vocab_size - 5, (b, 128), generator=g).cuda()
            pos = torch.arange(128, device="cuda")[None, :] + torch.arange(b, device="cuda")[:, None]
            labels = torch.where(pos % 7 == 0, ids, torch.full_like(ids, -100))
            batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            t, mem = timed(lambda: step(batch, labels), 3 if mode == "eager" else 5, 10)
            add(rows, "BERT-base MLM train", b, 128, b * 128, mode, t, mem, mine.get((b, 128)))
        del model, step
        torch.cuda.empty_cache()


def add(rows, workload, batch, seq, tokens, mode, t, mem, m):
    key = (workload, batch, seq)
    r = next((r for r in rows if (r["workload"], r["batch"], r["seq"]) == key), None)
    if r is None:
        r = dict(workload=workload, batch=batch, seq=seq, tokens=tokens,
                 ours_tok_s=m and m["tokens_per_s"], ours_mem=m and m["peak_mem_mb"])
        rows.append(r)
    r[f"hf_{mode}_tok_s"] = tokens / t
    r[f"hf_{mode}_mem"] = mem
    print(r, flush=True)


def table(rows):
    out = ["| workload | batch x seq | tokens | ours tok/s | HF eager tok/s | x eager | HF compile tok/s"
           " | x compile | peak MiB ours / eager / compile |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
    for r in rows:
        o, e, c = r.get("ours_tok_s"), r.get("hf_eager_tok_s"), r.get("hf_compile_tok_s")
        ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}x"  # noqa: E731
        out.append(f"| {r['workload']} | {r['batch']} x {r['seq']} | {r['tokens']} | {f(o)} | {f(e)} | "
                   f"{ratio(o, e)} | {f(c)} | {ratio(o, c)} | {f(r.get('ours_mem'))} / "
                   f"{f(r.get('hf_eager_mem'))} / {f(r.get('hf_compile_mem'))} |")
    return "\n".join(out)


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".device/lightseq")
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", default="base,big,bert")
    ap.add_argument("--modes", default="eager,compile")
    ARGS = ap.parse_args()
    ARGS.modes = ARGS.modes.split(",")
    only = ARGS.only.split(",")
    rows = []
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=tf.__version__,
               date=time.strftime("%Y-%m-%d"))
    print(env, flush=True)
    os.makedirs(ARGS.out, exist_ok=True)

    def dump():
        # Written after every workload, so a run cut short keeps what it measured.
        with open(os.path.join(ARGS.out, "train_bench.json"), "w") as fh:
            json.dump(dict(env=env, rows=rows), fh, indent=1)
        with open(os.path.join(ARGS.out, "train_bench.md"), "w") as fh:
            fh.write(table(rows) + "\n")

    if "base" in only:
        transformer(rows, "Transformer-base", "transformer-base")
        dump()
    if "bert" in only:
        bert(rows)
        dump()
    if "big" in only:
        transformer(rows, "Transformer-big", "transformer-big")
        dump()
    print(table(rows))


if __name__ == "__main__":
    main()
