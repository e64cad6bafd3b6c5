//! CPU bodies: f32 compute, rayon threads, GEMM from the `gemm` crate.

mod attention;
mod gemm;
pub(crate) mod train;

pub(crate) use attention::attention;
pub(crate) use gemm::{linear, matmul, matmul_strided};

use crate::error::{Error, Result};
use crate::ops::Activation;
use rayon::prelude::*;

/// Rows per rayon task for row-wise kernels, so tiny rows do not drown in scheduling.
fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

pub(crate) fn bias_act(y: &mut [f32], b: Option<&[f32]>, act: Activation, n: usize) {
    if b.is_none() && act == Activation::None {
        return;
    }
    y.par_chunks_mut(n * rows_per_task(n)).for_each(|rows| {
        for row in rows.chunks_mut(n) {
            if let Some(b) = b {
                row.iter_mut().zip(b).for_each(|(v, bb)| *v += bb);
            }
            if act != Activation::None {
                row.iter_mut().for_each(|v| *v = act.apply(*v));
            }
        }
    });
}

pub(crate) fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    rows: usize,
    h: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * h];
    out.par_chunks_mut(h * rows_per_task(h))
        .enumerate()
        .for_each(|(task, chunk)| {
            let row0 = task * rows_per_task(h);
            for (i, o) in chunk.chunks_mut(h).enumerate() {
                let r = row0 + i;
                let xr = &x[r * h..(r + 1) * h];
                o.copy_from_slice(xr);
                if let Some(res) = residual {
                    o.iter_mut()
                        .zip(&res[r * h..(r + 1) * h])
                        .for_each(|(a, b)| *a += b);
                }
                let mean = o.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
                let var = o.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
                let inv = 1.0 / (var + eps as f64).sqrt();
                for (j, v) in o.iter_mut().enumerate() {
                    *v = ((*v as f64 - mean) * inv) as f32 * gamma[j] + beta[j];
                }
            }
        });
    out
}

pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.par_iter().zip(b.par_iter()).map(|(x, y)| x + y).collect()
}

/// One lookup: the table's values, the ids, and the table's row count.
pub(crate) type Lookup<'a> = (&'a [f32], &'a [i32], usize);

pub(crate) fn embed(parts: &[Lookup<'_>], n: usize, h: usize, scale: f32) -> Result<Vec<f32>> {
    for (_, ids, rows) in parts {
        if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= *rows) {
            return Err(Error::Input(format!(
                "id {bad} outside an embedding table of {rows} rows"
            )));
        }
    }
    let mut out = vec![0f32; n * h];
    out.par_chunks_mut(h).enumerate().for_each(|(i, o)| {
        for (k, (table, ids, _)) in parts.iter().enumerate() {
            let r = ids[i] as usize;
            let s = if k == 0 { scale } else { 1.0 };
            o.iter_mut()
                .zip(&table[r * h..(r + 1) * h])
                .for_each(|(a, b)| *a += s * b);
        }
    });
    Ok(out)
}

pub(crate) fn rms_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    eps: f32,
    rows: usize,
    h: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * h];
    out.par_chunks_mut(h).enumerate().for_each(|(r, o)| {
        o.copy_from_slice(&x[r * h..(r + 1) * h]);
        if let Some(res) = residual {
            o.iter_mut()
                .zip(&res[r * h..(r + 1) * h])
                .for_each(|(a, b)| *a += b);
        }
        let ms = o.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        o.iter_mut()
            .zip(gamma)
            .for_each(|(v, g)| *v = (*v as f64 * inv) as f32 * g);
    });
    out
}

pub(crate) fn glu(x: &[f32], act: Activation, rows: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    out.par_chunks_mut(n).enumerate().for_each(|(r, o)| {
        let (gate, up) = x[r * 2 * n..(r + 1) * 2 * n].split_at(n);
        for ((v, g), u) in o.iter_mut().zip(gate).zip(up) {
            *v = act.apply(*g) * u;
        }
    });
    out
}

/// Layout of one rotary call (see `ops::rotary`).
pub(crate) struct RotaryGeometry {
    pub rows: usize,
    pub width: usize,
    pub col: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub half: usize,
    pub attention_scaling: f32,
}

pub(crate) fn rotary(x: &mut [f32], positions: &[i32], inv_freq: &[f32], g: &RotaryGeometry) {
    x.par_chunks_mut(g.width)
        .take(g.rows)
        .enumerate()
        .for_each(|(r, row)| {
            let pos = positions[r] as f32;
            for p in 0..g.half {
                // f32 angle, as HF computes position * inv_freq.
                let angle = pos * inv_freq[p];
                let (sin, cos) = (
                    angle.sin() * g.attention_scaling,
                    angle.cos() * g.attention_scaling,
                );
                for h in 0..g.heads {
                    let base = g.col + h * g.head_dim;
                    let (a, b) = (row[base + p], row[base + p + g.half]);
                    row[base + p] = a * cos - b * sin;
                    row[base + p + g.half] = b * cos + a * sin;
                }
            }
        });
}

/// Layout of one `ops::write_rows` call.
pub(crate) struct RowCopy {
    pub batch: usize,
    pub rows: usize,
    pub width: usize,
    pub src_width: usize,
    pub src_col: usize,
    pub dst_rows: usize,
    pub dst_width: usize,
    pub dst_row: usize,
    pub dst_col: usize,
}

pub(crate) fn write_rows(dst: &mut [f32], src: &[f32], g: &RowCopy) {
    for b in 0..g.batch {
        for t in 0..g.rows {
            let s = (b * g.rows + t) * g.src_width + g.src_col;
            let d = (b * g.dst_rows + g.dst_row + t) * g.dst_width + g.dst_col;
            dst[d..d + g.width].copy_from_slice(&src[s..s + g.width]);
        }
    }
}

pub(crate) fn logprob_topk(
    x: &[f32],
    rows: usize,
    vocab: usize,
    k: usize,
    mask_eos: Option<crate::ops::EosMask>,
) -> crate::ops::TopK {
    let mut out = crate::ops::TopK {
        k,
        logprobs: Vec::with_capacity(rows * k),
        ids: Vec::with_capacity(rows * k),
        lse: Vec::with_capacity(rows),
    };
    for r in 0..rows {
        let row = &x[r * vocab..(r + 1) * vocab];
        let mask = mask_eos.filter(|m| m.rows[r]);
        let value = |j: usize| {
            if mask.is_some_and(|m| m.eos.contains(&(j as i64))) {
                f32::NEG_INFINITY
            } else {
                row[j]
            }
        };
        let renormalize = mask.is_some_and(|m| m.renormalize);
        let summed = |j: usize| if renormalize { value(j) } else { row[j] };
        let m = (0..vocab).map(summed).fold(f32::NEG_INFINITY, f32::max);
        // Summed in f64: large vocabularies lose ~1e-4 in an f32 sum.
        let lse = m
            + ((0..vocab)
                .map(|j| (summed(j) - m).exp() as f64)
                .sum::<f64>()
                .ln() as f32);
        let mut idx: Vec<usize> = (0..vocab).collect();
        let cmp = |a: &usize, b: &usize| value(*b).total_cmp(&value(*a)).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_by(cmp);
        for j in idx {
            out.logprobs.push(value(j) - lse);
            out.ids.push(j as i32);
        }
        out.lse.push(lse);
    }
    out
}
