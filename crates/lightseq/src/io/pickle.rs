//! A pickle reader for torch.save checkpoints: the opcodes of protocols 2 to 5 that torch,
//! argparse, OrderedDict and omegaconf produce. Unknown classes become opaque objects, never
//! errors; tensors and storages become references into the archive.

use crate::error::{Error, Result};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Element types of torch storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchDType {
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

impl TorchDType {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => TorchDType::F64,
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "CharStorage" => TorchDType::I8,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            _ => return None,
        })
    }

    fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => TorchDType::F64,
            "float32" | "float" => TorchDType::F32,
            "float16" | "half" => TorchDType::F16,
            "bfloat16" => TorchDType::BF16,
            "int64" | "long" => TorchDType::I64,
            "int32" | "int" => TorchDType::I32,
            "int16" | "short" => TorchDType::I16,
            "int8" => TorchDType::I8,
            "uint8" => TorchDType::U8,
            "bool" => TorchDType::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TorchDType::F64 | TorchDType::I64 => 8,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
        }
    }

    /// The safetensors name of the type.
    pub fn name(self) -> &'static str {
        match self {
            TorchDType::F64 => "F64",
            TorchDType::F32 => "F32",
            TorchDType::F16 => "F16",
            TorchDType::BF16 => "BF16",
            TorchDType::I64 => "I64",
            TorchDType::I32 => "I32",
            TorchDType::I16 => "I16",
            TorchDType::I8 => "I8",
            TorchDType::U8 => "U8",
            TorchDType::Bool => "BOOL",
        }
    }
}

/// A storage: the archive file `data/<key>` holding `numel` elements of `dtype`
/// (for untyped storages, `numel` counts bytes and `dtype` is U8).
#[derive(Debug)]
pub struct StorageRef {
    pub key: String,
    pub dtype: TorchDType,
    pub numel: usize,
}

/// A tensor view into a storage (offset, size and stride in elements).
#[derive(Debug)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub dtype: TorchDType,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<i64>,
}

/// An instance of a class the reader does not model (argparse.Namespace, DictConfig, ...).
#[derive(Debug)]
pub struct Object {
    pub module: String,
    pub name: String,
    pub args: Py,
    pub state: Option<Py>,
}

/// A Python value. Containers are shared (`Rc`) because the pickle memo aliases them.
#[derive(Debug, Clone)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (two's-complement little-endian bytes).
    BigInt(Rc<Vec<u8>>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<Vec<u8>>),
    Tuple(Rc<Vec<Py>>),
    List(Rc<RefCell<Vec<Py>>>),
    Dict(Rc<RefCell<Vec<(Py, Py)>>>),
    Global(Rc<(String, String)>),
    Object(Rc<RefCell<Object>>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
    Mark,
}

