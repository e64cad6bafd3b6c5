use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;
use std::str::FromStr;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (token ids, lengths).
    I32,
}

impl DType {
    /// Name as used on the command line and in kernel symbols.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Values rounded to this type's precision and widened back to f32.
    pub fn round_f32(self, data: &[f32]) -> Vec<f32> {
        match self {
            DType::F16 => data.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
            DType::BF16 => data.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            DType::F32 | DType::I32 => data.to_vec(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" | "fp16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::Input(format!(
                "unknown dtype `{s}` (expected f32, f16 or bf16)"
            ))),
        }
    }
}
