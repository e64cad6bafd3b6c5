use crate::ops::AttentionGeometry;
use rayon::prelude::*;

/// Reference attention: per (batch, head), scores, masked softmax in f64 sums, weighted values.
pub(crate) fn self_attention(qkv: &[f32], lengths: &[usize], g: &AttentionGeometry) -> Vec<f32> {
    let hidden = g.heads * g.head_dim;
    let (l, d) = (g.len, g.head_dim);
    let mut out = vec![0f32; g.batch * l * hidden];
    // One task per (batch, head) writes a [len, head_dim] block, scattered back afterwards.
    let blocks: Vec<Vec<f32>> = (0..g.batch * g.heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / g.heads, bh % g.heads);
            let n_keys = lengths[b];
            let row = |t: usize, part: usize| {
                let base = (b * l + t) * 3 * hidden + part * hidden + h * d;
                &qkv[base..base + d]
            };
            let mut block = vec![0f32; l * d];
            let mut scores = vec![0f32; l];
            for i in 0..l {
                let visible = if g.causal { n_keys.min(i + 1) } else { n_keys };
                if visible == 0 {
                    continue;
                }
                let q = row(i, 0);
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores[..visible].iter_mut().enumerate() {
                    let k = row(j, 1);
                    *s = q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * g.scale;
                    max = max.max(*s);
                }
                let mut sum = 0f64;
                for s in &mut scores[..visible] {
                    *s = (*s - max).exp();
                    sum += *s as f64;
                }
                let o = &mut block[i * d..(i + 1) * d];
                for (j, &p) in scores[..visible].iter().enumerate() {
                    let w = (p as f64 / sum) as f32;
                    o.iter_mut().zip(row(j, 2)).for_each(|(a, v)| *a += w * v);
                }
            }
            block
        })
        .collect();
    for (bh, block) in blocks.iter().enumerate() {
        let (b, h) = (bh / g.heads, bh % g.heads);
        for i in 0..l {
            let dst = (b * l + i) * hidden + h * d;
            out[dst..dst + d].copy_from_slice(&block[i * d..(i + 1) * d]);
        }
    }
    out
}
