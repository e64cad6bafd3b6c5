#!/usr/bin/env python3
"""Side-by-side benchmark on one GPU: lightseq vs HF transformers fp16 (eager, and
torch.compile for BERT), same shapes, same work (generation lengths fixed: min = max new
tokens), medians and peak memory. Writes a markdown table and JSON.

Usage (GPU machine, repository root): python3 scripts/bench/run_bench.py --bin .device/lightseq --out DIR
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import transformers as tf

DT = torch.float16


def cuda_time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


def ids(batch, seq, vocab):
    g = torch.Generator().manual_seed(batch * 1000 + seq)
    return torch.randint(5, vocab - 5, (batch, seq), generator=g).cuda()


def ours(binary, args):
    with_json = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ls-bench.json")
    cmd = [binary, "bench", "--device", "cuda", "--dtype", "f16", "--json", with_json] + args
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print("lightseq bench failed:", r.stderr, file=sys.stderr)
        return {}
    print(r.stdout, end="", flush=True)
    return {(p["batch"], p["seq"]): p for p in json.load(open(with_json))}


def bert(binary, rows):
    batches, seqs = [1, 8, 32], [8, 32, 128]
    mine = ours(binary, ["--preset", "bert-base", "--task", "forward", "--batch", "1,8,32",
                         "--seq", "8,32,128", "--iters", "30", "--warmup", "5"])
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig()).to("cuda", DT).eval()
    compiled = torch.compile(model, dynamic=True)
    for b in batches:
        for s in seqs:
            x = ids(b, s, 30522)
            with torch.no_grad():
                eager, eager_mem = cuda_time(lambda: model(input_ids=x), 5, 30)
                comp, comp_mem = cuda_time(lambda: compiled(input_ids=x), 3, 30)
            m = mine.get((b, s), {})
            rows.append(dict(workload="BERT-base forward", batch=b, seq=s, hf_eager_ms=eager,
                             hf_compile_ms=comp, ours_ms=m.get("median_ms"), hf_mem=eager_mem,
                             hf_compile_mem=comp_mem, ours_mem=m.get("peak_mem_mb")))
            print(rows[-1], flush=True)
    del model, compiled
    torch.cuda.empty_cache()


def seq2seq(binary, rows, name, preset, make, batches, seqs, beams=4):
    mine = ours(binary, ["--preset", preset, "--task", "generate", "--batch", ",".join(map(str, batches)),
                         "--seq", ",".join(map(str, seqs)), "--new-tokens-like-seq", "--num-beams", str(beams),
                         "--iters", "3", "--warmup", "1"])
    torch.manual_seed(0)
    model = make().to("cuda", DT).eval()
    for b in batches:
        for s in seqs:
            x = ids(b, s, model.config.vocab_size)
            fn = lambda: model.generate(x, attention_mask=torch.ones_like(x), num_beams=beams, max_new_tokens=s,
                                        min_new_tokens=s, do_sample=False)
            with torch.no_grad():
                eager, mem = cuda_time(fn, 1, 3)
            m = mine.get((b, s), {})
            rows.append(dict(workload=f"{name} beam {beams}", batch=b, seq=s, hf_eager_ms=eager,
                             hf_compile_ms=None, ours_ms=m.get("median_ms"), hf_mem=mem, hf_compile_mem=None,
                             ours_mem=m.get("peak_mem_mb")))
            print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache()


def gpt2(binary, rows):
    batches = [1, 8, 32]
    mine = ours(binary, ["--preset", "gpt2", "--task", "generate", "--batch", "1,8,32", "--seq", "32",
                         "--max-new-tokens", "32", "--do-sample", "true", "--top-k", "50", "--iters", "5",
                         "--warmup", "1"])
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config()).to("cuda", DT).eval()
    for b in batches:
        x = ids(b, 32, 50257)
        fn = lambda: model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
                                    max_new_tokens=32, min_new_tokens=32, pad_token_id=50256)
        with torch.no_grad():
            eager, mem = cuda_time(fn, 1, 5)
        m = mine.get((b, 32), {})
        rows.append(dict(workload="GPT2 top-k sampling", batch=b, seq=32, hf_eager_ms=eager, hf_compile_ms=None,
                         ours_ms=m.get("median_ms"), hf_mem=mem, hf_compile_mem=None, ours_mem=m.get("peak_mem_mb")))
        print(rows[-1], flush=True)


def cells(r):
    """A row's cells shared by this table and sweep.py's: our time, the speedup over HF
    eager, and the peak memory of HF and ours."""
    o = r["ours_ms"]
    om = f"{o:.2f}" if o else "failed"
    xe = f"{r['hf_eager_ms'] / o:.1f}" if o else "-"
    ours_mem = f"{r['ours_mem']:.0f}" if r.get("ours_mem") is not None else "-"
    return om, xe, f"{r['hf_mem']:.0f} / {ours_mem}"


def table(rows):
    out = ["| workload | batch | len | HF eager ms | HF compile ms | lightseq ms | x eager | x compile | peak MiB HF / ours |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["ours_ms"]
        om, xe, mem = cells(r)
        xc = f"{r['hf_compile_ms'] / o:.1f}" if (o and r["hf_compile_ms"]) else "-"
        hc = f"{r['hf_compile_ms']:.2f}" if r["hf_compile_ms"] else "-"
        out.append(f"| {r['workload']} | {r['batch']} | {r['seq']} | {r['hf_eager_ms']:.2f} | {hc} | {om} | {xe} | {xc} | {mem} |")
    return "\n".join(out)


def parse_args(workloads):
    """--bin, --out and --only (a comma list, `workloads` by default), shared with sweep.py:
    the arguments and the set of workloads to run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".device/lightseq")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--only", default=workloads)
    args = ap.parse_args()
    return args, set(args.only.split(","))


def main():
    args, only = parse_args("bert,transformer,gpt2,bart,big")
    rows = []
    if "bert" in only:
        bert(args.bin, rows)
    if "transformer" in only:
        seq2seq(args.bin, rows, "Transformer-base", "transformer-base",
                lambda: tf.MarianMTModel(tf.MarianConfig(
                    vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="relu",
                    scale_embedding=True, max_position_embeddings=1024, pad_token_id=31999,
                    decoder_start_token_id=31999, eos_token_id=0)), [1, 8, 32], [8, 32, 128])
    if "gpt2" in only:
        gpt2(args.bin, rows)
    if "bart" in only:
        seq2seq(args.bin, rows, "BART-base", "bart-base",
                lambda: tf.BartForConditionalGeneration(tf.BartConfig(
                    vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                    activation_function="gelu", max_position_embeddings=1024, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)), [1, 8, 32], [32])
    if "big" in only:
        seq2seq(args.bin, rows, "Transformer-big", "transformer-big",
                lambda: tf.MarianMTModel(tf.MarianConfig(
                    vocab_size=32000, d_model=1024, encoder_layers=6, decoder_layers=6, encoder_attention_heads=16,
                    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, activation_function="relu",
                    scale_embedding=True, max_position_embeddings=1024, pad_token_id=31999,
                    decoder_start_token_id=31999, eos_token_id=0)), [1, 32], [32])
    write(args.out, "bench", rows, table(rows))


def write(out, stem, rows, md_table):
    """Prints the table under a line naming the GPU and versions, and writes it to
    out/stem.md and the rows to out/stem.json."""
    head = (f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {tf.__version__}; "
            f"fp16; medians; date {time.strftime('%Y-%m-%d')}")
    md = head + "\n\n" + md_table + "\n"
    print(md)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
