//! GPT2 causal-LM training on the CPU (f32): forward with the activations the backward
//! needs, the full backward pass, label-smoothed loss over next tokens, Adam/AdamW updates.
//! The reference for the GPU trainer; checked against HF transformers + torch.optim.

use super::grad::{attention_backward, embedding_backward, layer_norm_backward, linear_backward};
use super::loss::label_smoothed_cross_entropy;
use super::optim::{adam_step, clip_grad_norm, AdamConfig, AdamState};
use crate::backend::cpu;
use crate::error::{Error, Result};
use crate::io::ModelDir;
use crate::models::gpt2::Gpt2Config;
use crate::nn::transpose;
use crate::ops::{self, Activation};
use crate::tensor::{DType, Device, Tensor};

/// One parameter: its HF name, its shape as the checkpoint stores it, whether it is a
/// Conv1D weight (kept transposed, [out, in], for compute), values, gradient, optimizer state.
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub conv1d: bool,
    pub value: Vec<f32>,
    pub grad: Vec<f32>,
    pub state: AdamState,
}

/// Statistics of one training step.
#[derive(Debug, Clone)]
pub struct StepStats {
    pub loss: f64,
    pub nll_loss: f64,
    pub tokens: usize,
    pub grad_norm: f64,
}

/// A GPT2 model being trained.
pub struct Gpt2Trainer {
    pub cfg: Gpt2Config,
    act: Activation,
    pub params: Vec<Param>,
}

const EPS_DEFAULT: f32 = 1e-5;

impl Gpt2Trainer {
    /// Loads a GPT2 checkpoint's weights (f32) for training.
    pub fn load(dir: &ModelDir) -> Result<Self> {
        let cfg: Gpt2Config = crate::models::parse_config_pub(dir)?;
        let act = Activation::from_hf(&cfg.activation_function)?;
        let ck = &dir.checkpoint;
        let prefix = if ck.contains("transformer.wte.weight") {
            "transformer."
        } else {
            ""
        };
        let (h, inner) = (cfg.n_embd, cfg.n_inner.unwrap_or(4 * cfg.n_embd));
        let mut params = Vec::new();
        let mut add = |name: String, shape: Vec<usize>, conv1d: bool| -> Result<()> {
            let v = ck.read_f32(&name, &shape)?;
            let value = if conv1d {
                transpose(&v, shape[0], shape[1])
            } else {
                v
            };
            let n = value.len();
            params.push(Param {
                name,
                shape,
                conv1d,
                value,
                grad: vec![0.0; n],
                state: AdamState::default(),
            });
            Ok(())
        };
        add(
            format!("{prefix}wte.weight"),
            vec![cfg.vocab_size, h],
            false,
        )?;
        add(
            format!("{prefix}wpe.weight"),
            vec![cfg.n_positions, h],
            false,
        )?;
        for i in 0..cfg.n_layer {
            let p = format!("{prefix}h.{i}.");
            add(format!("{p}ln_1.weight"), vec![h], false)?;
            add(format!("{p}ln_1.bias"), vec![h], false)?;
            add(format!("{p}attn.c_attn.weight"), vec![h, 3 * h], true)?;
            add(format!("{p}attn.c_attn.bias"), vec![3 * h], false)?;
            add(format!("{p}attn.c_proj.weight"), vec![h, h], true)?;
            add(format!("{p}attn.c_proj.bias"), vec![h], false)?;
            add(format!("{p}ln_2.weight"), vec![h], false)?;
            add(format!("{p}ln_2.bias"), vec![h], false)?;
            add(format!("{p}mlp.c_fc.weight"), vec![h, inner], true)?;
            add(format!("{p}mlp.c_fc.bias"), vec![inner], false)?;
            add(format!("{p}mlp.c_proj.weight"), vec![inner, h], true)?;
            add(format!("{p}mlp.c_proj.bias"), vec![h], false)?;
        }
        add(format!("{prefix}ln_f.weight"), vec![h], false)?;
        add(format!("{prefix}ln_f.bias"), vec![h], false)?;
        if !cfg.tie_word_embeddings {
            return Err(Error::Input(
                "GPT2 training supports the tied LM head only".into(),
            ));
        }
        Ok(Gpt2Trainer { cfg, act, params })
    }

