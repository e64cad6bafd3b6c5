//! A Hugging Face model directory: config.json plus model.safetensors, or shards listed in
//! model.safetensors.index.json.

use super::safetensors::{Bytes, SafeTensorsFile};
use super::torch::TorchFile;
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One file of a checkpoint.
pub enum Source {
    /// model.safetensors or a shard of it.
    Safetensors(SafeTensorsFile),
    /// pytorch_model.bin or a shard of it (torch.save zip).
    Torch(TorchFile),
}

impl Source {
    fn names(&self) -> Vec<String> {
        match self {
            Source::Safetensors(f) => f.tensors.keys().cloned().collect(),
            Source::Torch(f) => f.tensors.keys().cloned().collect(),
        }
    }

    fn info(&self, name: &str) -> Option<(Vec<usize>, &'static str)> {
        match self {
            Source::Safetensors(f) => f
                .tensors
                .get(name)
                .map(|i| (i.shape.clone(), i.dtype.name())),
            Source::Torch(f) => f
                .tensors
                .get(name)
                .map(|i| (i.shape.clone(), i.dtype.name())),
        }
    }

    fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        match self {
            Source::Safetensors(f) => f.read_f32(name),
            Source::Torch(f) => f.read_f32(name),
        }
    }
}

/// All tensors of a checkpoint, over one or more safetensors or torch files.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Source>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    /// When set, the checkpoint holds no files and answers every read with seeded random
    /// values of the requested shape (presets of real sizes for benchmarks and demos).
    random_seed: Option<u64>,
}

