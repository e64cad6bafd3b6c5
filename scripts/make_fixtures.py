#!/usr/bin/env python3
"""Builds tiny seeded Hugging Face models and their float64 reference outputs.

Each fixture is a model directory written by HF `save_pretrained` (config.json +
safetensors) plus:
  input.json             {"input_ids": [[...], ...], optional "token_type_ids"}
  reference.safetensors  `hidden` or `logits` [batch, max_len, width] (f32 values of a
                         float64 run), each sequence run alone, zero past its length.

Usage: python3 scripts/make_fixtures.py [--out tests/fixtures]
The helpers here are also used by scripts/gpu_parity.py.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file


def randomize(model, seed, scale=0.1):
    """Replaces HF's small init with larger random weights so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name.endswith("LayerNorm.weight") or ".ln_" in name and name.endswith("weight") \
                    or name.endswith("ln_f.weight"):
                p.copy_(1.0 + scale * r)
            else:
                p.copy_(scale * r)
    return model


def ragged_ids(seed, vocab, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(model, kind, input_ids, token_type_ids=None, dtype=torch.float64, device="cpu"):
    """Runs each sequence alone; returns [batch, max_len, width] padded with zeros."""
    model = model.to(device=device, dtype=dtype).eval()
    outs = []
    with torch.no_grad():
        for i, ids in enumerate(input_ids):
            if len(ids) == 0:
                outs.append(None)
                continue
            kw = {"input_ids": torch.tensor([ids], device=device)}
            if token_type_ids is not None:
                kw["token_type_ids"] = torch.tensor([token_type_ids[i]], device=device)
            o = model(**kw, output_hidden_states=(kind == "hidden"))
            if kind == "logits":
                outs.append(o.logits[0])
            else:
                outs.append(o.last_hidden_state[0] if hasattr(o, "last_hidden_state")
                            else o.hidden_states[-1][0])
    width = next(o.shape[-1] for o in outs if o is not None)
    max_len = max((len(x) for x in input_ids), default=0)
    out = torch.zeros(len(input_ids), max_len, width, dtype=torch.float64)
    for i, o in enumerate(outs):
        if o is not None:
            out[i, : o.shape[0]] = o.double().cpu()
    return out


def bert_config(**kw):
    from transformers import BertConfig
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=64, type_vocab_size=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base.update(kw)
    return BertConfig(**base)


def gpt2_config(**kw):
    from transformers import GPT2Config
    base = dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base.update(kw)
    return GPT2Config(**base)


def save_fixture(out_dir, model, kind, input_ids, token_type_ids=None, shard=None):
    """Saves model (f32) + input + float64 reference under out_dir."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    model = model.float()
    kw = {"safe_serialization": True}
    if shard:
        kw["max_shard_size"] = shard
    model.save_pretrained(out_dir, **kw)
    inp = {"input_ids": input_ids}
    if token_type_ids is not None:
        inp["token_type_ids"] = token_type_ids
    with open(os.path.join(out_dir, "input.json"), "w") as f:
        json.dump(inp, f)
    # Reference from the weights as saved (f32), computed in float64.
    ref_model = type(model).from_pretrained(out_dir).double()
    ref = reference(ref_model, kind, input_ids, token_type_ids)
    save_file({kind: ref.float().contiguous()}, os.path.join(out_dir, "reference.safetensors"))
    # Keep only what the loader reads.
    for name in os.listdir(out_dir):
        if name == "generation_config.json":
            os.remove(os.path.join(out_dir, name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    args = ap.parse_args()
    from transformers import (BertForMaskedLM, BertForSequenceClassification, BertModel,
                              GPT2LMHeadModel, GPT2Model)
    torch.manual_seed(0)
    lengths = [7, 13, 1, 10]

    m = randomize(BertModel(bert_config(), add_pooling_layer=True), 1)
    save_fixture(os.path.join(args.out, "bert"), m, "hidden", ragged_ids(11, 99, lengths))

    m = randomize(BertForMaskedLM(bert_config(hidden_act="gelu_new", num_hidden_layers=3)), 2)
    ids = ragged_ids(12, 99, [5, 16, 9])
    save_fixture(os.path.join(args.out, "bert_mlm_sharded"), m, "hidden", ids, shard="40KB")

    m = randomize(BertForSequenceClassification(bert_config(hidden_act="relu", num_labels=3)), 3)
    ids = ragged_ids(13, 99, [6, 3, 11])
    types = [[(j * 7 + i) % 3 for j in range(len(s))] for i, s in enumerate(ids)]
    save_fixture(os.path.join(args.out, "bert_cls_types"), m, "hidden", ids, types)

    m = randomize(GPT2LMHeadModel(gpt2_config()), 4)
    save_fixture(os.path.join(args.out, "gpt2"), m, "logits", ragged_ids(14, 101, lengths))

    m = randomize(GPT2Model(gpt2_config(activation_function="gelu", n_inner=45,
                                         scale_attn_by_inverse_layer_idx=True)), 5)
    base = os.path.join(args.out, "gpt2_base_model")
    ids = ragged_ids(15, 101, [9, 2, 17])
    # GPT2Model has no LM head: its reference logits come from the LM-head model that shares
    # its weights (the head is tied to wte).
    save_fixture(base, m, "hidden", ids)
    lm = GPT2LMHeadModel.from_pretrained(base).double()
    ref = reference(lm, "logits", ids)
    os.remove(os.path.join(base, "reference.safetensors"))
    save_file({"logits": ref.float().contiguous()}, os.path.join(base, "reference.safetensors"))


if __name__ == "__main__":
    main()
