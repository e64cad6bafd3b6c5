//! CPU bodies of the training ops (f32, the reference for the CUDA ones). Conventions and
//! shapes are documented on the front ends in `crate::train::ops`.

use super::rows_per_task;
use crate::ops::Activation;
use crate::train::grad::activation_grad;
use crate::train::philox;
use rayon::prelude::*;

pub(crate) use super::matmul;

/// [a, b, c, d] -> [a, c, b, d].
pub(crate) fn transpose_12(x: &[f32], a: usize, b: usize, c: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for i in 0..a {
        for j in 0..b {
            for l in 0..c {
                let src = ((i * b + j) * c + l) * d;
                let dst = ((i * c + l) * b + j) * d;
                y[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    y
}

/// Row-wise softmax of `scale * s` over [batch, heads, lq, lk], keys at or past
/// `key_lens[b]` masked, and with `causal` keys after the query masked. Fully masked rows
/// are zeros.
#[allow(clippy::too_many_arguments)]
pub(crate) fn masked_softmax(
    s: &[f32],
    key_lens: Option<&[i32]>,
    heads: usize,
    lq: usize,
    lk: usize,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let mut p = vec![0f32; s.len()];
    p.par_chunks_mut(lk.max(1))
        .enumerate()
        .for_each(|(r, out)| {
            let (b, i) = (r / (heads * lq).max(1), r % lq.max(1));
            let mut limit = key_lens.map_or(lk, |kl| (kl[b].max(0) as usize).min(lk));
            if causal {
                limit = limit.min(i + 1);
            }
            let row = &s[r * lk..(r + 1) * lk];
            if limit == 0 {
                return;
            }
            let m = row[..limit]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &v| a.max(v * scale));
            let mut sum = 0f32;
            for j in 0..limit {
                out[j] = (row[j] * scale - m).exp();
                sum += out[j];
            }
            out[..limit].iter_mut().for_each(|v| *v /= sum);
        });
    p
}

/// dS = scale * P * (dP - sum_j(P * dP)) per row of `cols`.
pub(crate) fn softmax_backward(p: &[f32], dp: &[f32], cols: usize, scale: f32) -> Vec<f32> {
    let mut ds = vec![0f32; p.len()];
    ds.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, out)| {
            let (pr, dr) = (&p[r * cols..(r + 1) * cols], &dp[r * cols..(r + 1) * cols]);
            let dot: f32 = pr.iter().zip(dr).map(|(a, b)| a * b).sum();
            for j in 0..cols {
                out[j] = scale * pr[j] * (dr[j] - dot);
            }
        });
    ds
}

/// `s = x + y` (when `y`) and layer norm of s over rows of `h`: (s, out).
pub(crate) fn add_layer_norm(
    x: &[f32],
    y: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    rows: usize,
    h: usize,
    eps: f32,
) -> (Option<Vec<f32>>, Vec<f32>) {
    let s = y.map(|y| super::add(x, y));
    let out = super::layer_norm(s.as_deref().unwrap_or(x), None, gamma, beta, eps, rows, h);
    (s, out)
}

/// Backward of layer norm over rows of `h`: returns (dx, dgamma, dbeta).
pub(crate) fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    rows: usize,
    h: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; rows * h];
    let mut dgamma = vec![0f64; h];
    let mut dbeta = vec![0f64; h];
    let mut xhat = vec![0f32; h];
    for r in 0..rows {
        let xr = &x[r * h..(r + 1) * h];
        let dyr = &dy[r * h..(r + 1) * h];
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let (mut s1, mut s2) = (0f64, 0f64);
        for j in 0..h {
            xhat[j] = ((xr[j] as f64 - mean) * rstd) as f32;
            let g = dyr[j] as f64 * gamma[j] as f64;
            s1 += g;
            s2 += g * xhat[j] as f64;
            dgamma[j] += dyr[j] as f64 * xhat[j] as f64;
            dbeta[j] += dyr[j] as f64;
        }
        let (s1, s2) = (s1 / h as f64, s2 / h as f64);
        for j in 0..h {
            let g = dyr[j] as f64 * gamma[j] as f64;
            dx[r * h + j] = (rstd * (g - s1 - xhat[j] as f64 * s2)) as f32;
        }
    }
    (
        dx,
        dgamma.into_iter().map(|v| v as f32).collect(),
        dbeta.into_iter().map(|v| v as f32).collect(),
    )
}

pub(crate) fn activate(x: &[f32], act: Activation) -> Vec<f32> {
    let mut y = x.to_vec();
    y.par_chunks_mut(16384)
        .for_each(|c| c.iter_mut().for_each(|v| *v = act.apply(*v)));
    y
}

