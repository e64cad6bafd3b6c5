//! lightseq: Transformer inference and training on CPU and CUDA, reading and writing
//! Hugging Face checkpoints directly.
//!
//! The ladder, each rung using only those below it: [`tensor`] (tensors, dtypes, devices) ->
//! `backend` (op bodies for the CPU and CUDA) -> [`ops`] (the op set: shape checks and
//! dispatch) -> [`nn`] (layers) -> [`models`] (architectures) ; [`io`] reads checkpoints.

pub mod backend;
pub mod error;
pub mod generate;
pub mod io;
pub mod models;
pub mod nn;
pub mod ops;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{DType, Device, DeviceSpec, Tensor};
