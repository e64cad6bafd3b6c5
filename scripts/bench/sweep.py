#!/usr/bin/env python3
"""Off-grid benchmark on one GPU: lightseq against HF transformers fp16 eager on model sizes
and shapes the grid of run_bench.py does not hold (BERT-large, odd lengths, forwards past
the graph limit, GPT2-medium, BART-large, T5, Llama, beam widths other than 4), to find
shapes where the speedup falls off. Each model is HF's own seeded initialization, saved
with save_pretrained and read by `lightseq bench DIR`; generation lengths are fixed (min =
max new tokens) on both sides.

Usage (GPU machine, repository root):
  python3 scripts/bench/sweep.py --bin .device/lightseq --out DIR [--only bert,gpt2,...]
"""
import os
import sys
import tempfile

import torch
import transformers as tf

sys.path.insert(0, os.path.dirname(__file__))
from run_bench import DT, cells, cuda_time, ids, ours, parse_args, write  # noqa: E402


def saved(tmp, name, make):
    """HF's seeded model from `make`, saved under tmp/name: (directory, model on the GPU in
    fp16)."""
    torch.manual_seed(0)
    model = make()
    d = os.path.join(tmp, name)
    model.save_pretrained(d)
    return d, model.to("cuda", DT).eval()


def forwards(binary, tmp, name, make, shapes, rows):
    d, model = saved(tmp, name, make)
    vocab = model.config.vocab_size
    for b, s in shapes:
        mine = ours(binary, [d, "--task", "forward", "--batch", str(b), "--seq", str(s), "--iters", "30",
                                "--warmup", "5"]).get((b, s), {})
        x = ids(b, s, vocab)
        with torch.no_grad():
            eager, mem = cuda_time(lambda: model(input_ids=x), 5, 30)
        rows.append(dict(workload=f"{name} forward", batch=b, seq=s, new=0, hf_eager_ms=eager,
                         ours_ms=mine.get("median_ms"), hf_mem=mem, ours_mem=mine.get("peak_mem_mb")))
        print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache()


def generations(binary, tmp, name, make, cases, rows):
    """cases: (batch, prompt, new tokens, beams, top_k or None)."""
    d, model = saved(tmp, name, make)
    cfg = model.config
    vocab = cfg.vocab_size
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    for b, s, new, beams, top_k in cases:
        args = [d, "--task", "generate", "--batch", str(b), "--seq", str(s), "--max-new-tokens", str(new),
                "--num-beams", str(beams), "--iters", "3", "--warmup", "1"]
        kw = dict(num_beams=beams, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
        if top_k:
            args += ["--do-sample", "true", "--top-k", str(top_k)]
            kw.update(do_sample=True, top_k=top_k)
        else:
            kw.update(do_sample=False)
        mine = ours(binary, args).get((b, s), {})
        x = ids(b, s, vocab)
        with torch.no_grad():
            eager, mem = cuda_time(lambda: model.generate(x, attention_mask=torch.ones_like(x), **kw), 1, 3)
        how = f"top-k {top_k}" if top_k else (f"beam {beams}" if beams > 1 else "greedy")
        rows.append(dict(workload=f"{name} {how}", batch=b, seq=s, new=new, hf_eager_ms=eager,
                         ours_ms=mine.get("median_ms"), hf_mem=mem, ours_mem=mine.get("peak_mem_mb")))
        print(rows[-1], flush=True)
    del model
    torch.cuda.empty_cache()


def table(rows):
    out = ["| workload | batch | len | new | HF eager ms | lightseq ms | x eager | peak MiB HF / ours |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        om, xe, mem = cells(r)
        out.append(f"| {r['workload']} | {r['batch']} | {r['seq']} | {r['new']} | {r['hf_eager_ms']:.2f} | {om} "
                   f"| {xe} | {mem} |")
    return "\n".join(out)


def main():
    args, only = parse_args("bert,bert-large,gpt2,gpt2-medium,bart-large,marian,t5,llama")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "bert" in only:
            forwards(args.bin, tmp, "bert-base", lambda: tf.BertModel(tf.BertConfig()),
                     [(3, 100), (16, 64), (2, 512), (128, 32), (64, 128)], rows)
        if "bert-large" in only:
            forwards(args.bin, tmp, "bert-large", lambda: tf.BertModel(tf.BertConfig(
                hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
                [(1, 128), (8, 128), (32, 128)], rows)
        if "gpt2" in only:
            generations(args.bin, tmp, "gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config()),
                        [(16, 100, 50, 1, None), (4, 64, 64, 1, 50)], rows)
        if "gpt2-medium" in only:
            generations(args.bin, tmp, "gpt2-medium", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
                n_embd=1024, n_layer=24, n_head=16)), [(4, 64, 64, 1, 50)], rows)
        if "bart-large" in only:
            generations(args.bin, tmp, "bart-large", lambda: tf.BartForConditionalGeneration(tf.BartConfig(
                d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, forced_eos_token_id=2)),
                [(4, 48, 48, 4, None)], rows)
        if "marian" in only:
            generations(args.bin, tmp, "marian-base", lambda: tf.MarianMTModel(tf.MarianConfig(
                vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
                scale_embedding=True, max_position_embeddings=512, pad_token_id=31999,
                decoder_start_token_id=31999, eos_token_id=0)), [(2, 20, 20, 5, None), (16, 50, 50, 2, None)], rows)
        if "t5" in only:
            generations(args.bin, tmp, "t5-small", lambda: tf.T5ForConditionalGeneration(tf.T5Config(
                vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                feed_forward_proj="relu", decoder_start_token_id=0)), [(8, 32, 32, 4, None)], rows)
        if "llama" in only:
            generations(args.bin, tmp, "llama-small", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
                vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2)), [(8, 64, 64, 1, None)], rows)
    write(args.out, "sweep", rows, table(rows))


if __name__ == "__main__":
    main()
