//! The library's error type: every variant names the file, tensor, shape or id at fault.

use std::path::PathBuf;

/// Errors returned by every fallible function of the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// config.json is missing, malformed or describes something unsupported.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A checkpoint file is truncated, corrupt or inconsistent.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint {dir}: missing tensor `{name}`")]
    MissingTensor { dir: PathBuf, name: String },
    /// A tensor's shape disagrees with config.json.
    #[error(
        "checkpoint {dir}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}"
    )]
    TensorShape {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// User input (ids, JSON, options) is invalid.
    #[error("input: {0}")]
    Input(String),
    /// An op was called with shapes or dtypes it does not accept.
    #[error("{op}: {msg}")]
    Op { op: &'static str, msg: String },
    /// The requested device is unavailable or failed.
    #[error("device: {0}")]
    Device(String),
    /// A CUDA driver, cuBLASLt or NVRTC call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn op(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Op {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: err.to_string(),
        }
    }
}
