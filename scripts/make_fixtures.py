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
                 decoder_input_ids=None, pixel_values=None, extra=None, half=False):
    """Saves model (f32, or f16 with `half` to keep the folder small: f16 values are exact
    in f32 and f64) + input + float64 reference of the weights as saved, under out_dir."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    model = model.half() if half else model.float()
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
    ref_model = type(model).from_pretrained(out_dir, dtype=torch.float32).double()
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
                     decoder_input_ids=ids(40 + k, tv, dec_len), half=True)
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
                 decoder_input_ids=ids(48, 79, dec_len, avoid=(1,)), extra={"use_cache": False}, half=True)


def other_fixtures(out):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              MT5Config, MT5ForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                              T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel, XGLMConfig,
                              XGLMForCausalLM)
    src_len, dec_len = [7, 12, 3], [5, 9, 1]
    t5_common = dict(vocab_size=87, d_model=32, d_kv=12, d_ff=37, num_layers=2, num_decoder_layers=3,
                     num_heads=3, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     dropout_rate=0.0)
    # HF's T5 generate needs as many decoder as encoder layers (its cache is sized by
    # num_layers), so the fixtures used for generation are symmetric; t5_v1_1 is not.
    sym = {**t5_common, "num_decoder_layers": 2}
    cases = [
        ("t5", T5ForConditionalGeneration(T5Config(feed_forward_proj="relu", **sym))),
        ("t5_v1_1", T5ForConditionalGeneration(T5Config(feed_forward_proj="gated-gelu",
                                                        tie_word_embeddings=False, **t5_common))),
        ("mt5", MT5ForConditionalGeneration(MT5Config(feed_forward_proj="gated-gelu", **sym))),
    ]
    for k, (name, model) in enumerate(cases):
        randomize(model, 60 + k)
        save_fixture(os.path.join(out, name), model, "logits", ragged_ids(70 + k, 87, [7, 25, 3]),
                     decoder_input_ids=ragged_ids(80 + k, 87, [5, 23, 1]), half=True)

    m = randomize(XGLMForCausalLM(XGLMConfig(vocab_size=95, d_model=32, ffn_dim=37, num_layers=2,
                                             attention_heads=4, max_position_embeddings=40,
                                             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)), 64)
    save_fixture(os.path.join(out, "xglm"), m, "logits", ragged_ids(74, 95, [9, 14, 2]), half=True)

    llama_common = dict(vocab_size=103, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    m = randomize(LlamaForCausalLM(LlamaConfig(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        attention_bias=True, **llama_common)), 65)
    save_fixture(os.path.join(out, "llama"), m, "logits", ragged_ids(75, 103, [9, 14, 2]), half=True)
    m = randomize(MistralForCausalLM(MistralConfig(sliding_window=4, head_dim=10, **llama_common)), 66)
    save_fixture(os.path.join(out, "mistral"), m, "logits", ragged_ids(76, 103, [9, 14, 2]), half=True)
    m = randomize(Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                               tie_word_embeddings=True, **llama_common)), 67)
    save_fixture(os.path.join(out, "qwen2"), m, "logits", ragged_ids(77, 103, [9, 14, 2]), half=True)

    m = randomize(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, image_size=12, patch_size=4, num_channels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), 68)
    px = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(78))
    save_fixture(os.path.join(out, "vit"), m, "hidden", None, pixel_values=px, half=True)


def torch_bin_fixtures(out):
    """pytorch_model.bin checkpoints (torch.save of a state dict, as HF 4.x wrote them):
    single-file with tied weights sharing one storage, and sharded with an index."""
    import argparse
    from collections import OrderedDict
    from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    m = randomize(LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=29,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, tie_word_embeddings=True)), 90)
    d = os.path.join(out, "llama_bin")
    save_fixture(d, m, "logits", ragged_ids(91, 61, [6, 11, 2]))
    sd = m.float().state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: one shared storage
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save(OrderedDict(sd), os.path.join(d, "pytorch_model.bin"))

    m = randomize(GPT2LMHeadModel(gpt2_config(n_layer=2)), 92)
    d = os.path.join(out, "gpt2_bin_sharded")
    save_fixture(d, m, "logits", ragged_ids(93, 101, [6, 11, 2]))
    os.remove(os.path.join(d, "model.safetensors"))
    sd = m.float().state_dict()
    names = list(sd.keys())
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, os.path.join(d, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

    # Tensor views the reader must gather: transposed, offset slice, step slice, expanded,
    # f16 and bf16, a Parameter, in a pickle protocol 4 file; contiguous copies as reference.
    g = torch.Generator().manual_seed(94)
    base = torch.randn(6, 5, generator=g)
    views = {
        "transposed": base.t(),
        "row_slice": base[2],
        "step_slice": base.flatten()[1::3],
        "expanded": torch.randn(1, generator=g).expand(4),
        "half": base.half()[1:4],
        "bf16": base.bfloat16().t()[2:],
        "param": torch.nn.Parameter(torch.randn(3, 2, generator=g)),
    }
    d = os.path.join(out, "torch_views")
    os.makedirs(d, exist_ok=True)
    torch.save(views, os.path.join(d, "views.pt"), pickle_protocol=4)
    save_file({k: v.detach().float().contiguous() for k, v in views.items()},
              os.path.join(d, "expected.safetensors"))


def to_fairseq(hf, pre_norm):
    """The fairseq `transformer` state dict of an HF FSMT / M2M100 / BART model."""
    from collections import OrderedDict
    sd = OrderedDict()
    hsd = hf.state_dict()
    for k, v in hsd.items():
        if ".layers." in k:
            sd[k[len("model."):]] = v
    get = lambda *ks: next(hsd[k] for k in ks if k in hsd)
    sd["encoder.embed_tokens.weight"] = get("model.encoder.embed_tokens.weight", "model.shared.weight")
    sd["decoder.embed_tokens.weight"] = get("model.decoder.embed_tokens.weight", "model.shared.weight")
    sd["decoder.output_projection.weight"] = get("model.decoder.output_projection.weight", "lm_head.weight",
                                                 "model.shared.weight")
    for side in ("encoder", "decoder"):
        sd[f"{side}.version"] = torch.tensor([3.0])
        if f"model.{side}.embed_positions.weight" in hsd and "bart" in type(hf).__name__.lower():
            sd[f"{side}.embed_positions.weight"] = hsd[f"model.{side}.embed_positions.weight"]
            for p in ("weight", "bias"):
                sd[f"{side}.layernorm_embedding.{p}"] = hsd[f"model.{side}.layernorm_embedding.{p}"]
        else:
            sd[f"{side}.embed_positions._float_tensor"] = torch.tensor([1.0])
        if pre_norm:
            for p in ("weight", "bias"):
                sd[f"{side}.layer_norm.{p}"] = hsd[f"model.{side}.layer_norm.{p}"]
    return {k: v.detach().clone().float() for k, v in sd.items()}


def fairseq_fixtures(out):
    """fairseq-layout checkpoints (state-dict names and args/cfg entries as fairseq writes
    them) made from HF models, with the HF model's logits as reference."""
    import argparse
    from collections import OrderedDict
    from transformers import (BartConfig, BartForConditionalGeneration, FSMTConfig,
                              FSMTForConditionalGeneration, M2M100Config, M2M100ForConditionalGeneration)
    import transformers.models.fsmt.modeling_fsmt as fsmt_mod
    fsmt_mod.fill_with_neg_inf = lambda t: t.fill_(torch.finfo(t.dtype).min)
    common = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    args_common = dict(arch="transformer", encoder_embed_dim=32, decoder_embed_dim=32, encoder_layers=2,
                       decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=2,
                       encoder_ffn_embed_dim=37, decoder_ffn_embed_dim=37, max_source_positions=64,
                       max_target_positions=64, dropout=0.1, share_all_embeddings=False,
                       source_lang="de", target_lang="en")
    src = ragged_ids(95, 60, [7, 12, 3])
    src = [[t + 4 for t in r] for r in src]  # no pad (1) inside sequences
    dec = [[2] + [t + 4 for t in r] for r in ragged_ids(96, 60, [4, 8, 1])]

    def emit(name, hf, ckpt, extra=None):
        d = os.path.join(out, "fairseq", name)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        torch.save(ckpt, os.path.join(d, "checkpoint.pt"))
        with open(os.path.join(d, "input.json"), "w") as f:
            json.dump({"input_ids": src, "decoder_input_ids": dec}, f)
        ref = reference(hf.double(), "logits", src, decoder_input_ids=dec, extra=extra)
        save_file({"logits": ref.float().contiguous()}, os.path.join(d, "reference.safetensors"))

    # Post-norm, sinusoidal, separate vocabularies: FSMT. Old-style `args` Namespace.
    hf = randomize(FSMTForConditionalGeneration(FSMTConfig(
        langs=["de", "en"], src_vocab_size=67, tgt_vocab_size=71, activation_function="relu",
        scale_embedding=True, tie_word_embeddings=False, **common)), 97)
    with torch.no_grad():  # the stored tables are the fairseq formula (randomize touched them)
        for side in (hf.model.encoder, hf.model.decoder):
            side.embed_positions.weight.copy_(side.embed_positions.get_embedding(
                *side.embed_positions.weight.shape, 1))
    ns = argparse.Namespace(**args_common, activation_fn="relu", encoder_normalize_before=False,
                            decoder_normalize_before=False)
    emit("post_norm", hf, {"args": ns, "model": OrderedDict(to_fairseq(hf, False)),
                           "extra_state": {"epoch": 3}, "optimizer_history": [{"num_updates": 10}]},
         extra={"use_cache": False})

    # Pre-norm, sinusoidal, gelu: M2M100. Newer layout: args None, cfg["model"] Namespace.
    hf = randomize(M2M100ForConditionalGeneration(M2M100Config(
        vocab_size=67, activation_function="gelu", scale_embedding=True, **common)), 98)
    ns = argparse.Namespace(**args_common, activation_fn="gelu", encoder_normalize_before=True,
                            decoder_normalize_before=True)
    sd = to_fairseq(hf, True)
    # Old fused attention weights in one layer (upgraded by the converter).
    for side, att in (("encoder", "self_attn"), ("decoder", "encoder_attn")):
        pre = f"{side}.layers.1.{att}."
        sd[pre + "in_proj_weight"] = torch.cat([sd.pop(pre + f"{p}_proj.weight") for p in "qkv"])
        sd[pre + "in_proj_bias"] = torch.cat([sd.pop(pre + f"{p}_proj.bias") for p in "qkv"])
    emit("pre_norm", hf, {"args": None, "cfg": {"_name": None, "model": ns, "task": {"_name": "translation"}},
                          "model": OrderedDict(sd)})

    # Post-norm, learned positions + layernorm_embedding, no embedding scale: BART.
    hf = randomize(BartForConditionalGeneration(BartConfig(
        vocab_size=67, activation_function="gelu", scale_embedding=False, **common)), 99)
    ns = argparse.Namespace(**args_common, activation_fn="gelu", encoder_normalize_before=False,
                            decoder_normalize_before=False, encoder_learned_pos=True,
                            decoder_learned_pos=True, layernorm_embedding=True, no_scale_embedding=True)
    emit("learned_pos", hf, {"args": ns, "model": OrderedDict(to_fairseq(hf, False))})


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
    torch_bin_fixtures(args.out)
    fairseq_fixtures(args.out)


if __name__ == "__main__":
    main()
