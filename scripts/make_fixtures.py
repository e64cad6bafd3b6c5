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


def reference(model, kind, input_ids, token_type_ids=None, dtype=torch.float64, device="cpu",
              decoder_input_ids=None, pixel_values=None, extra=None):
    """Runs each sequence alone; returns [batch, max_len, width] padded with zeros.

    `kind` is "hidden" (last hidden state) or "logits". For encoder-decoders the output
    length is the decoder's; for images every row has the same length.
    """
    model = model.to(device=device, dtype=dtype).eval()
    # Some HF models build mask constants in the default dtype (XGLM: torch.full with
    # finfo(dtype).min); make the default match the run's dtype.
    saved_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    try:
        return _reference(model, kind, input_ids, token_type_ids, device, decoder_input_ids,
                          pixel_values, extra)
    finally:
        torch.set_default_dtype(saved_default)


def _reference(model, kind, input_ids, token_type_ids, device, decoder_input_ids, pixel_values,
               extra):
    dtype = next(model.parameters()).dtype
    n = len(pixel_values) if pixel_values is not None else len(input_ids)
    outs = []
    with torch.no_grad():
        for i in range(n):
            kw = dict(extra or {})
            if pixel_values is not None:
                kw["pixel_values"] = pixel_values[i : i + 1].to(device=device, dtype=dtype)
            else:
                if len(input_ids[i]) == 0:
                    outs.append(None)
                    continue
                kw["input_ids"] = torch.tensor([input_ids[i]], device=device)
            if token_type_ids is not None:
                kw["token_type_ids"] = torch.tensor([token_type_ids[i]], device=device)
            if decoder_input_ids is not None:
                kw["decoder_input_ids"] = torch.tensor([decoder_input_ids[i]], device=device)
            o = model(**kw, output_hidden_states=(kind == "hidden"))
            if kind == "logits":
                outs.append(o.logits[0])
            else:
                outs.append(o.last_hidden_state[0] if getattr(o, "last_hidden_state", None) is not None
                            else o.hidden_states[-1][0])
    width = next(o.shape[-1] for o in outs if o is not None)
    max_len = max((o.shape[0] for o in outs if o is not None), default=0)
    out = torch.zeros(n, max_len, width, dtype=torch.float64)
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


