use crate::error::Result;
use crate::ops::{AttentionOptions, Heads};
use rayon::prelude::*;

/// Reference attention: per (batch, head, query), explicit scores over the visible keys,
/// softmax with an f64 sum, weighted values.
pub(crate) fn attention(q: &Heads, k: &Heads, v: &Heads, o: &AttentionOptions) -> Result<Vec<f32>> {
    let (qd, kd, vd) = (
        q.tensor.cpu_f32("attention")?,
        k.tensor.cpu_f32("attention")?,
        v.tensor.cpu_f32("attention")?,
    );
    let bias = match &o.bias {
        Some(b) => Some((b.table.cpu_f32("attention")?, &b.buckets)),
        None => None,
    };
    let (qs, ks) = (q.tensor.shape(), k.tensor.shape());
    let (batch, len_q, len_k) = (qs[0], qs[1], ks[1]);
    // Query sequences per key/value sequence (shared keys, see ops::attention).
    let kv_div = batch / ks[0].max(1);
    let (qw, kw, vw) = (qs[2], ks[2], v.tensor.shape()[2]);
    let d = o.head_dim;
    let group = o.heads / o.kv_heads;
    let width = o.heads * d;
    let mut out = vec![0f32; batch * len_q * width];
    out.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, orow)| {
            let (b, i) = (row / len_q, row % len_q);
            let bk = b / kv_div;
            let pos = o.q_offset + i;
            let (k0, mut k1) = o.key_ranges[b];
            if o.causal {
                k1 = k1.min(pos + 1);
            }
            let k0 = match o.window {
                Some(w) => k0.max((pos + 1).saturating_sub(w)),
                None => k0,
            };
            if k0 >= k1 {
                return;
            }
            let mut scores = vec![0f32; k1 - k0];
            for h in 0..o.heads {
                let kh = h / group;
                let qr = &qd[(b * len_q + i) * qw + q.col + h * d..][..d];
                let mut max = f32::NEG_INFINITY;
                for (s, j) in scores.iter_mut().zip(k0..k1) {
                    let kr = &kd[(bk * len_k + j) * kw + k.col + kh * d..][..d];
                    let mut x = qr.iter().zip(kr).map(|(a, c)| a * c).sum::<f32>() * o.scale;
                    if let Some((table, buckets)) = bias {
                        let idx = j + o.q_offset + len_q - 1 - pos;
                        x += table[buckets[idx] as usize * o.heads + h];
                    }
                    *s = x;
                    max = max.max(x);
                }
                let mut sum = 0f64;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let oh = &mut orow[h * d..(h + 1) * d];
                for (&p, j) in scores.iter().zip(k0..k1) {
                    let w = (p as f64 / sum) as f32;
                    let vr = &vd[(bk * len_k + j) * vw + v.col + kh * d..][..d];
                    oh.iter_mut().zip(vr).for_each(|(a, x)| *a += w * x);
                }
            }
        });
    Ok(out)
}
