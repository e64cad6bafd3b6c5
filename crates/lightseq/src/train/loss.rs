//! fairseq's label-smoothed cross entropy, fused with the softmax.

/// Result of [`label_smoothed_cross_entropy`].
pub struct LossOutput {
    /// Mean over non-pad targets of the smoothed loss.
    pub loss: f64,
    /// Mean over non-pad targets of the negative log-likelihood.
    pub nll_loss: f64,
    /// Non-pad targets counted.
    pub tokens: usize,
    /// d loss / d logits [n, vocab].
    pub dlogits: Vec<f32>,
}

/// With p = softmax(logits), e = `epsilon` and V the vocabulary, each non-pad target t
/// contributes `(1 - e - e/(V-1)) * (-log p_t) + e/(V-1) * sum_v(-log p_v)`; the loss is
/// the mean over non-pad targets (targets equal to `pad` are ignored).
pub fn label_smoothed_cross_entropy(
    logits: &[f32],
    targets: &[i64],
    vocab: usize,
    epsilon: f64,
    pad: Option<i64>,
) -> LossOutput {
    let n = targets.len();
    let eps_i = if vocab > 1 {
        epsilon / (vocab as f64 - 1.0)
    } else {
        0.0
    };
    let tokens = targets.iter().filter(|&&t| Some(t) != pad).count();
    let denom = tokens.max(1) as f64;
    let (mut loss, mut nll) = (0f64, 0f64);
    let mut dlogits = vec![0f32; n * vocab];
    for (i, &t) in targets.iter().enumerate() {
        if Some(t) == pad {
            continue;
        }
        let row = &logits[i * vocab..(i + 1) * vocab];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
        let nll_i = lse - row[t as usize] as f64;
        let smooth_i = vocab as f64 * lse - row.iter().map(|&z| z as f64).sum::<f64>();
        loss += (1.0 - epsilon - eps_i) * nll_i + eps_i * smooth_i;
        nll += nll_i;
        let d = &mut dlogits[i * vocab..(i + 1) * vocab];
        for (v, g) in d.iter_mut().enumerate() {
            let p = (row[v] as f64 - lse).exp();
            let onehot = if v == t as usize { 1.0 } else { 0.0 };
            *g = (((1.0 - epsilon - eps_i) * (p - onehot) + eps_i * (vocab as f64 * p - 1.0))
                / denom) as f32;
        }
    }
    LossOutput {
        loss: loss / denom,
        nll_loss: nll / denom,
        tokens,
        dlogits,
    }
}