pub(crate) fn activation_backward(pre: &[f32], dy: &[f32], act: Activation) -> Vec<f32> {
    let mut dx = vec![0f32; pre.len()];
    dx.par_chunks_mut(16384).enumerate().for_each(|(c, out)| {
        let o = c * 16384;
        for (i, v) in out.iter_mut().enumerate() {
            *v = dy[o + i] * activation_grad(act, pre[o + i]);
        }
    });
    dx
}

/// Sum over rows of x [rows, cols].
pub(crate) fn column_sum(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut acc = vec![0f64; cols];
    for r in 0..rows {
        for (a, &v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
            *a += v as f64;
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// d table [vocab, h] of `out[i] = scale * table[ids[i]]`.
pub(crate) fn embedding_backward(
    ids: &[i32],
    dy: &[f32],
    h: usize,
    vocab: usize,
    scale: f32,
) -> Vec<f32> {
    let mut d = vec![0f32; vocab * h];
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= vocab {
            continue;
        }
        let row = &mut d[id as usize * h..(id as usize + 1) * h];
        row.iter_mut()
            .zip(&dy[i * h..(i + 1) * h])
            .for_each(|(a, b)| *a += scale * b);
    }
    d
}

/// Per-row fairseq label-smoothed loss and nll, and `grad_scale * d loss / d logits`.
/// Rows with a negative target contribute nothing.
pub(crate) fn cross_entropy(
    logits: &[f32],
    targets: &[i32],
    vocab: usize,
    eps: f32,
    grad_scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = targets.len();
    let mut loss = vec![0f32; n];
    let mut nll = vec![0f32; n];
    let mut d = vec![0f32; n * vocab];
    let eps = eps as f64;
    let eps_i = if vocab > 1 {
        eps / (vocab as f64 - 1.0)
    } else {
        0.0
    };
    d.par_chunks_mut(vocab.max(1))
        .zip(loss.par_iter_mut().zip(nll.par_iter_mut()))
        .enumerate()
        .for_each(|(i, (g, (l, nl)))| {
            let t = targets[i];
            if t < 0 {
                return;
            }
            let row = &logits[i * vocab..(i + 1) * vocab];
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln();
            let nll_i = lse - row[t as usize] as f64;
            let smooth_i = vocab as f64 * lse - row.iter().map(|&z| z as f64).sum::<f64>();
            *l = ((1.0 - eps - eps_i) * nll_i + eps_i * smooth_i) as f32;
            *nl = nll_i as f32;
            let a = (1.0 - eps - eps_i) + vocab as f64 * eps_i;
            for (v, gv) in g.iter_mut().enumerate() {
                let p = (row[v] as f64 - lse).exp();
                let onehot = if v == t as usize {
                    1.0 - eps - eps_i
                } else {
                    0.0
                };
                *gv = ((a * p - onehot - eps_i) * grad_scale as f64) as f32;
            }
        });
    (loss, nll, d)
}

/// One Adam(W) update in place; `grad_scale` multiplies the gradient first (clipping and
/// loss-scale removal ride here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn adam_step(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamHyper,
) {
    let bc1 = 1.0 - h.beta1.powi(h.step as i32);
    let bc2_sqrt = (1.0 - h.beta2.powi(h.step as i32)).sqrt();
    let step_size = (h.lr / bc1) as f32;
    let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
    for i in 0..param.len() {
        let mut g = grad[i] * h.grad_scale;
        if h.decoupled {
            param[i] *= (1.0 - h.lr * h.weight_decay) as f32;
        } else {
            g += h.weight_decay as f32 * param[i];
        }
        m[i] = m[i] * b1 + (1.0 - b1) * g;
        v[i] = v[i] * b2 + (1.0 - b2) * g * g;
        let denom = (v[i].sqrt() as f64 / bc2_sqrt + h.eps) as f32;
        param[i] -= step_size * m[i] / denom;
    }
}

/// Hyper-parameters of one Adam(W) step.
#[derive(Debug, Clone, Copy)]
pub struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (decoupled decay) when true, Adam (L2 added to the gradient) when false.
    pub decoupled: bool,
    /// 1-based step count, for bias correction.
    pub step: u64,
    pub grad_scale: f32,
}

pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(16384)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .sum()
}

/// Inverted dropout with the mask drawn from Philox: element i is kept when
/// `philox::uniform(seed, offset, i) >= p`, and kept values are divided by 1 - p.
pub(crate) fn dropout(x: &[f32], p: f32, seed: u64, offset: u64) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(4096).enumerate().for_each(|(c, out)| {
        for (j, v) in out.iter_mut().enumerate() {
            let i = (c * 4096 + j) as u64;
            if philox::uniform(seed, offset, i) >= p {
                *v = x[i as usize] * keep;
            }
        }
    });
    y
}

/// acc += alpha * x.
pub(crate) fn add_scaled_into(acc: &mut [f32], x: &[f32], alpha: f32) {
    acc.par_chunks_mut(16384 * rows_per_task(16384))
        .zip(x.par_chunks(16384 * rows_per_task(16384)))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += alpha * b));
}
