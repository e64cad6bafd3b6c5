//! Training: device-generic ops with their backward passes (`ops`), the CPU reference
//! backward pieces (`grad`), the label-smoothed cross entropy, Adam/AdamW with
//! torch.optim's semantics, gradient clipping, learning-rate schedules and Philox dropout.
//! Each is checked against torch autograd / torch.optim (tests/training_math.rs, fixtures
//! from scripts/make_grad_fixtures.py).

pub mod grad;
pub mod layers;
pub mod loss;
pub mod models;
pub mod ops;
pub mod optim;
pub mod params;
pub mod philox;
pub mod trainer;
pub mod vit;
