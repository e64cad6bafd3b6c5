//! The safetensors format: an 8-byte little-endian header length, a JSON header mapping
//! names to {dtype, shape, data_offsets}, then the raw little-endian data.
//! Parsed here (not through a crate) so every defect is reported with the file and tensor.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Element types found in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F64" => StDType::F64,
            "F32" => StDType::F32,
            "F16" => StDType::F16,
            "BF16" => StDType::BF16,
            "I64" => StDType::I64,
            "I32" => StDType::I32,
            "I16" => StDType::I16,
            "I8" => StDType::I8,
            "U8" => StDType::U8,
            "BOOL" => StDType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDType::F64 | StDType::I64 => 8,
            StDType::F32 | StDType::I32 => 4,
            StDType::F16 | StDType::BF16 | StDType::I16 => 2,
            StDType::I8 | StDType::U8 | StDType::Bool => 1,
        }
    }

    /// The name in the safetensors header.
    pub fn name(self) -> &'static str {
        match self {
            StDType::F64 => "F64",
            StDType::F32 => "F32",
            StDType::F16 => "F16",
            StDType::BF16 => "BF16",
            StDType::I64 => "I64",
            StDType::I32 => "I32",
            StDType::I16 => "I16",
            StDType::I8 => "I8",
            StDType::U8 => "U8",
            StDType::Bool => "BOOL",
        }
    }
}

/// Where one tensor's bytes are inside its file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: StDType,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// Bytes of a file: memory-mapped, or owned (embedded fixtures, tests).
pub enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
    Static(&'static [u8]),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
            Bytes::Static(s) => s,
        }
    }
}

/// One parsed safetensors file.
pub struct SafeTensorsFile {
    pub path: PathBuf,
    bytes: Bytes,
    data_start: usize,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl SafeTensorsFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; a concurrent writer truncating it is outside
        // what this library can guard against, as for any mmap-based loader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), Bytes::Mapped(map))
    }

    /// Parses bytes already in memory; `path` names them in errors.
    pub fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.clone(),
            msg,
        };
        if bytes.len() < 8 {
            return Err(bad(format!(
                "{} bytes is too short for a safetensors file (truncated?)",
                bytes.len()
            )));
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if n > (bytes.len() - 8) as u64 {
            return Err(bad(format!(
                "header length {n} exceeds the file's {} bytes (truncated or not safetensors)",
                bytes.len()
            )));
        }
        let data_start = 8 + n as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes[8..data_start])
                .map_err(|e| bad(format!("malformed header: {e}")))?;
        let data_len = bytes.len() - data_start;
        let mut tensors = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype_s = v.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
            let dtype = StDType::parse(dtype_s)
                .ok_or_else(|| bad(format!("tensor `{name}` has unsupported dtype `{dtype_s}`")))?;
            let shape: Vec<usize> = v
                .get("shape")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
            let offs: Vec<usize> = v
                .get("data_offsets")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .filter(|o: &Vec<usize>| o.len() == 2)
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
            let (start, end) = (offs[0], offs[1]);
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor `{name}` shape {shape:?} overflows")))?;
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{name}` spans bytes {start}..{end} but the data section has {data_len} (truncated?)"
                )));
            }
            if end - start != numel * dtype.size() {
                return Err(bad(format!(
                    "tensor `{name}` of shape {shape:?} {} needs {} bytes, header gives {}",
                    dtype.name(),
                    numel * dtype.size(),
                    end - start
                )));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape,
                    start,
                    end,
                },
            );
        }
        Ok(SafeTensorsFile {
            path,
            bytes,
            data_start,
            tensors,
        })
    }

    /// Raw bytes of tensor `info`.
    pub fn data(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[self.data_start + info.start..self.data_start + info.end]
    }

    /// A float tensor's values as f32.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensors.get(name).ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            msg: format!("no tensor `{name}`"),
        })?;
        let raw = self.data(info);
        let v: Vec<f32> = match info.dtype {
            StDType::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            StDType::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            StDType::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            StDType::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect(),
            other => {
                return Err(Error::Checkpoint {
                    path: self.path.clone(),
                    msg: format!("tensor `{name}` is {}, expected a float type", other.name()),
                })
            }
        };
        Ok((info.shape.clone(), v))
    }
}

/// Serializes f32 tensors into safetensors bytes (names sorted, as HF writes them).
pub fn serialize_f32(tensors: &[(&str, &[usize], &[f32])]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in &sorted {
        let end = offset + data.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, data) in &sorted {
        for x in data.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Writes f32 tensors to `path`.
pub fn write_f32(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    std::fs::write(path, serialize_f32(tensors)).map_err(|e| Error::io(path, e))
}
