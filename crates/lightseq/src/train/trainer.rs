//! The update loop: gradient accumulation over micro-batches, dynamic loss scaling for f16,
//! clipping by the global norm, Adam(W) with a schedule, and checkpoints (an HF model
//! directory plus optimizer state) that `--resume` continues from.

use super::layers::Dropout;
use super::models::{Example, Net, PendingStats};
use super::ops::AdamHyper;
use super::optim::{AdamConfig, Kind, Schedule};
use super::params::NamedTensors;
use crate::error::{Error, Result};
use crate::io::safetensors;
use crate::tensor::DType;
use std::path::Path;

/// Hyper-parameters of the update.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub lr: f64,
    pub schedule: Schedule,
    pub optimizer: AdamConfig,
    /// Clip to this global L2 norm (None: no clipping).
    pub clip_norm: Option<f64>,
    pub label_smoothing: f64,
    /// Dropout rates (hidden, attention, activation).
    pub dropout: (f32, f32, f32),
    pub seed: u64,
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    pub step: u64,
    /// Mean loss over the update's predicted tokens, from its own forward pass.
    pub loss: f64,
    pub nll_loss: f64,
    pub tokens: usize,
    /// Norm of the averaged gradient, before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// False when an f16 overflow skipped the update (the loss scale was halved).
    pub applied: bool,
    pub loss_scale: f64,
}

/// A model and its optimizer state.
pub struct Trainer {
    pub net: Net,
    pub cfg: TrainConfig,
    /// Updates applied so far.
    pub step: u64,
    /// Loss scale for f16 (1 otherwise), grown after `SCALE_WINDOW` clean updates.
    pub loss_scale: f64,
    clean_steps: u64,
    /// Philox offset of the next dropout call.
    rng_offset: u64,
}

const SCALE_WINDOW: u64 = 2000;

impl Trainer {
    pub fn new(net: Net, cfg: TrainConfig) -> Self {
        let loss_scale = if net.params.dtype == DType::F16 {
            128.0
        } else {
            1.0
        };
        Trainer {
            net,
            cfg,
            step: 0,
            loss_scale,
            clean_steps: 0,
            rng_offset: 0,
        }
    }

    fn dropout(&self) -> Dropout {
        let (h, a, act) = self.cfg.dropout;
        Dropout {
            hidden: h,
            attention: a,
            activation: act,
            seed: self.cfg.seed,
            offset: std::cell::Cell::new(self.rng_offset),
        }
    }

    /// Number of predicted tokens in `rows` (the loss's denominator).
    pub fn targets(&self, rows: &[Example]) -> usize {
        rows.iter()
            .map(|r| match r {
                Example::Seq2Seq { tgt, .. } => tgt.len(),
                Example::Causal { ids } => ids.len().saturating_sub(1),
                Example::Masked { labels, .. } => labels.iter().filter(|&&l| l >= 0).count(),
                Example::Classify { .. } | Example::Image { .. } => 1,
            })
            .sum()
    }

    /// One update over `micro` batches (gradients summed, then averaged over all their
    /// predicted tokens, as fairseq's `--update-freq`).
    pub fn update(&mut self, micro: &[&[Example]]) -> Result<StepStats> {
        let total: usize = micro.iter().map(|m| self.targets(m)).sum();
        if total == 0 {
            return Err(Error::Input("the batch predicts no token".into()));
        }
        if micro.len() > 1 {
            // Several batches' gradients are summed: in f32 from the first write on.
            self.net.params.keep_all_wide();
        }
        self.net.params.zero_grads()?;
        let drop = self.dropout();
        let eps = self.cfg.label_smoothing as f32;
        let gs = (self.loss_scale / total as f64) as f32;
        let mut pending = Vec::with_capacity(micro.len());
        for m in micro {
            pending.push(self.net.accumulate_grads_pending(m, eps, gs, &drop)?);
        }
        self.rng_offset = drop.offset.get();
        let grad_norm = self.net.params.grad_norm(1.0 / self.loss_scale)?;
        let lr = self.cfg.schedule.lr(self.cfg.lr, self.step + 1);
        let mut stats = StepStats {
            step: self.step + 1,
            loss: 0.0,
            nll_loss: 0.0,
            tokens: total,
            grad_norm,
            lr,
            applied: true,
            loss_scale: self.loss_scale,
        };
        // The losses are read once the update's last work is enqueued: reading them waits
        // for the device.
        let read_losses = |stats: &mut StepStats, pending: Vec<PendingStats>| -> Result<()> {
            let (mut loss, mut nll) = (0f64, 0f64);
            for p in pending {
                let s = p.read()?;
                loss += s.loss_sum;
                nll += s.nll_sum;
            }
            stats.loss = loss / total as f64;
            stats.nll_loss = nll / total as f64;
            Ok(())
        };
        if !grad_norm.is_finite() {
            read_losses(&mut stats, pending)?;
            if self.net.params.dtype != DType::F16 || self.loss_scale <= 1e-4 {
                return Err(Error::Input(format!(
                    "the gradient is not finite at update {} (loss {})",
                    self.step + 1,
                    stats.loss
                )));
            }
            self.loss_scale /= 2.0;
            self.clean_steps = 0;
            stats.applied = false;
            return Ok(stats);
        }
        let clip = match self.cfg.clip_norm {
            Some(c) if c > 0.0 => super::optim::clip_coefficient(grad_norm, c),
            _ => 1.0,
        };
        let o = &self.cfg.optimizer;
        self.net.params.adam(&AdamHyper {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            decoupled: o.kind == Kind::AdamW,
            step: 0,
            grad_scale: (clip / self.loss_scale) as f32,
        })?;
        read_losses(&mut stats, pending)?;
        self.step += 1;
        if self.net.params.dtype == DType::F16 {
            self.clean_steps += 1;
            if self.clean_steps >= SCALE_WINDOW {
                self.loss_scale *= 2.0;
                self.clean_steps = 0;
            }
        }
        Ok(stats)
    }

