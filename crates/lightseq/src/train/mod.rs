//! Training: device-generic ops with their backward passes (`ops`, and the LM head's over
//! padded logits in `head`), layers and models built
//! on them (`layers`, `models`, `vit`), parameters and optimizer state (`params`), the update
//! loop (`trainer`), optimizer settings and schedules (`optim`), Philox dropout (`philox`).
//! The ops are checked against torch autograd / torch.optim (tests/training_math.rs), the
//! models' gradients and loss curves against HF transformers (tests/training_grads.rs,
//! tests/training.rs).

pub mod grad;
pub mod head;
pub mod layers;
pub mod models;
pub mod ops;
pub mod optim;
pub mod params;
pub mod philox;
pub mod trainer;
pub mod vit;
