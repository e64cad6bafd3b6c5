//! Backward passes on the CPU (f32, row-major), the reference for every device.
//! Conventions: `dy` is the gradient of the output; functions return input gradients and
//! accumulate parameter gradients into the given buffers (`+=`), so a parameter used twice
//! (tied embeddings) sums its gradients.

use crate::ops::Activation;

/// Derivative of an activation at its input `x`.
pub fn activation_grad(act: Activation, x: f32) -> f32 {
    let x64 = x as f64;
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    (match act {
        Activation::None => 1.0,
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            let cdf = 0.5 * (1.0 + libm::erf(x64 / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x64 * pdf
        }
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = c * (x64 + 0.044715 * x64.powi(3));
            let t = u.tanh();
            0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x64 * x64)
        }
        Activation::Silu => {
            let s = sig(x64);
            s + x64 * s * (1.0 - s)
        }
        Activation::QuickGelu => {
            let s = sig(1.702 * x64);
            s + 1.702 * x64 * s * (1.0 - s)
        }
        Activation::Tanh => 1.0 - x64.tanh().powi(2),
    }) as f32
}

/// Backward of `y = act(x @ w^T + b)`, x [m, k], w [n, k]. `pre` holds the pre-activation
/// `x @ w^T + b` (needed unless `act` is None). Returns dx; adds into dw [n, k], db [n].
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    w: &[f32],
    pre: Option<&[f32]>,
    act: Activation,
    dy: &[f32],
    m: usize,
    n: usize,
    k: usize,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Vec<f32> {
    let dz: Vec<f32> = match (act, pre) {
        (Activation::None, _) => dy.to_vec(),
        (_, Some(p)) => dy
            .iter()
            .zip(p)
            .map(|(g, &z)| g * activation_grad(act, z))
            .collect(),
        (_, None) => panic!("linear_backward: pre-activations are needed for {act:?}"),
    };
    // dx [m, k] = dz [m, n] @ w [n, k]
    let mut dx = vec![0f32; m * k];
    for i in 0..m {
        for j in 0..n {
            let g = dz[i * n + j];
            if g != 0.0 {
                let wr = &w[j * k..(j + 1) * k];
                dx[i * k..(i + 1) * k]
                    .iter_mut()
                    .zip(wr)
                    .for_each(|(a, b)| *a += g * b);
            }
        }
    }
    // dw [n, k] += dz^T @ x
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let g = dz[i * n + j];
            if g != 0.0 {
                dw[j * k..(j + 1) * k]
                    .iter_mut()
                    .zip(xr)
                    .for_each(|(a, b)| *a += g * b);
            }
        }
    }
    if let Some(db) = db {
        for i in 0..m {
            db.iter_mut()
                .zip(&dz[i * n..(i + 1) * n])
                .for_each(|(a, b)| *a += b);
        }
    }
    dx
}

/// Backward of `y = LN(x)` over rows of `h` (x already includes any residual). Returns dx;
/// adds into dgamma, dbeta.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &[f32],
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    rows: usize,
    h: usize,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    let mut dx = vec![0f32; rows * h];
    for r in 0..rows {
        let xr = &x[r * h..(r + 1) * h];
        let g = &dy[r * h..(r + 1) * h];
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let xhat: Vec<f64> = xr.iter().map(|&v| (v as f64 - mean) * inv).collect();
        let mut sum_dxhat = 0f64;
        let mut sum_dxhat_xhat = 0f64;
        for j in 0..h {
            dgamma[j] += (g[j] as f64 * xhat[j]) as f32;
            dbeta[j] += g[j];
            let dxh = g[j] as f64 * gamma[j] as f64;
            sum_dxhat += dxh;
            sum_dxhat_xhat += dxh * xhat[j];
        }
        for j in 0..h {
            let dxh = g[j] as f64 * gamma[j] as f64;
            dx[r * h + j] =
                (inv / h as f64 * (h as f64 * dxh - sum_dxhat - xhat[j] * sum_dxhat_xhat)) as f32;
        }
    }
    dx
}

/// Backward of multi-head attention over packed q, k, v [batch, len, heads * d] each, with
/// per-sequence key lengths and an optional causal mask, scores scaled by `scale`.
/// Returns (dq, dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    batch: usize,
    len: usize,
    heads: usize,
    d: usize,
    lengths: &[usize],
    causal: bool,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hid = heads * d;
    let at = |b: usize, i: usize, h: usize| (b * len + i) * hid + h * d;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    for (b, &n_keys) in lengths.iter().enumerate().take(batch) {
        for h in 0..heads {
            for i in 0..len {
                let visible = if causal { n_keys.min(i + 1) } else { n_keys };
                if visible == 0 {
                    continue;
                }
                let qi = at(b, i, h);
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = at(b, j, h);
                        (0..d)
                            .map(|e| q[qi + e] as f64 * k[kj + e] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp() / z).collect();
                let oi = at(b, i, h);
                // dp_j = dout . v_j ; ds_j = p_j (dp_j - sum_l p_l dp_l)
                let dp: Vec<f64> = (0..visible)
                    .map(|j| {
                        let vj = at(b, j, h);
                        (0..d).map(|e| dout[oi + e] as f64 * v[vj + e] as f64).sum()
                    })
                    .collect();
                let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..visible {
                    let vj = at(b, j, h);
                    let kj = at(b, j, h);
                    let ds = p[j] * (dp[j] - dot) * scale as f64;
                    for e in 0..d {
                        dv[vj + e] += (p[j] * dout[oi + e] as f64) as f32;
                        dq[qi + e] += (ds * k[kj + e] as f64) as f32;
                        dk[kj + e] += (ds * q[qi + e] as f64) as f32;
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Backward of an embedding lookup: adds each row of `dy` [n, h] into `dtable` at its id,
/// times `scale`.
pub fn embedding_backward(ids: &[i32], dy: &[f32], h: usize, scale: f32, dtable: &mut [f32]) {
    for (i, &id) in ids.iter().enumerate() {
        let r = id as usize;
        dtable[r * h..(r + 1) * h]
            .iter_mut()
            .zip(&dy[i * h..(i + 1) * h])
            .for_each(|(a, b)| *a += scale * b);
    }
}