def save_fixture(out_dir, model, kind, input_ids, token_type_ids=None, shard=None,
                 decoder_input_ids=None, pixel_values=None, extra=None):
    """Saves model (f32) + input + float64 reference under out_dir."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    model = model.float()
    kw = {"safe_serialization": True}
    if shard:
        kw["max_shard_size"] = shard
    model.save_pretrained(out_dir, **kw)
    if pixel_values is not None:
        save_file({"pixel_values": pixel_values.float().contiguous()},
                  os.path.join(out_dir, "input.safetensors"))
    else:
        inp = {"input_ids": input_ids}
        if token_type_ids is not None:
            inp["token_type_ids"] = token_type_ids
        if decoder_input_ids is not None:
            inp["decoder_input_ids"] = decoder_input_ids
        with open(os.path.join(out_dir, "input.json"), "w") as f:
            json.dump(inp, f)
    # Reference from the weights as saved (f32), computed in float64.
    ref_model = type(model).from_pretrained(out_dir).double()
    ref = reference(ref_model, kind, input_ids, token_type_ids, decoder_input_ids=decoder_input_ids,
                    pixel_values=pixel_values, extra=extra)
    save_file({kind: ref.float().contiguous()}, os.path.join(out_dir, "reference.safetensors"))
    # Keep only what the loader reads.
    for name in os.listdir(out_dir):
        if name == "generation_config.json":
            os.remove(os.path.join(out_dir, name))


def seq2seq_fixtures(out):
    from transformers import (BartConfig, BartForConditionalGeneration, FSMTConfig,
                              FSMTForConditionalGeneration, M2M100Config,
                              M2M100ForConditionalGeneration, MarianConfig, MarianMTModel,
                              MBartConfig, MBartForConditionalGeneration)
    common = dict(d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=29,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0)
    src_len, dec_len = [7, 12, 3], [5, 9, 1]

    def ids(seed, vocab, lengths, avoid=()):
        rows = ragged_ids(seed, vocab, lengths)
        return [[t if t not in avoid else (t + 1) % vocab for t in r] for r in rows]

    cases = [
        ("marian", MarianMTModel(MarianConfig(vocab_size=89, pad_token_id=88, decoder_start_token_id=88,
                                              activation_function="swish", scale_embedding=True, **common)), 89, 89),
        ("marian_split_vocab", MarianMTModel(MarianConfig(
            vocab_size=89, decoder_vocab_size=77, share_encoder_decoder_embeddings=False, pad_token_id=76,
            decoder_start_token_id=76, activation_function="relu", **common)), 89, 77),
        ("bart", BartForConditionalGeneration(BartConfig(vocab_size=91, activation_function="gelu", **common)), 91, 91),
        ("mbart", MBartForConditionalGeneration(MBartConfig(vocab_size=93, scale_embedding=True,
                                                            activation_function="gelu_new", **common)), 93, 93),
        ("m2m100", M2M100ForConditionalGeneration(M2M100Config(vocab_size=97, scale_embedding=True,
                                                               activation_function="relu", **common)), 97, 97),
    ]
    for k, (name, model, sv, tv) in enumerate(cases):
        randomize(model, 20 + k)
        if hasattr(model, "final_logits_bias"):
            with torch.no_grad():
                model.final_logits_bias.copy_(0.1 * torch.randn(model.final_logits_bias.shape,
                                                                generator=torch.Generator().manual_seed(k)))
        save_fixture(os.path.join(out, name), model, "logits", ids(30 + k, sv, src_len),
                     decoder_input_ids=ids(40 + k, tv, dec_len))
    # FSMT: separate vocabularies, untied head. HF builds its causal mask only with
    # use_cache=False, and then also masks decoder keys equal to pad, so inputs avoid pad.
    fsmt_cfg = {k: v for k, v in common.items() if k not in ("encoder_ffn_dim", "decoder_ffn_dim")}
    model = FSMTForConditionalGeneration(FSMTConfig(
        langs=["en", "de"], src_vocab_size=83, tgt_vocab_size=79, encoder_ffn_dim=37, decoder_ffn_dim=37,
        activation_function="relu", scale_embedding=True, tie_word_embeddings=False, **fsmt_cfg))
    randomize(model, 29)
    # HF's FSMT fills its causal mask with finfo(dtype).min through a float32 tensor, which
    # overflows for float64; fill in the tensor's own dtype instead (same mask).
    import transformers.models.fsmt.modeling_fsmt as fsmt_mod
    fsmt_mod.fill_with_neg_inf = lambda t: t.fill_(torch.finfo(t.dtype).min)
    save_fixture(os.path.join(out, "fsmt"), model, "logits", ids(38, 83, src_len, avoid=(1,)),
                 decoder_input_ids=ids(48, 79, dec_len, avoid=(1,)), extra={"use_cache": False})


def other_fixtures(out):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MT5Config, MT5ForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                              T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel, XGLMConfig,
                              XGLMForCausalLM)
    src_len, dec_len = [7, 12, 3], [5, 9, 1]
    t5_common = dict(vocab_size=87, d_model=32, d_kv=12, d_ff=37, num_layers=2, num_decoder_layers=3,
                     num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     dropout_rate=0.0)
    cases = [
        ("t5", T5ForConditionalGeneration(T5Config(feed_forward_proj="relu", **t5_common))),
        ("t5_v1_1", T5ForConditionalGeneration(T5Config(feed_forward_proj="gated-gelu",
                                                        tie_word_embeddings=False, **t5_common))),
        ("mt5", MT5ForConditionalGeneration(MT5Config(feed_forward_proj="gated-gelu", **t5_common))),
    ]
    for k, (name, model) in enumerate(cases):
        randomize(model, 60 + k)
        save_fixture(os.path.join(out, name), model, "logits", ragged_ids(70 + k, 87, [7, 25, 3]),
                     decoder_input_ids=ragged_ids(80 + k, 87, [5, 23, 1]))

    m = randomize(XGLMForCausalLM(XGLMConfig(vocab_size=95, d_model=32, ffn_dim=37, num_layers=2,
                                             attention_heads=4, max_position_embeddings=40,
                                             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)), 64)
    save_fixture(os.path.join(out, "xglm"), m, "logits", ragged_ids(74, 95, [9, 14, 2]))

    llama_common = dict(vocab_size=103, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    m = randomize(LlamaForCausalLM(LlamaConfig(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        attention_bias=True, **llama_common)), 65)
    save_fixture(os.path.join(out, "llama"), m, "logits", ragged_ids(75, 103, [9, 14, 2]))
    m = randomize(MistralForCausalLM(MistralConfig(sliding_window=4, head_dim=10, **llama_common)), 66)
    save_fixture(os.path.join(out, "mistral"), m, "logits", ragged_ids(76, 103, [9, 14, 2]))
    m = randomize(Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                               tie_word_embeddings=True, **llama_common)), 67)
    save_fixture(os.path.join(out, "qwen2"), m, "logits", ragged_ids(77, 103, [9, 14, 2]))

    m = randomize(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, image_size=12, patch_size=4, num_channels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), 68)
    px = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(78))
    save_fixture(os.path.join(out, "vit"), m, "hidden", None, pixel_values=px)


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

    seq2seq_fixtures(args.out)
    other_fixtures(args.out)


if __name__ == "__main__":
    main()
