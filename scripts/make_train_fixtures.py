#!/usr/bin/env python3
"""Training references from HF transformers + torch.optim, float64, written under
tests/fixtures/train:

  gpt2.json, marian.json, bart.json  loss curves: 15 full-batch AdamW steps, the loss of
      each step from its own forward pass before its update, fairseq's label-smoothed cross
      entropy averaged over target tokens, gradient norm before clipping. GPT2 runs its
      rows one at a time; the seq2seq models run the batch padded (one forward with an
      attention mask), checked against rows one at a time.
  grads_<name>.safetensors + grads_<name>.json  one forward + backward (no optimizer) of
      marian, marian_relu (ReLU feed-forward), bart, mbart, bert MLM, bert sequence
      classification, gpt2 and ViT image classification: the gradient of every trainable parameter under its HF name (f32
      values of the f64 run) and the loss (`loss`, shape [1]). Parameter names are those
      of the checkpoint (model.safetensors); where HF's module names differ (ViT in
      transformers 5.x: vit.layers.0.attention.q_proj for the stored
      vit.encoder.layer.0.attention.attention.query) the json maps checkpoint names to
      module names under "module_names".

Also writes the model directories it uses that make_fixtures.py does not: ../vit_cls, a
tiny ViTForImageClassification, and ../marian_relu, the marian fixture with ReLU (f32
safetensors, weights from make_fixtures.randomize).

Loss: fairseq's label-smoothed cross entropy (eps 0.1 for the gradients) summed over the
predicted positions and divided by their count. Seq2seq: decoder input
[decoder_start] + tgt[:-1], labels tgt (which ends with eos), padding at the end.

Usage: python3 scripts/make_train_fixtures.py [--out tests/fixtures/train]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import ragged_ids, randomize  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
ADAM = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
CURVE_CASES = {
    "gpt2": [(0.1, 1.0), (0.0, None)],
    # Seq2seq gradient norms stay near 0.4 on these fixtures: clip below that so it fires.
    "seq2seq": [(0.1, 0.2), (0.0, None), (0.1, None), (0.0, 0.1)],
}
GRAD_EPS = 0.1


def fairseq_loss(logits, targets, eps):
    lp = logits.log_softmax(-1)
    v = lp.shape[-1]
    nll = -lp.gather(1, targets[:, None])[:, 0]
    smooth = -lp.sum(-1)
    eps_i = eps / (v - 1)
    return ((1 - eps - eps_i) * nll + eps_i * smooth).sum(), nll.sum()


# ---------------------------------------------------------------------------- models

MODELS = {
    # name: (fixture dir, HF class, kind)
    "gpt2": ("gpt2", "GPT2LMHeadModel", "causal"),
    "marian": ("marian", "MarianMTModel", "seq2seq"),
    "marian_relu": ("marian_relu", "MarianMTModel", "seq2seq"),
    "bart": ("bart", "BartForConditionalGeneration", "seq2seq"),
    "mbart": ("mbart", "MBartForConditionalGeneration", "seq2seq"),
    "bert_mlm": ("bert_mlm_sharded", "BertForMaskedLM", "mlm"),
    "bert_cls": ("bert_cls_types", "BertForSequenceClassification", "cls"),
    "vit_cls": ("vit_cls", "ViTForImageClassification", "image"),
}


def save_model_dir(m, name):
    """Writes model `m` in f32 as the fixture directory of MODELS[name], replacing it (no
    generation_config.json)."""
    import shutil
    out = os.path.join(FIXTURES, MODELS[name][0])
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    m.float().save_pretrained(out, safe_serialization=True)
    for f in os.listdir(out):
        if f == "generation_config.json":
            os.remove(os.path.join(out, f))


def make_marian_relu(seed=390):
    """tests/fixtures/marian_relu: the marian fixture's shapes (a vocabulary of 89, not a
    multiple of 8) with a ReLU feed-forward, new random weights, f32 safetensors."""
    from transformers import MarianConfig, MarianMTModel
    torch.set_default_dtype(torch.float32)
    c = MarianConfig.from_pretrained(os.path.join(FIXTURES, MODELS["marian"][0]))
    c.activation_function = "relu"
    m = randomize(MarianMTModel(c), seed)
    save_model_dir(m, "marian_relu")


def make_vit_cls(seed=370):
    """tests/fixtures/vit_cls: a tiny ViT image classifier, f32 safetensors. No pooler
    (ViTForImageClassification builds its ViTModel with add_pooling_layer=False); the
    classifier reads the CLS position of the final layernorm."""
    from transformers import ViTConfig, ViTForImageClassification
    torch.set_default_dtype(torch.float32)
    m = randomize(ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=12, patch_size=4, num_channels=3, num_labels=3, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
        layer_norm_eps=1e-12)), seed)
    # randomize draws LayerNorm gains as 1 + 0.1 N(0, 1) only for BERT/GPT2 names; ViT's
    # (layernorm_before/after, layernorm) came out 0.1 N(0, 1), which leaves attention
    # uniform (max probability 0.103 of 10 positions) and the query/key gradients at 1e-4
    # of the total. Shift them to 1 + 0.1 N(0, 1), as randomize means to.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layernorm" in n and n.endswith(".weight"):
                p.add_(1.0)
    assert m.vit.pooler is None
    save_model_dir(m, "vit_cls")


def checkpoint_names(model, name):
    """{module parameter name: checkpoint name} for a single-file fixture whose stored
    names differ from the module's (HF 5.x ViT), matched by exact value (the weights are
    random, so each is unique); asserts the match is one to one."""
    from safetensors.torch import load_file
    stored = load_file(os.path.join(FIXTURES, MODELS[name][0], "model.safetensors"))
    out = {}
    for n, p in model.named_parameters():
        hits = [k for k, t in stored.items()
                if t.shape == p.shape and torch.equal(t.double(), p.detach().double())]
        assert len(hits) == 1, (name, n, hits)
        out[n] = hits[0]
    assert sorted(out.values()) == sorted(stored), (name, set(stored) - set(out.values()))
    return out


def load(name):
    """The fixture model in float64, train mode, dropouts checked to be 0. Returns
    (model, names of parameters frozen here)."""
    import transformers
    d, cls, _ = MODELS[name]
    torch.set_default_dtype(torch.float64)
    model, info = getattr(transformers, cls).from_pretrained(
        os.path.join(FIXTURES, d), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model = model.double()
    model.train()
    c = model.config
    for k in ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout_prob",
              "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
              "classifier_dropout", "encoder_layerdrop", "decoder_layerdrop"):
        v = getattr(c, k, None)
        assert not v, f"{name}: {k} = {v}"
    frozen = []
    # Marian's sinusoidal position tables are built frozen (nn.Embedding _freeze=True, as a
    # freshly constructed model shows), but HF 5.x from_pretrained hands them back with
    # requires_grad=True; they are fixed sinusoids, so freeze them again.
    for n, mod in model.named_modules():
        if type(mod).__name__.endswith("SinusoidalPositionalEmbedding"):
            mod.weight.requires_grad_(False)
            frozen.append(n + ".weight")
    return model, frozen


def decoder_start(model):
    c = model.config
    # mBART has no decoder_start_token_id: HF's mbart shift_tokens_right starts the decoder
    # with the last non-pad token of the labels, which is eos here.
    return c.decoder_start_token_id if c.decoder_start_token_id is not None else c.eos_token_id


def pad_to(rows, value):
    n = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [value] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    return ids, mask


def batch_loss(model, kind, rows, eps):
    """One padded forward of the whole batch: (loss sum, nll sum, predicted positions)."""
    c = model.config
    pad = getattr(c, "pad_token_id", None)
    pad = pad if pad is not None else 0
    if kind == "seq2seq":
        start = decoder_start(model)
        src, src_mask = pad_to([r["src"] for r in rows], pad)
        dec, _ = pad_to([[start] + r["tgt"][:-1] for r in rows], pad)
        tgt, tgt_mask = pad_to([r["tgt"] for r in rows], pad)
        logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec).logits
        keep = tgt_mask.bool()
        return (*fairseq_loss(logits[keep], tgt[keep], eps), int(keep.sum()))
    if kind == "causal":
        ids, mask = pad_to([r["ids"][:-1] for r in rows], pad)
        tgt, _ = pad_to([r["ids"][1:] for r in rows], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        return (*fairseq_loss(logits[keep], tgt[keep], eps), int(keep.sum()))
    if kind == "mlm":
        ids, mask = pad_to([r["ids"] for r in rows], pad)
        labels, _ = pad_to([r["labels"] for r in rows], -100)
        logits = model(input_ids=ids, attention_mask=mask).logits
        keep = labels != -100
        return (*fairseq_loss(logits[keep], labels[keep], eps), int(keep.sum()))
    if kind == "cls":
        ids, mask = pad_to([r["ids"] for r in rows], pad)
        types, _ = pad_to([r["token_type_ids"] for r in rows], 0)
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        return (*fairseq_loss(logits, torch.tensor([r["label"] for r in rows]), eps), len(rows))
    if kind == "image":
        px = torch.tensor([r["pixel_values"] for r in rows], dtype=torch.float64)
        logits = model(pixel_values=px).logits
        return (*fairseq_loss(logits, torch.tensor([r["label"] for r in rows]), eps), len(rows))
    raise ValueError(kind)


def rowwise_loss(model, kind, rows, eps):
    """Each row alone, no padding and no mask: (loss sum, nll sum, predicted positions),
    summed row by row."""
    total, nll, count = 0.0, 0.0, 0
    for r in rows:
        r = dict(r)
        if kind == "seq2seq":
            start = decoder_start(model)
            logits = model(input_ids=torch.tensor([r["src"]]),
                           decoder_input_ids=torch.tensor([[start] + r["tgt"][:-1]])).logits[0]
            targets = torch.tensor(r["tgt"])
        elif kind == "causal":
            logits = model(input_ids=torch.tensor([r["ids"][:-1]])).logits[0]
            targets = torch.tensor(r["ids"][1:])
        elif kind == "mlm":
            labels = torch.tensor(r["labels"])
            logits = model(input_ids=torch.tensor([r["ids"]])).logits[0][labels != -100]
            targets = labels[labels != -100]
        elif kind == "cls":
            logits = model(input_ids=torch.tensor([r["ids"]]),
                           token_type_ids=torch.tensor([r["token_type_ids"]])).logits
            targets = torch.tensor([r["label"]])
        elif kind == "image":
            logits = model(pixel_values=torch.tensor([r["pixel_values"]], dtype=torch.float64)).logits
            targets = torch.tensor([r["label"]])
        else:
            raise ValueError(kind)
        lo, n = fairseq_loss(logits, targets, eps)
        total = total + lo
        nll = nll + n
        count += len(targets)
    return total, nll, count


def close(a, b, tol=1e-10):
    a, b = (x.item() if torch.is_tensor(x) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


# ---------------------------------------------------------------------------- data

def seq2seq_rows(model, seed, src_lens=(5, 9, 3, 7, 11), tgt_lens=(6, 4, 8, 3, 7)):
    c = model.config
    v, avoid = c.vocab_size, {c.pad_token_id, c.eos_token_id}

    def fix(rows):
        out = []
        for r in rows:
            row = []
            for t in r:
                while t in avoid:
                    t = (t + 1) % v
                row.append(t)
            out.append(row)
        return out
    src = fix(ragged_ids(seed, v, list(src_lens)))
    tgt = fix(ragged_ids(seed + 1, v, [n - 1 for n in tgt_lens]))
    return [{"src": s, "tgt": t + [c.eos_token_id]} for s, t in zip(src, tgt)]


def mlm_rows(model, seed, lengths=(5, 12, 8, 3)):
    """Token ids in [1, V-1) (0 is pad), about 30% of positions predicted (at least one
    per row): the label is the original token and the input there is V-1 (a mask id)."""
    v = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        orig = torch.randint(1, v - 1, (n,), generator=g).tolist()
        pick = (torch.rand(n, generator=g) < 0.3).tolist()
        if not any(pick):
            pick[int(torch.randint(0, n, (1,), generator=g))] = True
        rows.append({"ids": [v - 1 if p else t for t, p in zip(orig, pick)],
                     "labels": [t if p else -100 for t, p in zip(orig, pick)]})
    return rows


def cls_rows(model, seed, lengths=(6, 3, 11, 8)):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        rows.append({"ids": torch.randint(1, c.vocab_size, (n,), generator=g).tolist(),
                     "token_type_ids": torch.randint(0, c.type_vocab_size, (n,), generator=g).tolist(),
                     "label": int(torch.randint(0, c.num_labels, (1,), generator=g))})
    return rows


def image_rows(model, seed, n=4):
    """n images [channels, size, size] of standard normal values rounded to f32 (the
    float64 run reads exactly those), labels in [0, num_labels)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, c.num_channels, c.image_size, c.image_size, generator=g,
                     dtype=torch.float64).float()
    labels = torch.randint(0, c.num_labels, (n,), generator=g).tolist()
    return [{"pixel_values": p.tolist(), "label": int(k)} for p, k in zip(px, labels)]


