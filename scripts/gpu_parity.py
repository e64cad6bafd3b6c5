#!/usr/bin/env python3
"""`lightseq forward` against HF PyTorch on the same GPU at real model sizes.

Builds each model with HF's own seeded initialization, saves it with save_pretrained, runs
a ragged batch through `lightseq forward` in f32, f16 and bf16, and compares over real
positions: f32 with HF float64, f16/bf16 with HF float32.
Usage: python3 scripts/gpu_parity.py [--bin .device/lightseq] [--only NAME,...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import ragged_ids, reference  # noqa: E402

LIMITS = {"f32": ("float64", 1e-4), "f16": ("float32", 1e-2), "bf16": ("float32", 3e-2)}


def models():
    """(name, constructor, output kind, vocab or None, source lengths, decoder lengths)."""
    import transformers as tf
    yield "bert-base", lambda: tf.BertModel(tf.BertConfig()), "hidden", 30522, [128, 77, 5, 100], None
    yield "gpt2", lambda: tf.GPT2LMHeadModel(tf.GPT2Config()), "logits", 50257, [128, 77, 5, 100], None
    yield "marian-base", lambda: tf.MarianMTModel(tf.MarianConfig(
        vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
        activation_function="swish", scale_embedding=True, pad_token_id=31999,
        decoder_start_token_id=31999)), "logits", 32000, [64, 33, 7], [48, 20, 9]
    yield "bart-base", lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)), "logits", 50265, [64, 33, 7], [48, 20, 9]
    yield "t5-small", lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
        feed_forward_proj="relu")), "logits", 32128, [64, 33, 7], [48, 20, 9]
    yield "mt5-small", lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(
        vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False)), "logits", 250112, [40, 21, 7], [24, 11, 5]
    yield "vit-base", lambda: tf.ViTModel(tf.ViTConfig()), "hidden", None, None, None
    yield "xglm-564M", lambda: tf.XGLMForCausalLM(tf.XGLMConfig(
        vocab_size=256008, d_model=1024, ffn_dim=4096, num_layers=24, attention_heads=16)), "logits", 256008, [40, 21, 7], None
    yield "llama-small", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2)), "logits", 32000, [128, 77, 5], None
    # Wider models (heads of 64 over 16 heads, d = 1024, FFN 4096) and longer inputs, whose
    # GEMM, attention and layer-norm launches differ from the base models'.
    yield "bert-large", lambda: tf.BertModel(tf.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)), "hidden", \
        30522, [300, 129, 17, 64], None
    yield "gpt2-medium", lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16)), "logits", \
        50257, [200, 33, 5], None
    yield "bart-large", lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=4096, decoder_ffn_dim=4096)), "logits", 50265, [96, 33, 7], [64, 20, 9]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=".device/lightseq")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed, (name, make, kind, vocab, src, dec) in enumerate(models()):
            if only and name not in only:
                continue
            torch.manual_seed(seed)
            model = make()
            d = os.path.join(tmp, name)
            model.save_pretrained(d)
            kw = {}
            if vocab is None:  # images
                g = torch.Generator().manual_seed(seed)
                px = torch.randn(3, 3, 224, 224, generator=g)
                inp = os.path.join(d, "input.safetensors")
                save_file({"pixel_values": px}, inp)
                kw["pixel_values"] = px
                n, ids = 3, None
            else:
                ids = ragged_ids(7, vocab, src)
                j = {"input_ids": ids}
                if dec is not None:
                    j["decoder_input_ids"] = kw["decoder_input_ids"] = ragged_ids(8, vocab, dec)
                inp = os.path.join(d, "input.json")
                with open(inp, "w") as f:
                    json.dump(j, f)
                n = len(ids)
            refs = {p: reference(model, kind, ids, dtype=getattr(torch, p), device="cuda", **kw)
                    for p in ("float64", "float32")}
            model.to("cpu")
            torch.cuda.empty_cache()
            lens = [len(x) for x in (kw.get("decoder_input_ids") or ids)] if ids is not None \
                else [refs["float32"].shape[1]] * n
            mask = torch.zeros(refs["float32"].shape[:2], dtype=torch.bool)
            for i, m in enumerate(lens):
                mask[i, :m] = True
            for dt, (ref_name, limit) in LIMITS.items():
                out = os.path.join(tmp, f"{name}-{dt}.safetensors")
                r = subprocess.run([args.bin, "forward", d, "--input", inp, "--out", out,
                                    "--device", "cuda", "--dtype", dt], capture_output=True, text=True)
                if r.returncode != 0:
                    rows.append((name, dt, ref_name, float("nan"), limit, "ERROR " + r.stderr.strip()[-300:]))
                    failed += 1
                    continue
                got = load_file(out)[kind].double()
                ref = refs[ref_name]
                err = ((got - ref)[mask].norm() / ref[mask].norm()).item()
                ok = err <= limit
                failed += not ok
                rows.append((name, dt, ref_name, err, limit, "ok" if ok else "MISMATCH"))
                os.remove(out)
            print(f"done {name}", flush=True)
    print(f"{'model':<12} {'dtype':<5} {'HF ref':<8} {'rel err':>10} {'limit':>7}")
    for n, dt, rn, e, lim, st in rows:
        print(f"{n:<12} {dt:<5} {rn:<8} {e:>10.2e} {lim:>7.0e}  {st}")
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