impl Checkpoint {
    /// Builds a checkpoint from parsed files.
    pub fn from_files(dir: PathBuf, files: Vec<Source>) -> Self {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.insert(name, i);
            }
        }
        Checkpoint {
            dir,
            files,
            index,
            random_seed: None,
        }
    }

    /// A checkpoint of seeded random weights: matrices N(0, 0.02), 1-D `weight`/`gamma`
    /// tensors (norm scales) 1, other vectors 0. It holds every tensor a loader asks for.
    pub fn random(name: &str, seed: u64) -> Self {
        Checkpoint {
            dir: PathBuf::from(name),
            files: Vec::new(),
            index: HashMap::new(),
            random_seed: Some(seed),
        }
    }

    /// Opens the weights of model directory `dir`: model.safetensors, sharded safetensors
    /// (model.safetensors.index.json), pytorch_model.bin or sharded .bin files, in that order
    /// of preference.
    pub fn open(dir: &Path) -> Result<Self> {
        let st = dir.join("model.safetensors");
        if st.is_file() {
            return Ok(Self::from_files(
                dir.to_path_buf(),
                vec![Source::Safetensors(SafeTensorsFile::open(&st)?)],
            ));
        }
        let st_index = dir.join("model.safetensors.index.json");
        if st_index.is_file() {
            let files = shards(dir, &st_index)?
                .iter()
                .map(|p| SafeTensorsFile::open(p).map(Source::Safetensors))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::from_files(dir.to_path_buf(), files));
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Ok(Self::from_files(
                dir.to_path_buf(),
                vec![Source::Torch(TorchFile::open(&bin)?)],
            ));
        }
        let bin_index = dir.join("pytorch_model.bin.index.json");
        if bin_index.is_file() {
            let files = shards(dir, &bin_index)?
                .iter()
                .map(|p| TorchFile::open(p).map(Source::Torch))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Self::from_files(dir.to_path_buf(), files));
        }
        Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json".into(),
        })
    }

    /// The directory (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.random_seed.is_some() || self.index.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Shape and dtype name of `name`.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, &'static str)> {
        self.files[*self.index.get(name)?].info(name)
    }

    /// Reads `name` as f32, checking its shape against what config.json implies.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        if let Some(seed) = self.random_seed {
            return Ok(init_values(seed, name, expected, 0.02));
        }
        let fi = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
        })?;
        let (shape, v) = self.files[fi].read_f32(name)?;
        if shape != expected {
            return Err(Error::TensorShape {
                dir: self.dir.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(v)
    }

    /// True when `a` and `b` hold the same shape and values (aliases of one torch view
    /// without reading them). The tables of a random checkpoint count as one, as a freshly
    /// built HF model ties them.
    pub fn same_values(&self, a: &str, b: &str) -> Result<bool> {
        if self.random_seed.is_some() {
            return Ok(true);
        }
        // Aliases of one stored view need no reading.
        if let (Some(&fa), Some(&fb)) = (self.index.get(a), self.index.get(b)) {
            if let (true, Source::Torch(t)) = (fa == fb, &self.files[fa]) {
                if t.same_view(a, b) {
                    return Ok(true);
                }
            }
        }
        let (Some((sa, _)), Some((sb, _))) = (self.info(a), self.info(b)) else {
            return Ok(false);
        };
        if sa != sb {
            return Ok(false);
        }
        Ok(self.read_f32(a, &sa)? == self.read_f32(b, &sb)?)
    }

    /// Loads `name` onto `device` as `dtype`.
    pub fn tensor(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let v = self.read_f32(name, expected)?;
        Tensor::from_f32(&v, expected, dtype, device)
    }
}

/// A model directory: its config.json text and its checkpoint.
pub struct ModelDir {
    /// Path (or a name for embedded models), for messages.
    pub path: PathBuf,
    /// Parsed config.json.
    pub config: serde_json::Value,
    /// Weights.
    pub checkpoint: Checkpoint,
}

impl ModelDir {
    /// Opens a model directory written by HF `save_pretrained`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::io(
                path,
                if path.exists() {
                    "not a directory"
                } else {
                    "no such directory"
                },
            ));
        }
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            msg: e.to_string(),
        })?;
        let config = parse_config(&cfg_path, &text)?;
        let checkpoint = Checkpoint::open(path)?;
        Ok(ModelDir {
            path: path.to_path_buf(),
            config,
            checkpoint,
        })
    }

    /// A model held in memory: config.json text and one safetensors file's bytes.
    pub fn from_static(name: &str, config_json: &str, safetensors: &'static [u8]) -> Result<Self> {
        let path = PathBuf::from(name);
        let config = parse_config(&path.join("config.json"), config_json)?;
        let file =
            SafeTensorsFile::parse(path.join("model.safetensors"), Bytes::Static(safetensors))?;
        Ok(ModelDir {
            checkpoint: Checkpoint::from_files(path.clone(), vec![Source::Safetensors(file)]),
            path,
            config,
        })
    }

    /// A model of `config` with seeded random weights (see [`Checkpoint::random`]).
    pub fn random(name: &str, config: serde_json::Value, seed: u64) -> Self {
        ModelDir {
            path: PathBuf::from(name),
            config,
            checkpoint: Checkpoint::random(name, seed),
        }
    }

    /// config.json's `model_type`.
    pub fn model_type(&self) -> Result<&str> {
        self.config
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config {
                path: self.path.join("config.json"),
                msg: "no `model_type` string".into(),
            })
    }
}

fn parse_config(path: &Path, text: &str) -> Result<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("malformed JSON: {e}"),
    })?;
    if !v.is_object() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: "expected a JSON object".into(),
        });
    }
    Ok(v)
}

/// Initial values of tensor `name` as HF initializes a new model: 1-D `weight`/`gamma`
/// tensors (norm scales) 1, other vectors 0, matrices N(0, std) seeded by `seed` and the
/// tensor's name (so each tensor is independent of the order of loading).
pub(crate) fn init_values(seed: u64, name: &str, shape: &[usize], std: f64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        let one = name.ends_with("weight") || name.ends_with("gamma");
        return vec![if one { 1.0 } else { 0.0 }; n];
    }
    // SplitMix64.
    let mut state = name.bytes().fold(seed ^ 0x9e3779b97f4a7c15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let mut next = move || {
        state = state.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            // Box-Muller from two uniforms in (0, 1].
            let (u1, u2) = (1.0 - next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// The shard files an index lists (`weight_map` values), checked to exist inside `dir`.
fn shards(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let bad = |msg: String| Error::Checkpoint {
        path: index_path.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for s in &names {
        if s.contains('/') || s.contains("..") {
            return Err(bad(format!("shard name `{s}` leaves the model directory")));
        }
        let p = dir.join(s);
        if !p.is_file() {
            return Err(bad(format!("lists shard `{s}`, which is missing")));
        }
        out.push(p);
    }
    Ok(out)
}
