//! Training, CPU reference first: backward passes of the layers the models use, the
//! label-smoothed cross entropy, Adam/AdamW with torch.optim's semantics, gradient clipping
//! and learning-rate schedules. Each is checked against torch autograd / torch.optim
//! (tests/training_math.rs, fixtures from scripts/make_grad_fixtures.py). The trainer that
//! drives them over whole models builds on these.

pub mod gpt2;
pub mod grad;
pub mod loss;
pub mod optim;