def causal_rows(seed, vocab, lengths=(6, 11, 4, 9, 13)):
    return [{"ids": r} for r in ragged_ids(seed, vocab, list(lengths))]


# ---------------------------------------------------------------------------- curves

def curve(name, rows, ls, clip, steps=15):
    kind = MODELS[name][2]
    model, _ = load(name)
    opt = torch.optim.AdamW(model.parameters(), **ADAM)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        if kind == "causal":
            # GPT2: rows one at a time, as this reference has always been made.
            total, nll, tokens = rowwise_loss(model, kind, rows, ls)
        else:
            total, nll, tokens = batch_loss(model, kind, rows, ls)
            with torch.no_grad():
                t1, n1, c1 = rowwise_loss(model, kind, rows, ls)
            assert c1 == tokens and close(t1, total) and close(n1, nll), (name, t1.item(), total.item())
        loss = total / tokens
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        opt.step()
        out.append({"loss": loss.item(), "nll_loss": (nll / tokens).item(), "grad_norm": norm.item()})
    torch.set_default_dtype(torch.float32)
    return out


def write_curve(out_dir, name, rows, extra=None):
    kind = MODELS[name][2]
    cases = [{"label_smoothing": ls, "clip_norm": clip, "steps": curve(name, rows, ls, clip)}
             for ls, clip in CURVE_CASES["gpt2" if kind == "causal" else "seq2seq"]]
    doc = {"model": name,
           "rows": [r["ids"] for r in rows] if kind == "causal" else rows,
           "lr": ADAM["lr"], "betas": list(ADAM["betas"]), "eps": ADAM["eps"],
           "weight_decay": ADAM["weight_decay"], "cases": cases}
    doc.update(extra or {})
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{name}.json", [[round(s["loss"], 5) for s in c["steps"]][:3] for c in cases])


