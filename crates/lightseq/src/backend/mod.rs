//! Op bodies, one folder per device: `cpu` (the semantic reference) and `cuda`.

pub(crate) mod cpu;
pub mod cuda;
