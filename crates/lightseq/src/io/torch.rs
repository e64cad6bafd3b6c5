//! torch.save files (pytorch_model.bin, fairseq checkpoints) read without Python: a zip of
//! stored entries holding `data.pkl` and one raw little-endian file per storage.

use super::pickle::{self, Py, TorchDType};
use super::safetensors::Bytes;
use super::zip::ZipIndex;
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One tensor of a torch file: a strided view into a storage entry.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    pub dtype: TorchDType,
    pub shape: Vec<usize>,
    pub stride: Vec<i64>,
    pub offset: usize,
    /// Archive entry holding the storage, and the storage's element count.
    pub entry: String,
    pub storage_numel: usize,
}

/// A parsed torch.save archive.
pub struct TorchFile {
    pub path: PathBuf,
    bytes: Bytes,
    zip: ZipIndex,
    /// The state dict's tensors by name.
    pub tensors: BTreeMap<String, TorchTensor>,
}

const LEGACY_MAGIC: [u8; 4] = [0x80, 0x02, 0x8a, 0x0a];

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Tensors reachable from `v` as a state dict: `v` itself when it maps names to tensors,
/// else its `model`, `state_dict` or `module` entry (fairseq and trainer checkpoints).
fn find_state_dict(v: &Py) -> Option<Vec<(String, Py)>> {
    let entries = v.entries()?;
    let tensors: Vec<(String, Py)> = entries
        .iter()
        .filter_map(|(k, t)| match (k.as_str(), t) {
            (Some(k), Py::Tensor(_)) => Some((k.to_string(), t.clone())),
            _ => None,
        })
        .collect();
    if !tensors.is_empty() {
        return Some(tensors);
    }
    ["model", "state_dict", "module"]
        .iter()
        .find_map(|k| v.get(k).and_then(|x| find_state_dict(&x)))
}

impl TorchFile {
    /// Opens `path` and returns the file with its state dict indexed, plus the whole
    /// unpickled object (for converters that need more than tensors).
    pub fn open_with_root(path: &Path) -> Result<(Self, Py)> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let b: &[u8] = &map;
        if b.starts_with(&LEGACY_MAGIC) {
            return Err(bad(path, "uses the legacy (pre-1.6, non-zip) torch.save format; re-save it with torch >= 1.6: torch.save(torch.load(p, weights_only=False), p2)"));
        }
        if !b.starts_with(b"PK\x03\x04") {
            return Err(bad(
                path,
                "not a torch.save zip archive (truncated or another format?)",
            ));
        }
        let zip = ZipIndex::parse(path, b)?;
        let pkl: Vec<&String> = zip
            .order
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let [pkl] = pkl.as_slice() else {
            return Err(bad(path, "no unique <archive>/data.pkl entry"));
        };
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        if zip.entries.contains_key(&format!("{prefix}constants.pkl")) {
            return Err(bad(
                path,
                "is a TorchScript archive (torch.jit.save), not a state dict",
            ));
        }
        if let Some(order) = zip.entries.get(&format!("{prefix}byteorder")) {
            if &b[order.start..order.start + order.len] != b"little" {
                return Err(bad(path, "stores big-endian tensors"));
            }
        }
        let e = zip.entries[*pkl];
        let root = pickle::load(path, &b[e.start..e.start + e.len])?;
        let mut tensors = BTreeMap::new();
        for (name, t) in find_state_dict(&root).unwrap_or_default() {
            let Py::Tensor(t) = t else { continue };
            let entry = format!("{prefix}data/{}", t.storage.key);
            let Some(ze) = zip.entries.get(&entry) else {
                return Err(bad(
                    path,
                    format!("tensor `{name}`: storage entry `{entry}` is missing"),
                ));
            };
            let elem = t.storage.dtype.size();
            if ze.len != t.storage.numel * elem {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{name}`: storage `{entry}` has {} bytes, expected {}",
                        ze.len,
                        t.storage.numel * elem
                    ),
                ));
            }
            // Every element the view reaches must lie inside the storage.
            let mut hi = t.offset as i64;
            let mut lo = t.offset as i64;
            let numel: usize = t.size.iter().product();
            if numel > 0 {
                for (&s, &st) in t.size.iter().zip(&t.stride) {
                    let reach = (s as i64 - 1) * st;
                    if reach > 0 {
                        hi += reach;
                    } else {
                        lo += reach;
                    }
                }
                let storage_elems = (t.storage.numel * elem / t.dtype.size()) as i64;
                if lo < 0 || hi >= storage_elems {
                    return Err(bad(
                        path,
                        format!("tensor `{name}` reaches outside its storage"),
                    ));
                }
            }
            tensors.insert(
                name,
                TorchTensor {
                    dtype: t.dtype,
                    shape: t.size.clone(),
                    stride: t.stride.clone(),
                    offset: t.offset,
                    entry,
                    storage_numel: t.storage.numel,
                },
            );
        }
        Ok((
            TorchFile {
                path: path.to_path_buf(),
                bytes: Bytes::Mapped(map),
                zip,
                tensors,
            },
            root,
        ))
    }

    /// Opens a torch.save state dict.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::open_with_root(path)?.0)
    }

    /// True when `a` and `b` are the same view of one storage (how torch.save stores tied
    /// weights under each of their names).
    pub fn same_view(&self, a: &str, b: &str) -> bool {
        match (self.tensors.get(a), self.tensors.get(b)) {
            (Some(x), Some(y)) => {
                x.entry == y.entry
                    && x.offset == y.offset
                    && x.shape == y.shape
                    && x.stride == y.stride
                    && x.dtype == y.dtype
            }
            _ => false,
        }
    }

    /// A tensor's values as f32, gathered through its strides.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| bad(&self.path, format!("no tensor `{name}`")))?;
        let e = self.zip.entries[&t.entry];
        let raw = &self.bytes[e.start..e.start + e.len];
        let es = t.dtype.size();
        let get = |i: usize| -> Result<f32> {
            let c = &raw[i * es..(i + 1) * es];
            Ok(match t.dtype {
                TorchDType::F32 => f32::from_le_bytes(c.try_into().unwrap()),
                TorchDType::F64 => f64::from_le_bytes(c.try_into().unwrap()) as f32,
                TorchDType::F16 => f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                TorchDType::BF16 => bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                other => {
                    return Err(bad(
                        &self.path,
                        format!("tensor `{name}` is {}, expected a float type", other.name()),
                    ))
                }
            })
        };
        let numel: usize = t.shape.iter().product();
        let mut out = Vec::with_capacity(numel);
        let mut idx = vec![0usize; t.shape.len()];
        for _ in 0..numel {
            let pos = t.offset as i64
                + idx
                    .iter()
                    .zip(&t.stride)
                    .map(|(&i, &s)| i as i64 * s)
                    .sum::<i64>();
            out.push(get(pos as usize)?);
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < t.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok((t.shape.clone(), out))
    }
}