# ---------------------------------------------------------------------------- gradients

def tied_names(model):
    """{parameter name: other state_dict names sharing its storage} for tied parameters."""
    sd = model.state_dict()
    tied = {}
    for n, p in model.named_parameters():
        al = [k for k, t in sd.items() if k != n and t.data_ptr() == p.data_ptr()]
        if al:
            tied[n] = al
    return tied


def write_grads(out_dir, name, rows, extra=None):
    d, cls, kind = MODELS[name]
    model, frozen = load(name)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params}

    total, nll, count = batch_loss(model, kind, rows, GRAD_EPS)
    loss = total / count
    g = grads(loss)
    # The padded batch against each row alone: same loss and gradients.
    t1, n1, c1 = rowwise_loss(model, kind, rows, GRAD_EPS)
    assert c1 == count and close(t1, total) and close(n1, nll), (name, t1.item(), total.item())
    g1 = grads(t1 / c1)
    for n in g:
        err = (g[n] - g1[n]).abs().max().item()
        assert err <= 1e-10 * max(1.0, g1[n].abs().max().item()), (name, n, err)
    no_grad = [n for n, p in params if p.grad is None]

    names = {n: n for n in g}
    if kind == "image":
        names = checkpoint_names(model, name)
        extra = {**(extra or {}),
                 "module_names": {names[n]: n for n in g if names[n] != n}}
    tensors = {names[n]: t.float().contiguous() for n, t in g.items()}
    tensors["loss"] = torch.tensor([loss.item()], dtype=torch.float32)
    save_file(tensors, os.path.join(out_dir, f"grads_{name}.safetensors"))
    doc = {"model": name, "hf_class": cls, "dir": d, "label_smoothing": GRAD_EPS, "rows": rows,
           "loss": loss.item(), "nll_loss": (nll / count).item(), "predicted": count,
           "tied": tied_names(model), "frozen": [names.get(n, n) for n in frozen],
           "no_grad": [names[n] for n in no_grad]}
    doc.update(extra or {})
    with open(os.path.join(out_dir, f"grads_{name}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    gn = torch.sqrt(sum((t * t).sum() for t in g.values())).item()
    print(f"grads_{name}: loss {loss.item():.6f} over {count}, {len(g)} grads, norm {gn:.5f}")
    torch.set_default_dtype(torch.float32)


def seq2seq_extra(model):
    c = model.config
    return {"pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
            "decoder_start_token_id": decoder_start(model)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIXTURES, "train"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    write_curve(args.out, "gpt2", causal_rows(300, 101))
    data = {}
    for seed, name in ((310, "marian"), (320, "bart"), (330, "mbart")):
        model, _ = load(name)
        data[name] = (seq2seq_rows(model, seed), seq2seq_extra(model))
    for name in ("marian", "bart"):
        rows, extra = data[name]
        _, frozen = load(name)
        write_curve(args.out, name, rows, {**extra, "frozen": frozen})

    for name in ("marian", "bart", "mbart"):
        write_grads(args.out, name, *data[name])
    model, _ = load("bert_mlm")
    write_grads(args.out, "bert_mlm", mlm_rows(model, 340), {"pad_token_id": model.config.pad_token_id})
    model, _ = load("bert_cls")
    write_grads(args.out, "bert_cls", cls_rows(model, 350), {"pad_token_id": model.config.pad_token_id,
                                                             "num_labels": model.config.num_labels})
    write_grads(args.out, "gpt2", causal_rows(360, 101, (7, 12, 3, 9)), {"pad_token_id": 0})
    make_marian_relu(390)
    model, _ = load("marian_relu")
    write_grads(args.out, "marian_relu", seq2seq_rows(model, 391), seq2seq_extra(model))
    make_vit_cls(370)
    model, _ = load("vit_cls")
    write_grads(args.out, "vit_cls", image_rows(model, 380), {"num_labels": model.config.num_labels})
    torch.set_default_dtype(torch.float32)


if __name__ == "__main__":
    main()