impl Py {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Py::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one (booleans count as 0/1).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Py::Int(i) => Some(*i),
            Py::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// Numbers as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Py::Float(f) => Some(*f),
            Py::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// Booleans (and 0/1 integers).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Py::Bool(b) => Some(*b),
            Py::Int(i) => Some(*i != 0),
            _ => None,
        }
    }

    /// Entries of a dict-like value: a dict, an object whose state is a dict (argparse
    /// Namespace), or an omegaconf DictConfig (its `_content`, node values unwrapped).
    pub fn entries(&self) -> Option<Vec<(Py, Py)>> {
        match self {
            Py::Dict(d) => Some(d.borrow().clone()),
            Py::Object(o) => {
                let o = o.borrow();
                let state = o.state.as_ref()?;
                let e = state.entries()?;
                let content = e
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("_content"))
                    .map(|(_, v)| v.clone());
                match content {
                    Some(c) if o.name == "DictConfig" => c
                        .entries()
                        .map(|v| v.into_iter().map(|(k, v)| (k, v.unwrap_node())).collect()),
                    _ => Some(e),
                }
            }
            _ => None,
        }
    }

    /// omegaconf value nodes hold their value in `_val`.
    fn unwrap_node(self) -> Py {
        if let Py::Object(o) = &self {
            let b = o.borrow();
            if b.module.starts_with("omegaconf") && b.name != "DictConfig" && b.name != "ListConfig"
            {
                if let Some(v) = b.state.as_ref().and_then(|s| s.get("_val")) {
                    return v;
                }
            }
        }
        self
    }

    /// `self[key]` for dict-like values with string keys.
    pub fn get(&self, key: &str) -> Option<Py> {
        self.entries()?
            .into_iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Items of a tuple or list.
    pub fn items(&self) -> Option<Vec<Py>> {
        match self {
            Py::Tuple(t) => Some(t.as_ref().clone()),
            Py::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }

    /// True for None.
    pub fn is_none(&self) -> bool {
        matches!(self, Py::None)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Checkpoint {
            path: PathBuf::from(self.path),
            msg: format!("pickle at byte {}: {msg}", self.at),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .b
            .get(self.at..self.at + n)
            .ok_or_else(|| self.err("unexpected end (truncated?)"))?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64> {
        let s = self.take(n)?;
        let mut v = 0u64;
        for (i, &x) in s.iter().enumerate() {
            v |= (x as u64) << (8 * i);
        }
        Ok(v)
    }

    fn line(&mut self) -> Result<String> {
        let start = self.at;
        while self
            .b
            .get(self.at)
            .ok_or_else(|| self.err("unterminated line"))?
            != &b'\n'
        {
            self.at += 1;
        }
        let s = String::from_utf8_lossy(&self.b[start..self.at]).into_owned();
        self.at += 1;
        Ok(s)
    }
}

fn long_le(bytes: &[u8]) -> Py {
    if bytes.is_empty() {
        return Py::Int(0);
    }
    if bytes.len() <= 8 {
        let neg = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = [if neg { 0xffu8 } else { 0 }; 8];
        buf[..bytes.len()].copy_from_slice(bytes);
        Py::Int(i64::from_le_bytes(buf))
    } else {
        Py::BigInt(Rc::new(bytes.to_vec()))
    }
}

/// Applies a callable (a GLOBAL) to its arguments, modelling what torch checkpoints need.
fn call(r: &Reader, f: &Py, args: Py) -> Result<Py> {
    let Py::Global(g) = f else {
        return Ok(Py::Object(Rc::new(RefCell::new(Object {
            module: String::new(),
            name: "<call>".into(),
            args,
            state: None,
        }))));
    };
    let (module, name) = (g.0.as_str(), g.1.as_str());
    let a = args.items().unwrap_or_default();
    match (module, name) {
        ("collections", "OrderedDict") | ("__builtin__", "dict") | ("builtins", "dict") => {
            let d = Rc::new(RefCell::new(Vec::new()));
            if let Some(items) = a.first().and_then(Py::items) {
                for kv in items {
                    if let Some(p) = kv.items().filter(|p| p.len() == 2) {
                        d.borrow_mut().push((p[0].clone(), p[1].clone()));
                    }
                }
            }
            Ok(Py::Dict(d))
        }
        ("__builtin__" | "builtins", "set" | "frozenset") => Ok(Py::List(Rc::new(RefCell::new(
            a.first().and_then(Py::items).unwrap_or_default(),
        )))),
        ("_codecs", "encode") => {
            let s = a
                .first()
                .and_then(|x| x.as_str().map(str::to_string))
                .unwrap_or_default();
            Ok(Py::Bytes(Rc::new(
                s.chars().map(|c| c as u32 as u8).collect(),
            )))
        }
        ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
            let storage = match a.first() {
                Some(Py::Storage(s)) => s.clone(),
                _ => return Err(r.err(format!("{name} without a storage"))),
            };
            let int = |p: Option<&Py>| p.and_then(Py::as_i64);
            let offset = int(a.get(1)).ok_or_else(|| r.err("tensor offset"))? as usize;
            let dims = |p: Option<&Py>| -> Option<Vec<i64>> {
                p?.items()?.iter().map(Py::as_i64).collect()
            };
            let size = dims(a.get(2)).ok_or_else(|| r.err("tensor size"))?;
            let stride = dims(a.get(3)).ok_or_else(|| r.err("tensor stride"))?;
            let mut dtype = storage.dtype;
            if name == "_rebuild_tensor_v3" {
                let dt = match a.get(6) {
                    Some(Py::Global(g)) => TorchDType::from_torch_name(&g.1),
                    _ => None,
                };
                dtype =
                    dt.ok_or_else(|| r.err("unsupported tensor dtype in _rebuild_tensor_v3"))?;
            }
            if size.iter().any(|&s| s < 0) || size.len() != stride.len() {
                return Err(r.err("invalid tensor size/stride"));
            }
            Ok(Py::Tensor(Rc::new(TensorRef {
                storage,
                dtype,
                offset,
                size: size.iter().map(|&s| s as usize).collect(),
                stride,
            })))
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            Ok(a.into_iter().next().unwrap_or(Py::None))
        }
        _ => Ok(Py::Object(Rc::new(RefCell::new(Object {
            module: module.to_string(),
            name: name.to_string(),
            args,
            state: None,
        })))),
    }
}

/// Runs the pickle in `b` and returns its value. `path` names the file in errors.
pub fn load(path: &Path, b: &[u8]) -> Result<Py> {
    let mut r = Reader { b, at: 0, path };
    let mut stack: Vec<Py> = Vec::new();
    let mut memo: Vec<Option<Py>> = Vec::new();
    let pop = |stack: &mut Vec<Py>, r: &Reader| stack.pop().ok_or_else(|| r.err("stack underflow"));
    let pop_mark = |stack: &mut Vec<Py>, r: &Reader| -> Result<Vec<Py>> {
        let m = stack
            .iter()
            .rposition(|x| matches!(x, Py::Mark))
            .ok_or_else(|| r.err("no mark"))?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    let put = |memo: &mut Vec<Option<Py>>, i: usize, v: Py| {
        if memo.len() <= i {
            memo.resize(i + 1, None);
        }
        memo[i] = Some(v);
    };
    loop {
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?;
            }
            0x95 => {
                r.take(8)?;
            }
            b'.' => return pop(&mut stack, &r),
            b'(' => stack.push(Py::Mark),
            b'}' => stack.push(Py::Dict(Rc::new(RefCell::new(Vec::new())))),
            b']' => stack.push(Py::List(Rc::new(RefCell::new(Vec::new())))),
            b')' => stack.push(Py::Tuple(Rc::new(Vec::new()))),
            0x8f => stack.push(Py::List(Rc::new(RefCell::new(Vec::new())))),
            b't' => {
                let items = pop_mark(&mut stack, &r)?;
                stack.push(Py::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(r.err("stack underflow"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Py::Tuple(Rc::new(items)));
            }
            b'q' => {
                let i = r.u8()? as usize;
                put(
                    &mut memo,
                    i,
                    stack.last().cloned().ok_or_else(|| r.err("empty stack"))?,
                );
            }
            b'r' => {
                let i = r.uint(4)? as usize;
                put(
                    &mut memo,
                    i,
                    stack.last().cloned().ok_or_else(|| r.err("empty stack"))?,
                );
            }
            0x94 => {
                let i = memo.len();
                put(
                    &mut memo,
                    i,
                    stack.last().cloned().ok_or_else(|| r.err("empty stack"))?,
                );
            }
            b'h' | b'j' => {
                let i = if op == b'h' {
                    r.u8()? as usize
                } else {
                    r.uint(4)? as usize
                };
                let v = memo
                    .get(i)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| r.err(format!("memo {i} unset")))?;
                stack.push(v);
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => r.uint(4)?,
                    0x8c => r.u8()? as u64,
                    _ => r.uint(8)?,
                } as usize;
                let s = String::from_utf8_lossy(r.take(n)?).into_owned();
                stack.push(Py::Str(s.into()));
            }
            b'T' | b'U' => {
                let n = if op == b'T' {
                    r.uint(4)?
                } else {
                    r.u8()? as u64
                } as usize;
                let s: String = r.take(n)?.iter().map(|&c| c as char).collect();
                stack.push(Py::Str(s.into()));
            }
            b'B' | b'C' | 0x8e | 0x96 => {
                let n = match op {
                    b'B' => r.uint(4)?,
                    b'C' => r.u8()? as u64,
                    _ => r.uint(8)?,
                } as usize;
                stack.push(Py::Bytes(Rc::new(r.take(n)?.to_vec())));
            }
            b'J' => stack.push(Py::Int(r.uint(4)? as u32 as i32 as i64)),
            b'K' => stack.push(Py::Int(r.u8()? as i64)),
            b'M' => stack.push(Py::Int(r.uint(2)? as i64)),
            0x8a => {
                let n = r.u8()? as usize;
                stack.push(long_le(r.take(n)?));
            }
            0x8b => {
                let n = r.uint(4)? as u32 as i32;
                if n < 0 {
                    return Err(r.err("negative LONG4 length"));
                }
                stack.push(long_le(r.take(n as usize)?));
            }
            b'G' => {
                let s = r.take(8)?;
                stack.push(Py::Float(f64::from_be_bytes(s.try_into().unwrap())));
            }
            b'N' => stack.push(Py::None),
            0x88 => stack.push(Py::Bool(true)),
            0x89 => stack.push(Py::Bool(false)),
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Py::Global(Rc::new((module, name))));
            }
            0x93 => {
                let name = pop(&mut stack, &r)?;
                let module = pop(&mut stack, &r)?;
                let (Some(m), Some(n)) = (module.as_str(), name.as_str()) else {
                    return Err(r.err("STACK_GLOBAL needs two strings"));
                };
                stack.push(Py::Global(Rc::new((m.to_string(), n.to_string()))));
            }
            b'R' => {
                let args = pop(&mut stack, &r)?;
                let f = pop(&mut stack, &r)?;
                let v = call(&r, &f, args)?;
                stack.push(v);
            }
            0x81 => {
                let args = pop(&mut stack, &r)?;
                let cls = pop(&mut stack, &r)?;
                let v = call(&r, &cls, args)?;
                stack.push(v);
            }
            0x92 => {
                let _kwargs = pop(&mut stack, &r)?;
                let args = pop(&mut stack, &r)?;
                let cls = pop(&mut stack, &r)?;
                let v = call(&r, &cls, args)?;
                stack.push(v);
            }
            b'b' => {
                let state = pop(&mut stack, &r)?;
                match stack.last() {
                    Some(Py::Object(o)) => {
                        // (dict, slotstate) pairs: keep the dict.
                        let s = match &state {
                            Py::Tuple(t) if t.len() == 2 && !t[0].is_none() => t[0].clone(),
                            Py::Tuple(t) if t.len() == 2 => t[1].clone(),
                            _ => state,
                        };
                        o.borrow_mut().state = Some(s);
                    }
                    Some(_) => {} // OrderedDict metadata and the like: ignored.
                    None => return Err(r.err("BUILD on an empty stack")),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack, &r)?;
                let p = pid.items().unwrap_or_default();
                if p.first().and_then(Py::as_str) != Some("storage") || p.len() < 5 {
                    return Err(r.err("unsupported persistent id"));
                }
                let dtype = match &p[1] {
                    Py::Global(g) if g.1 == "UntypedStorage" => TorchDType::U8,
                    Py::Global(g) => TorchDType::from_storage(&g.1)
                        .ok_or_else(|| r.err(format!("unsupported storage type {}", g.1)))?,
                    _ => return Err(r.err("storage type is not a class")),
                };
                let key = p[2]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| r.err("storage key"))?;
                let numel = p[4].as_i64().ok_or_else(|| r.err("storage size"))? as usize;
                stack.push(Py::Storage(Rc::new(StorageRef { key, dtype, numel })));
            }
            b's' => {
                let v = pop(&mut stack, &r)?;
                let k = pop(&mut stack, &r)?;
                match stack.last() {
                    Some(Py::Dict(d)) => d.borrow_mut().push((k, v)),
                    _ => return Err(r.err("SETITEM on a non-dict")),
                }
            }
            b'u' => {
                let items = pop_mark(&mut stack, &r)?;
                match stack.last() {
                    Some(Py::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        for kv in items.chunks(2) {
                            if kv.len() == 2 {
                                d.push((kv[0].clone(), kv[1].clone()));
                            }
                        }
                    }
                    _ => return Err(r.err("SETITEMS on a non-dict")),
                }
            }
            b'a' => {
                let v = pop(&mut stack, &r)?;
                match stack.last() {
                    Some(Py::List(l)) => l.borrow_mut().push(v),
                    _ => return Err(r.err("APPEND on a non-list")),
                }
            }
            b'e' | 0x90 => {
                let items = pop_mark(&mut stack, &r)?;
                match stack.last() {
                    Some(Py::List(l)) => l.borrow_mut().extend(items),
                    _ => return Err(r.err("APPENDS on a non-list")),
                }
            }
            0x91 => {
                let items = pop_mark(&mut stack, &r)?;
                stack.push(Py::List(Rc::new(RefCell::new(items))));
            }
            b'0' => {
                pop(&mut stack, &r)?;
            }
            b'1' => {
                pop_mark(&mut stack, &r)?;
            }
            b'2' => {
                let v = stack.last().cloned().ok_or_else(|| r.err("empty stack"))?;
                stack.push(v);
            }
            other => return Err(r.err(format!("unsupported opcode 0x{other:02x}"))),
        }
    }
}