    /// Forward and backward over causal-LM rows (predict ids[1:] from ids[:-1]); leaves
    /// gradients in `params` and returns the loss.
    pub fn loss_and_grads(
        &mut self,
        rows: &[Vec<i64>],
        label_smoothing: f64,
    ) -> Result<(f64, f64, usize)> {
        let c = &self.cfg;
        let (h, inner, heads) = (c.n_embd, c.n_inner.unwrap_or(4 * c.n_embd), c.n_head);
        let d = h / heads;
        let eps = c.layer_norm_epsilon as f32;
        let eps = if eps > 0.0 { eps } else { EPS_DEFAULT };
        for p in &mut self.params {
            p.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        let inputs: Vec<&[i64]> = rows
            .iter()
            .map(|r| &r[..r.len().saturating_sub(1)])
            .collect();
        let lengths: Vec<usize> = inputs.iter().map(|r| r.len()).collect();
        let (b, l) = (rows.len(), lengths.iter().copied().max().unwrap_or(0));
        if l == 0 {
            return Err(Error::Input(
                "every training row needs at least two tokens".into(),
            ));
        }
        if l > c.n_positions {
            return Err(Error::Input(format!(
                "a row of {} tokens exceeds the model's {} positions",
                l + 1,
                c.n_positions
            )));
        }
        let n = b * l;
        let mut ids = vec![0i32; n];
        let mut targets = vec![-1i64; n];
        for (bi, r) in rows.iter().enumerate() {
            for i in 0..lengths[bi] {
                if r[i] < 0
                    || r[i] as usize >= c.vocab_size
                    || r[i + 1] < 0
                    || r[i + 1] as usize >= c.vocab_size
                {
                    return Err(Error::Input(format!(
                        "row {bi}: token id outside the vocabulary"
                    )));
                }
                ids[bi * l + i] = r[i] as i32;
                targets[bi * l + i] = r[i + 1];
            }
        }
        let pos: Vec<i32> = (0..n).map(|i| (i % l) as i32).collect();
        let p = |name: &str| {
            self.params
                .iter()
                .position(|q| q.name.ends_with(name))
                .unwrap()
        };
        let wte_i = p("wte.weight");
        let wpe_i = p("wpe.weight");
        // Embeddings.
        let mut x = vec![0f32; n * h];
        for t in 0..n {
            let (a, e) = (ids[t] as usize, pos[t] as usize);
            for j in 0..h {
                x[t * h + j] =
                    self.params[wte_i].value[a * h + j] + self.params[wpe_i].value[e * h + j];
            }
        }
        let base = 2;
        let per_layer = 12;
        let scale_base = if c.scale_attn_weights {
            (d as f32).powf(-0.5)
        } else {
            1.0
        };
        struct Saved {
            x_in: Vec<f32>,
            a: Vec<f32>,
            qkv: Vec<f32>,
            att: Vec<f32>,
            x_mid: Vec<f32>,
            m: Vec<f32>,
            fc_pre: Vec<f32>,
            f: Vec<f32>,
            scale: f32,
        }
        let mut saved = Vec::with_capacity(c.n_layer);
        for li in 0..c.n_layer {
            let q = |k: usize| &self.params[base + li * per_layer + k].value;
            let scale = if c.scale_attn_by_inverse_layer_idx {
                scale_base / (li + 1) as f32
            } else {
                scale_base
            };
            let a = cpu::layer_norm(&x, None, q(0), q(1), eps, n, h);
            let qkv = cpu::linear(&a, q(2), Some(q(3)), Activation::None, n, 3 * h, h);
            let qkv_t = Tensor::from_f32(&qkv, &[b, l, 3 * h], DType::F32, &Device::Cpu)?;
            let att = ops::self_attention(&qkv_t, heads, &lengths, true, scale)?.to_f32_vec()?;
            let o = cpu::linear(&att, q(4), Some(q(5)), Activation::None, n, h, h);
            let x_mid: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
            let m = cpu::layer_norm(&x_mid, None, q(6), q(7), eps, n, h);
            let fc_pre = cpu::linear(&m, q(8), Some(q(9)), Activation::None, n, inner, h);
            let f: Vec<f32> = fc_pre.iter().map(|&z| self.act.apply(z)).collect();
            let f2 = cpu::linear(&f, q(10), Some(q(11)), Activation::None, n, h, inner);
            let x_out: Vec<f32> = x_mid.iter().zip(&f2).map(|(a, b)| a + b).collect();
            saved.push(Saved {
                x_in: std::mem::replace(&mut x, x_out),
                a,
                qkv,
                att,
                x_mid,
                m,
                fc_pre,
                f,
                scale,
            });
        }
        let lnf = base + c.n_layer * per_layer;
        let hf = cpu::layer_norm(
            &x,
            None,
            &self.params[lnf].value,
            &self.params[lnf + 1].value,
            eps,
            n,
            h,
        );
        let logits = cpu::matmul_nt(&hf, &self.params[wte_i].value, n, c.vocab_size, h);
        let out = label_smoothed_cross_entropy(
            &logits,
            &targets,
            c.vocab_size,
            label_smoothing,
            Some(-1),
        );
        // Backward.
        let v = c.vocab_size;
        let dlogits = out.dlogits;
        // dh = dlogits @ wte ; dwte += dlogits^T @ hf
        let mut dwte = std::mem::take(&mut self.params[wte_i].grad);
        let dh = linear_backward(
            &hf,
            &self.params[wte_i].value,
            None,
            Activation::None,
            &dlogits,
            n,
            v,
            h,
            &mut dwte,
            None,
        );
        let (mut dg, mut db) = (vec![0f32; h], vec![0f32; h]);
        let mut dx = layer_norm_backward(
            &x,
            &self.params[lnf].value,
            eps,
            &dh,
            n,
            h,
            &mut dg,
            &mut db,
        );
        add_into(&mut self.params[lnf].grad, &dg);
        add_into(&mut self.params[lnf + 1].grad, &db);
        for li in (0..c.n_layer).rev() {
            let s = &saved[li];
            let k0 = base + li * per_layer;
            // MLP branch: x_out = x_mid + proj(act(fc(LN2(x_mid)))).
            let mut g10 = vec![0f32; h * inner];
            let mut g11 = vec![0f32; h];
            let df = linear_backward(
                &s.f,
                &self.params[k0 + 10].value,
                None,
                Activation::None,
                &dx,
                n,
                h,
                inner,
                &mut g10,
                Some(&mut g11),
            );
            let mut g8 = vec![0f32; inner * h];
            let mut g9 = vec![0f32; inner];
            let dm = linear_backward(
                &s.m,
                &self.params[k0 + 8].value,
                Some(&s.fc_pre),
                self.act,
                &df,
                n,
                inner,
                h,
                &mut g8,
                Some(&mut g9),
            );
            let (mut g6, mut g7) = (vec![0f32; h], vec![0f32; h]);
            let dxm_ln = layer_norm_backward(
                &s.x_mid,
                &self.params[k0 + 6].value,
                eps,
                &dm,
                n,
                h,
                &mut g6,
                &mut g7,
            );
            let dx_mid: Vec<f32> = dx.iter().zip(&dxm_ln).map(|(a, b)| a + b).collect();
            // Attention branch: x_mid = x_in + proj(attn(qkv(LN1(x_in)))).
            let mut g4 = vec![0f32; h * h];
            let mut g5 = vec![0f32; h];
            let datt = linear_backward(
                &s.att,
                &self.params[k0 + 4].value,
                None,
                Activation::None,
                &dx_mid,
                n,
                h,
                h,
                &mut g4,
                Some(&mut g5),
            );
            let (q_, k_, v_) = split3(&s.qkv, n, h);
            let (dq, dk, dv) = attention_backward(
                &q_, &k_, &v_, &datt, b, l, heads, d, &lengths, true, s.scale,
            );
            let dqkv = join3(&dq, &dk, &dv, n, h);
            let mut g2 = vec![0f32; 3 * h * h];
            let mut g3 = vec![0f32; 3 * h];
            let da = linear_backward(
                &s.a,
                &self.params[k0 + 2].value,
                None,
                Activation::None,
                &dqkv,
                n,
                3 * h,
                h,
                &mut g2,
                Some(&mut g3),
            );
            let (mut g0, mut g1) = (vec![0f32; h], vec![0f32; h]);
            let dx_ln = layer_norm_backward(
                &s.x_in,
                &self.params[k0].value,
                eps,
                &da,
                n,
                h,
                &mut g0,
                &mut g1,
            );
            dx = dx_mid.iter().zip(&dx_ln).map(|(a, b)| a + b).collect();
            for (k, g) in [
                (0, g0),
                (1, g1),
                (2, g2),
                (3, g3),
                (4, g4),
                (5, g5),
                (6, g6),
                (7, g7),
                (8, g8),
                (9, g9),
                (10, g10),
                (11, g11),
            ] {
                add_into(&mut self.params[k0 + k].grad, &g);
            }
        }
        // Only real positions carry gradient into the embeddings.
        let mut mask_dx = dx;
        for (bi, &len) in lengths.iter().enumerate() {
            for t in len..l {
                mask_dx[(bi * l + t) * h..(bi * l + t + 1) * h]
                    .iter_mut()
                    .for_each(|g| *g = 0.0);
            }
        }
        embedding_backward(&ids, &mask_dx, h, 1.0, &mut dwte);
        self.params[wte_i].grad = dwte;
        let mut dwpe = std::mem::take(&mut self.params[wpe_i].grad);
        embedding_backward(&pos, &mask_dx, h, 1.0, &mut dwpe);
        self.params[wpe_i].grad = dwpe;
        Ok((out.loss, out.nll_loss, out.tokens))
    }

    /// One update: loss and gradients on `rows`, optional clipping, an Adam(W) step at `lr`.
    pub fn step(
        &mut self,
        rows: &[Vec<i64>],
        label_smoothing: f64,
        clip: Option<f64>,
        opt: &AdamConfig,
        lr: f64,
    ) -> Result<StepStats> {
        let (loss, nll_loss, tokens) = self.loss_and_grads(rows, label_smoothing)?;
        let mut grads: Vec<&mut [f32]> = self.params.iter_mut().map(|p| &mut p.grad[..]).collect();
        let grad_norm = match clip {
            Some(c) if c > 0.0 => clip_grad_norm(&mut grads, c),
            _ => grads
                .iter()
                .flat_map(|g| g.iter())
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt(),
        };
        for p in &mut self.params {
            adam_step(opt, lr, &mut p.value, &p.grad, &mut p.state);
        }
        Ok(StepStats {
            loss,
            nll_loss,
            tokens,
            grad_norm,
        })
    }

    /// The weights under their HF names and stored shapes (Conv1D weights back to [in, out]).
    pub fn state_dict(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.params
            .iter()
            .map(|p| {
                let v = if p.conv1d {
                    transpose(&p.value, p.shape[1], p.shape[0])
                } else {
                    p.value.clone()
                };
                (p.name.clone(), p.shape.clone(), v)
            })
            .collect()
    }
}

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

/// Splits packed [n, 3h] into q, k, v [n, h] each.
fn split3(qkv: &[f32], n: usize, h: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut q, mut k, mut v) = (
        Vec::with_capacity(n * h),
        Vec::with_capacity(n * h),
        Vec::with_capacity(n * h),
    );
    for r in qkv.chunks(3 * h) {
        q.extend_from_slice(&r[..h]);
        k.extend_from_slice(&r[h..2 * h]);
        v.extend_from_slice(&r[2 * h..]);
    }
    (q, k, v)
}

fn join3(q: &[f32], k: &[f32], v: &[f32], n: usize, h: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * n * h);
    for i in 0..n {
        out.extend_from_slice(&q[i * h..(i + 1) * h]);
        out.extend_from_slice(&k[i * h..(i + 1) * h]);
        out.extend_from_slice(&v[i * h..(i + 1) * h]);
    }
    out
}
