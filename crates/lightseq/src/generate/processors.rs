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

/// Whether HF's min-length processor masks EOS for a sequence of `len` tokens whose
/// min_length is `min_length`.
pub(crate) fn min_length_masks_eos(cfg: &Resolved, len: usize, min_length: usize) -> bool {
    !cfg.eos.is_empty() && len < min_length
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
    if min_length_masks_eos(cfg, len, row.min_length) {
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
    if !cfg.begin_suppress.is_empty() && len == begin_index(cfg, row) {
        mask(scores, &cfg.begin_suppress);
    }
}

/// The tokens [`process`] leaves at 0 when it forces this step (forced BOS or forced EOS),
/// every other token being minus infinity whatever the logits were: ascending, without
/// repeats, after the suppressions that follow the forcing. `None` when nothing is forced
/// at this step, or when the suppressions leave no token (then every score is minus
/// infinity and the host path handles the row).
pub fn forced_tokens(cfg: &Resolved, row: &RowContext, vocab: usize) -> Option<Vec<i64>> {
    let len = row.seq.len();
    // Forced EOS runs after forced BOS, so it wins when both act.
    let forced: &[i64] = if !cfg.forced_eos.is_empty() && len + 1 == row.max_length {
        &cfg.forced_eos
    } else if let (Some(b), 1) = (cfg.forced_bos.as_ref(), len) {
        std::slice::from_ref(b)
    } else {
        return None;
    };
    let begin_suppressed = !cfg.begin_suppress.is_empty() && len == begin_index(cfg, row);
    let mut keep: Vec<i64> = forced
        .iter()
        .copied()
        .filter(|&t| t >= 0 && (t as usize) < vocab)
        .filter(|t| !cfg.suppress.contains(t))
        .filter(|t| !(begin_suppressed && cfg.begin_suppress.contains(t)))
        .collect();
    keep.sort_unstable();
    keep.dedup();
    (!keep.is_empty()).then_some(keep)
}

/// The sequence length at which HF's begin-suppression acts (after a forced BOS, one later).
pub fn begin_index(cfg: &Resolved, row: &RowContext) -> usize {
    if row.input_len > 1 || cfg.forced_bos.is_none() {
        row.input_len
    } else {
        row.input_len + 1
    }
}

/// Sampling warpers in HF's order: temperature, top-k, top-p. `keep` is the least number
/// of tokens top-k and top-p leave (HF: 1, or the EOS count + 1 under beam sampling).
pub fn warp(cfg: &Resolved, scores: &mut [f32], keep: usize) {
    if cfg.temperature != 1.0 {
        scores.iter_mut().for_each(|s| *s /= cfg.temperature);
    }
    // With no more scores than k (the device's top-k handed over), nothing is below the
    // k-th largest.
    if cfg.top_k > 0 && cfg.top_k.max(keep) < scores.len() {
        let k = cfg.top_k.max(keep);
        let mut sorted: Vec<f32> = scores.to_vec();
        let (_, &mut threshold, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
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
    match log_sum_exp(x) {
        Some(lse) => x.iter().map(|v| v - lse).collect(),
        None => vec![f32::NEG_INFINITY; x.len()],
    }
}

/// `log_softmax(x)[i]` without the rest.
pub fn log_softmax_at(x: &[f32], i: usize) -> f32 {
    log_sum_exp(x).map_or(f32::NEG_INFINITY, |lse| x[i] - lse)
}

/// The log-sum-exp of [`log_softmax`]; None when every value is minus infinity.
fn log_sum_exp(x: &[f32]) -> Option<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return None;
    }
    let s: f64 = x.iter().map(|v| (v - m).exp() as f64).sum();
    Some(m + (s.ln() as f32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::config::GenerationOptions;

    /// A small deterministic generator for the random cases.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }

        fn ids(&mut self, max_len: u64, vocab: u64) -> Vec<i64> {
            // Out-of-range ids too, which the processors ignore.
            (0..self.below(max_len + 1))
                .map(|_| self.below(vocab + 3) as i64 - 1)
                .collect()
        }
    }

    /// `forced_tokens` predicts exactly what `process` leaves on random scores: the forced
    /// tokens at 0 and minus infinity elsewhere, or `None` when the step is not forced.
    #[test]
    fn forced_tokens_match_the_processors() {
        let mut r = Lcg(7);
        let vocab = 12usize;
        let mut forced_seen = 0;
        for _ in 0..4000 {
            let o = GenerationOptions {
                forced_eos_token_id: Some(r.ids(3, vocab as u64)),
                forced_bos_token_id: (r.below(2) == 0).then(|| r.below(vocab as u64) as i64),
                suppress_tokens: Some(r.ids(2, vocab as u64)),
                begin_suppress_tokens: Some(r.ids(2, vocab as u64)),
                repetition_penalty: Some(1.0 + r.below(2) as f32 * 0.5),
                // The min-length EOS mask acts before the forcing.
                eos_token_id: Some(r.ids(2, vocab as u64)),
                ..Default::default()
            };
            let cfg = Resolved::new(&o, false).unwrap();
            let seq: Vec<i64> = (0..1 + r.below(5))
                .map(|_| r.below(vocab as u64) as i64)
                .collect();
            let row = RowContext {
                seq: &seq,
                input_len: 1 + r.below(2) as usize,
                max_length: 2 + r.below(5) as usize,
                min_length: r.below(6) as usize,
            };
            let mut scores: Vec<f32> = (0..vocab)
                .map(|_| r.below(1000) as f32 / 100.0 - 5.0)
                .collect();
            process(&cfg, &row, &mut scores);
            let only_infinite = scores.iter().all(|s| *s == f32::NEG_INFINITY);
            match forced_tokens(&cfg, &row, vocab) {
                Some(f) => {
                    forced_seen += 1;
                    let want: Vec<f32> = (0..vocab as i64)
                        .map(|t| {
                            if f.contains(&t) {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                        .collect();
                    assert_eq!(scores, want, "forced {f:?}");
                    assert!(f.windows(2).all(|w| w[0] < w[1]));
                }
                None => {
                    let eos_step = !cfg.forced_eos.is_empty() && seq.len() + 1 == row.max_length;
                    let bos_step = cfg.forced_bos.is_some() && seq.len() == 1;
                    assert!(!(eos_step || bos_step) || only_infinite);
                }
            }
        }
        assert!(forced_seen > 300, "only {forced_seen} forced steps drawn");
    }

    /// The top-k warp against a full sort's k-th largest (ties and minus infinity drawn),
    /// and `log_softmax_at` against `log_softmax`, on random scores.
    #[test]
    fn top_k_warp_and_single_log_softmax_match_their_definitions() {
        let mut r = Lcg(11);
        for _ in 0..2000 {
            let n = 1 + r.below(40) as usize;
            let scores: Vec<f32> = (0..n)
                .map(|_| match r.below(8) {
                    0 => f32::NEG_INFINITY,
                    _ => r.below(12) as f32 / 4.0 - 1.5,
                })
                .collect();
            let top_k = 1 + r.below(45) as usize;
            let keep = 1 + r.below(3) as usize;
            let cfg = Resolved::new(
                &GenerationOptions {
                    do_sample: Some(true),
                    top_k: Some(top_k),
                    ..Default::default()
                },
                false,
            )
            .unwrap();
            let mut got = scores.clone();
            warp(&cfg, &mut got, keep);
            let k = top_k.max(keep).min(n);
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let want: Vec<f32> = scores
                .iter()
                .map(|&s| {
                    if s < sorted[k - 1] {
                        f32::NEG_INFINITY
                    } else {
                        s
                    }
                })
                .collect();
            assert_eq!(got, want, "top_k {top_k} keep {keep} over {scores:?}");
            let full = log_softmax(&scores);
            for (i, &w) in full.iter().enumerate() {
                assert_eq!(log_softmax_at(&scores, i).to_bits(), w.to_bits());
            }
        }
    }
}
