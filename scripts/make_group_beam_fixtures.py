#!/usr/bin/env python3
"""Reference group (diverse) beam searches from HF transformers 4.x for the fixture models.

HF 5.x no longer ships group beam search, so these come from a transformers 4.x install
(4.46 was used): every prompt generated alone in float32 (its group beam search fails on float64 scores) with `num_beam_groups` and
`diversity_penalty` (Hamming diversity), with the prompts, EOS and pad ids of
tests/fixtures/generation/<model>.json. Writes tests/fixtures/generation_groups/<model>.json
in the same layout (options, prompts, sequences without trailing pad, sequences_scores).
Usage: python3 scripts/make_group_beam_fixtures.py [--out tests/fixtures/generation_groups]
"""
import argparse
import json
import os

import torch
import transformers

import make_generation_fixtures

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

# A decoder-only model and two encoder-decoders (pad id 0 in BART, 1 in T5).
MODELS = [m for m in make_generation_fixtures.MODELS if m[0] in ("gpt2", "bart", "t5")]

CASES = [
    {"max_new_tokens": 8, "num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.5,
     "num_return_sequences": 4},
    {"max_new_tokens": 9, "num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 5.0,
     "early_stopping": True, "num_return_sequences": 3},
    {"max_new_tokens": 10, "num_beams": 4, "num_beam_groups": 4, "diversity_penalty": 0.7,
     "length_penalty": 0.6, "num_return_sequences": 2},
    {"max_new_tokens": 9, "num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 3.0,
     "early_stopping": True, "length_penalty": 1.5, "num_return_sequences": 2},
]


def main():
    torch.set_default_dtype(torch.float32)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "generation_groups"))
    args = ap.parse_args()
    assert transformers.__version__.startswith("4."), "needs transformers 4.x (group beam search)"
    os.makedirs(args.out, exist_ok=True)
    for name, cls, enc_dec in MODELS:
        ref = json.load(open(os.path.join(FIXTURES, "generation", f"{name}.json")))
        special = {k: ref["cases"][0]["options"][k] for k in
                   ("eos_token_id", "pad_token_id", "decoder_start_token_id")
                   if k in ref["cases"][0]["options"]}
        model = getattr(transformers, cls).from_pretrained(
            os.path.join(FIXTURES, name), torch_dtype=torch.float32).eval()
        cases = []
        for opts in CASES:
            seqs, scores = [], []
            for p in ref["prompts"]:
                ids = torch.tensor([p])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     return_dict_in_generate=True, output_scores=True,
                                     use_cache=True, **opts, **special)
                start = 0 if enc_dec else len(p)
                cleaned = []
                for s in out.sequences.tolist():
                    while len(s) > start + 1 and s[-1] == special["pad_token_id"]:
                        s = s[:-1]
                    cleaned.append(s)
                seqs.append(cleaned)
                scores.append(out.sequences_scores.tolist())
            cases.append({"options": {**opts, **special}, "sequences": seqs, "scores": scores})
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump({"model": name, "prompts": ref["prompts"], "cases": cases}, f)
        print(name, special, [[len(s) for s in c["sequences"][0]] for c in cases])


if __name__ == "__main__":
    main()
