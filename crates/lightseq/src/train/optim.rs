//! Adam and AdamW with torch.optim's semantics, clipping by the global L2 norm as
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

/// First and second moments of one parameter tensor, in f32 like torch's.
#[derive(Debug, Clone, Default)]
pub struct AdamState {
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// One step on `param` with gradient `grad` at learning rate `lr` (torch's formulas:
/// bias-corrected moments, `denom = sqrt(v) / sqrt(1 - b2^t) + eps`).
pub fn adam_step(cfg: &AdamConfig, lr: f64, param: &mut [f32], grad: &[f32], st: &mut AdamState) {
    if st.m.is_empty() {
        st.m = vec![0.0; param.len()];
        st.v = vec![0.0; param.len()];
    }
    st.step += 1;
    let t = st.step as i32;
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    let step_size = lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..param.len() {
        let mut g = grad[i];
        match cfg.kind {
            Kind::AdamW => param[i] *= (1.0 - lr * cfg.weight_decay) as f32,
            Kind::Adam => g += (cfg.weight_decay as f32) * param[i],
        }
        st.m[i] = st.m[i] * cfg.beta1 as f32 + (1.0 - cfg.beta1 as f32) * g;
        st.v[i] = st.v[i] * cfg.beta2 as f32 + (1.0 - cfg.beta2 as f32) * g * g;
        let denom = (st.v[i].sqrt() as f64 / bc2_sqrt + cfg.eps) as f32;
        param[i] -= (step_size as f32) * st.m[i] / denom;
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`, as
/// torch.nn.utils.clip_grad_norm_ (coefficient `max_norm / (norm + 1e-6)`, applied when
/// below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let total: f64 = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x = (*x as f64 * coef) as f32);
        }
    }
    total
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
