#!/usr/bin/env python3
"""Reference generations from HF `generate` for the fixture models in tests/fixtures.

For each model and each option set, every prompt is generated alone (no padding) by HF
transformers in float64; tests/fixtures/generation/<model>.json stores the options, the
prompts, HF's sequences (trailing pad removed) and scores: `sequences_scores` for beam
search, else the sum of the chosen tokens' log-probabilities under the processed
distribution (up to and including the first EOS).

EOS is set to a token the model actually produces (found by a greedy probe), so stopping,
early-stopping and length-penalty paths are exercised on random weights.
Usage: python3 scripts/make_generation_fixtures.py [--out tests/fixtures/generation]
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

# (fixture dir, HF class name, encoder-decoder?)
MODELS = [
    ("gpt2", "GPT2LMHeadModel", False),
    ("xglm", "XGLMForCausalLM", False),
    ("llama", "LlamaForCausalLM", False),
    ("marian", "MarianMTModel", True),
    ("fsmt", "FSMTForConditionalGeneration", True),
    ("bart", "BartForConditionalGeneration", True),
    ("mbart", "MBartForConditionalGeneration", True),
    ("m2m100", "M2M100ForConditionalGeneration", True),
    ("t5", "T5ForConditionalGeneration", True),
    ("mt5", "MT5ForConditionalGeneration", True),
]

CASES = [
    {"max_new_tokens": 9},
    {"max_new_tokens": 10, "min_new_tokens": 6, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 8, "num_beams": 4, "num_return_sequences": 2},
    {"max_new_tokens": 9, "num_beams": 3, "length_penalty": 0.6, "early_stopping": True, "num_return_sequences": 3},
    {"max_new_tokens": 8, "num_beams": 4, "length_penalty": 1.5, "early_stopping": "never",
     "no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
    {"max_new_tokens": 11, "min_new_tokens": 4, "num_beams": 5, "length_penalty": -0.5,
     "early_stopping": False, "num_return_sequences": 5},
    {"max_new_tokens": 7, "num_beams": 2, "forced_eos_token_id": "eos", "suppress_tokens": [5, 7]},
    {"max_new_tokens": 6, "num_beams": 3, "forced_bos_token_id": 4, "begin_suppress_tokens": [6, 8],
     "min_length": 5, "num_return_sequences": 2},
    {"max_new_tokens": 6, "bad_words_ids": [[9], [3, 4]], "no_repeat_ngram_size": 1},
    # Forced steps with no other host-side processor (the device path takes them).
    {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 4, "forced_eos_token_id": "eos",
     "num_return_sequences": 2},
    {"max_new_tokens": 7, "forced_bos_token_id": 4, "forced_eos_token_id": 3},
]


def load(name, cls):
    import transformers
    model = getattr(transformers, cls).from_pretrained(os.path.join(FIXTURES, name), dtype=torch.float32)
    return model.double().eval()


def generate(model, enc_dec, prompt, opts, special):
    kw = dict(opts)
    kw.update(special)
    if kw.get("forced_eos_token_id") == "eos":
        kw["forced_eos_token_id"] = special["eos_token_id"]
    kw.setdefault("do_sample", False)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                         output_scores=True, use_cache=True, top_k=None, **kw)
    seqs = out.sequences.tolist()
    pad, eos = special["pad_token_id"], special["eos_token_id"]
    start = 0 if enc_dec else len(prompt)
    if kw.get("num_beams", model.generation_config.num_beams or 1) > 1:
        scores = out.sequences_scores.tolist()
    else:
        trans = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0].tolist()
        gen = seqs[0][len(prompt):] if not enc_dec else seqs[0][1:]
        total = 0.0
        for tok, s in zip(gen, trans):
            total += s
            if tok == eos:
                break
        scores = [total]
    cleaned = []
    for s in seqs:
        while len(s) > start + 1 and s[-1] == pad:
            s = s[:-1]
        cleaned.append(s)
    return cleaned, scores


def write_tokenizer(path, vocab):
    """A word-level tokenizer.json of exactly `vocab` entries (for --text tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["[UNK]"] + [f"w{i}" for i in range(1, vocab)]
    words[1:8] = ["hello", "world", "the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def main():
    # Runs are in float64; some HF models build mask constants in the default dtype.
    torch.set_default_dtype(torch.float64)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "generation"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write_tokenizer(os.path.join(FIXTURES, "gpt2", "tokenizer.json"), 101)
    for k, (name, cls, enc_dec) in enumerate(MODELS):
        model = load(name, cls)
        vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
        if name == "fsmt":
            vocab = model.config.tgt_vocab_size
        src_vocab = model.config.src_vocab_size if name == "fsmt" else vocab
        prompts = ragged_ids(200 + k, src_vocab, [5, 9, 2])
        start = None
        if enc_dec:
            start = getattr(model.generation_config, "decoder_start_token_id", None)
            if start is None:
                start = getattr(model.config, "decoder_start_token_id", None)
            if start is None:
                start = 0 if "t5" in name else 2
        # Probe: a greedy token of prompt 0 first seen after 3 steps becomes EOS; pad is a token never produced there.
        probe = {"eos_token_id": vocab + 10, "pad_token_id": 0}
        if enc_dec:
            probe["decoder_start_token_id"] = start
        gen, _ = generate(model, enc_dec, prompts[0], {"max_new_tokens": 8}, {**probe, "eos_token_id": None})
        produced = gen[0][(1 if enc_dec else len(prompts[0])):]
        cands = [t for t in produced[2:] if t != produced[0] and t != start]
        if cands:
            eos = cands[0]
        else:
            # Degenerate (repeating) greedy output: the runner-up of the first step, so beams
            # still meet EOS.
            with torch.no_grad():
                ids = torch.tensor([prompts[0]])
                kw = {"decoder_input_ids": torch.tensor([[start]])} if enc_dec else {}
                logits = model(input_ids=ids, **kw).logits[0, -1]
            eos = int(torch.argsort(logits, descending=True)[1])
        pad = next(t for t in range(vocab) if t not in produced and t not in (start, eos))
        special = {"eos_token_id": eos, "pad_token_id": pad}
        if enc_dec:
            special["decoder_start_token_id"] = start
        cases = []
        for opts in CASES:
            seqs, scores = [], []
            # HF's bad-words processor builds its bias in the default dtype (float64 here)
            # and fails on float32 scores: run that case with a float32 default, which
            # XGLM's float64 masks cannot take, so XGLM skips it.
            if "bad_words_ids" in opts:
                if name == "xglm":
                    continue
                torch.set_default_dtype(torch.float32)
            for p in prompts:
                s, sc = generate(model, enc_dec, p, opts, special)
                seqs.append(s)
                scores.append(sc)
            torch.set_default_dtype(torch.float64)
            o = dict(opts)
            if o.get("forced_eos_token_id") == "eos":
                o["forced_eos_token_id"] = eos
            o.update(special)
            cases.append({"options": o, "sequences": seqs, "scores": scores})
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump({"model": name, "prompts": prompts, "cases": cases}, f)
        print(name, "eos", eos, "pad", pad, [len(c["sequences"][0][0]) for c in cases])


if __name__ == "__main__":
    main()
