//! Reading and writing Hugging Face model directories.

pub mod checkpoint;
pub mod safetensors;

pub use checkpoint::{Checkpoint, ModelDir};
