//! Optimizer settings (Adam and AdamW with torch.optim's semantics; the update itself is
//! the fused `train::ops::adam_step`), clipping by the global L2 norm as
//! torch.nn.utils.clip_grad_norm_, and learning-rate schedules.

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// torch.optim.Adam: weight decay added to the gradient.
    Adam,
    /// torch.optim.AdamW: decoupled weight decay.
    AdamW,
}

/// Optimizer hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamConfig {
    pub kind: Kind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The factor torch.nn.utils.clip_grad_norm_ scales gradients by: `max_norm / (norm + 1e-6)`
/// when that is below 1, else 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// `lr` at every step.
    Constant,
    /// fairseq's inverse_sqrt: linear warmup from 0 to `lr` over `warmup` updates, then
    /// `lr * sqrt(warmup / updates)`.
    InverseSqrt { warmup: u64 },
    /// HF's linear schedule: warmup to `lr`, then linear decay to 0 at `total`.
    Linear { warmup: u64, total: u64 },
    /// HF's cosine schedule: warmup to `lr`, then half a cosine to 0 at `total`.
    Cosine { warmup: u64, total: u64 },
}

impl Schedule {
    /// The learning rate used for update number `step` (1-based).
    pub fn lr(&self, base: f64, step: u64) -> f64 {
        let s = step as f64;
        match *self {
            Schedule::Constant => base,
            Schedule::InverseSqrt { warmup } => {
                // fairseq sets the rate for the next update after each one: update `step`
                // uses the value for `step - 1` completed updates, from 0 during warmup.
                let c = s - 1.0;
                if c < warmup as f64 {
                    base * c / warmup as f64
                } else {
                    base * (warmup.max(1) as f64).sqrt() / c.max(1.0).sqrt()
                }
            }
            Schedule::Linear { warmup, total } => {
                // HF evaluates its lambda at the scheduler's step count, which is step - 1
                // when the update number is `step`.
                let c = s - 1.0;
                if c < warmup as f64 {
                    base * c / (warmup.max(1) as f64)
                } else {
                    base * ((total as f64 - c) / ((total - warmup).max(1) as f64)).max(0.0)
                }
            }
            Schedule::Cosine { warmup, total } => {
                let c = s - 1.0;
                if c < warmup as f64 {
                    base * c / (warmup.max(1) as f64)
                } else {
                    let progress = (c - warmup as f64) / ((total - warmup).max(1) as f64);
                    base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
                }
            }
        }
    }
}
