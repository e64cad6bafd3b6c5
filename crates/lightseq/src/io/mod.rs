//! Reading and writing Hugging Face model directories.

pub mod checkpoint;
pub mod fairseq;
pub mod pickle;
pub mod safetensors;
pub mod torch;
pub mod zip;

pub use checkpoint::{Checkpoint, ModelDir};