    /// Mean loss and nll over `rows` without updating (dropout off).
    pub fn evaluate(&mut self, batches: &[&[Example]]) -> Result<(f64, f64, usize)> {
        let (mut loss, mut nll, mut tokens) = (0f64, 0f64, 0usize);
        for b in batches {
            let s = self.net.accumulate_grads(
                b,
                self.cfg.label_smoothing as f32,
                0.0,
                &Dropout::off(),
            )?;
            loss += s.loss_sum;
            nll += s.nll_sum;
            tokens += s.tokens;
        }
        self.net.params.zero_grads()?;
        let t = tokens.max(1) as f64;
        Ok((loss / t, nll / t, tokens))
    }

    /// Writes `dir/model.safetensors` (+ config.json, `config`), `dir/optimizer.safetensors`
    /// and `dir/trainer_state.json`. Tensors of `extra` (e.g. buffers of the initial
    /// checkpoint) are written alongside the parameters.
    pub fn save(
        &self,
        dir: &Path,
        config: &serde_json::Value,
        extra: &NamedTensors,
        state: serde_json::Value,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut sd = self.net.params.state_dict()?;
        let have: std::collections::HashSet<String> = sd.iter().map(|t| t.0.clone()).collect();
        sd.extend(extra.iter().filter(|t| !have.contains(&t.0)).cloned());
        write(&dir.join("model.safetensors"), &sd)?;
        let mut cfg = config.clone();
        if let Some(o) = cfg.as_object_mut() {
            o.insert("torch_dtype".into(), "float32".into());
            o.remove("dtype");
        }
        let p = dir.join("config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap())
            .map_err(|e| Error::io(&p, e))?;
        write(
            &dir.join("optimizer.safetensors"),
            &self.net.params.optimizer_state()?,
        )?;
        let mut st = state;
        if let Some(o) = st.as_object_mut() {
            o.insert("step".into(), self.step.into());
            o.insert("loss_scale".into(), self.loss_scale.into());
            o.insert("rng_offset".into(), self.rng_offset.into());
            o.insert("clean_steps".into(), self.clean_steps.into());
        }
        let p = dir.join("trainer_state.json");
        std::fs::write(&p, serde_json::to_string_pretty(&st).unwrap()).map_err(|e| Error::io(&p, e))
    }

    /// Restores optimizer state and counters from a directory [`Trainer::save`] wrote (the
    /// weights come from loading that directory as the model). Returns trainer_state.json.
    pub fn restore(&mut self, dir: &Path) -> Result<serde_json::Value> {
        let p = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let st: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: {e}", p.display())))?;
        let f = safetensors::SafeTensorsFile::open(&dir.join("optimizer.safetensors"))?;
        self.net.params.load_optimizer_state(&f)?;
        let g = |k: &str| st.get(k).and_then(serde_json::Value::as_f64);
        self.step = g("step").unwrap_or(0.0) as u64;
        self.loss_scale = g("loss_scale").unwrap_or(self.loss_scale);
        self.rng_offset = g("rng_offset").unwrap_or(0.0) as u64;
        self.clean_steps = g("clean_steps").unwrap_or(0.0) as u64;
        Ok(st)
    }
}

fn write(path: &Path, t: &NamedTensors) -> Result<()> {
    let list: Vec<(&str, &[usize], &[f32])> = t
        .iter()
        .map(|(n, s, v)| (n.as_str(), s.as_slice(), v.as_slice()))
        .collect();
    safetensors::write_f32(path, &list)
}
