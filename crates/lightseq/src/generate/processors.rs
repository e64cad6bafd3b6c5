//! Logits processors and warpers, in HF's order and with HF's semantics. Each works on one
//! row: its scores over the vocabulary and the sequence HF would see for it alone (prompt
//! without padding + generated tokens; for encoder-decoders, the decoder start + generated).

use super::config::Resolved;

/// Per-row context of one step.
pub struct RowContext<'a> {
    /// The row's sequence so far.
    pub seq: &'a [i64],
    /// Length of the part given as input (prompt, or the decoder start).
    pub input_len: usize,
    /// HF's max_length and min_length for this row.
    pub max_length: usize,
    pub min_length: usize,
}

fn mask(scores: &mut [f32], tokens: &[i64]) {
    for &t in tokens {
        if t >= 0 && (t as usize) < scores.len() {
            scores[t as usize] = f32::NEG_INFINITY;
        }
    }
}

fn force(scores: &mut [f32], tokens: &[i64]) {
    let keep: Vec<(usize, f32)> = tokens
        .iter()
        .filter(|&&t| t >= 0 && (t as usize) < scores.len())
        .map(|&t| (t as usize, 0.0))
        .collect();
    scores.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
    for (t, v) in keep {
        scores[t] = v;
    }
}

/// Tokens that would complete an n-gram already in `seq` (HF's NoRepeatNGram).
pub fn banned_ngram_tokens(seq: &[i64], n: usize) -> Vec<i64> {
    let l = seq.len();
    if n == 0 || l + 1 < n {
        return Vec::new();
    }
    let prefix = &seq[l + 1 - n..];
    (0..=l - (n - 1))
        .filter(|&i| i + n - 1 < l && &seq[i..i + n - 1] == prefix)
        .map(|i| seq[i + n - 1])
        .collect()
}

/// The processors HF builds for these options (not the sampling warpers), in its order:
/// repetition penalty, no-repeat n-grams, bad words, min length / min new tokens, forced
/// BOS, forced EOS, suppressed tokens, suppressed tokens at the beginning.
pub fn process(cfg: &Resolved, row: &RowContext, scores: &mut [f32]) {
    let len = row.seq.len();
    if cfg.repetition_penalty != 1.0 {
        let mut seen = vec![false; scores.len()];
        for &t in row.seq {
            if t >= 0 && (t as usize) < scores.len() && !seen[t as usize] {
                seen[t as usize] = true;
                let s = &mut scores[t as usize];
                *s = if *s < 0.0 {
                    *s * cfg.repetition_penalty
                } else {
                    *s / cfg.repetition_penalty
                };
            }
        }
    }
    if cfg.no_repeat_ngram_size > 0 {
        mask(
            scores,
            &banned_ngram_tokens(row.seq, cfg.no_repeat_ngram_size),
        );
    }
    for b in &cfg.bad_words {
        if b.is_empty() || (b.len() == 1 && cfg.eos.contains(&b[0])) {
            continue;
        }
        let pre = &b[..b.len() - 1];
        if pre.len() <= len && &row.seq[len - pre.len()..] == pre {
            mask(scores, &b[b.len() - 1..]);
        }
    }
    if !cfg.eos.is_empty() && len < row.min_length {
        mask(scores, &cfg.eos);
    }
    if let Some(b) = cfg.forced_bos {
        if len == 1 {
            force(scores, &[b]);
        }
    }
    if !cfg.forced_eos.is_empty() && len + 1 == row.max_length {
        force(scores, &cfg.forced_eos);
    }
    mask(scores, &cfg.suppress);
    if !cfg.begin_suppress.is_empty() {
        let begin = if row.input_len > 1 || cfg.forced_bos.is_none() {
            row.input_len
        } else {
            row.input_len + 1
        };
        if len == begin {
            mask(scores, &cfg.begin_suppress);
        }
    }
}

/// Sampling warpers in HF's order: temperature, top-k, top-p. `keep` is the least number
/// of tokens top-k and top-p leave (HF: 1, or the EOS count + 1 under beam sampling).
pub fn warp(cfg: &Resolved, scores: &mut [f32], keep: usize) {
    if cfg.temperature != 1.0 {
        scores.iter_mut().for_each(|s| *s /= cfg.temperature);
    }
    if cfg.top_k > 0 {
        let k = cfg.top_k.max(keep).min(scores.len());
        let mut sorted: Vec<f32> = scores.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        scores
            .iter_mut()
            .filter(|s| **s < threshold)
            .for_each(|s| *s = f32::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // Ascending order; drop the tokens whose cumulative probability stays within
        // 1 - top_p, keeping at least `keep` of the most likely.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
        let mut cum = 0f32;
        let n = order.len();
        let mut remove = Vec::new();
        for (r, (&i, p)) in order.iter().zip(probs).enumerate() {
            cum += p;
            if cum <= 1.0 - cfg.top_p && r < n.saturating_sub(keep) {
                remove.push(i);
            }
        }
        for i in remove {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f32.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// log_softmax in f32 (HF computes it on f32 logits), the sum of exponentials in f64 as
/// the CPU `logprob_topk` takes it (an f32 sum over a large vocabulary loses ~1e-4).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; x.len()];
    }
    let s: f64 = x.iter().map(|v| (v - m).exp() as f64).sum();
    let lse = m + (s.ln() as f32);
    x.iter().map(|v| v - lse).collect()
}
