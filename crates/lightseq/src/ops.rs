//! The op set: each op checks shapes and dtypes once here, then runs its CPU body
//! (`backend::cpu`) or its CUDA body (`backend::cuda`) on the tensors' device.

use crate::backend::{cpu, cuda};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

/// Element-wise activation applied after a linear layer's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// GELU with the exact erf form (HF `gelu`).
    Gelu,
    /// GELU's tanh approximation (HF `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// max(x, 0).
    Relu,
    /// x * sigmoid(x) (HF `silu`, `swish`).
    Silu,
    /// x * sigmoid(1.702 x) (HF `quick_gelu`).
    QuickGelu,
    /// tanh(x) (BERT's pooler).
    Tanh,
}

impl Activation {
    /// Maps a Hugging Face activation name to an [`Activation`].
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            "tanh" => Activation::Tanh,
            other => {
                return Err(Error::Input(format!(
                    "unsupported activation `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, quick_gelu, tanh)"
                )))
            }
        })
    }

    /// Index shared with the CUDA kernels' `act` argument.
    pub(crate) fn code(self) -> i32 {
        match self {
            Activation::None => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
            Activation::Silu => 4,
            Activation::QuickGelu => 5,
            Activation::Tanh => 6,
        }
    }

    /// Scalar definition, the reference for every backend.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Gelu => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
            Activation::GeluTanh => {
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::Tanh => x.tanh(),
        }
    }
}

pub(crate) fn erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}

/// Err unless every tensor is on the first's device.
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    let first = ts[0].cuda_device().map(|d| d.ordinal());
    for t in &ts[1..] {
        if t.cuda_device().map(|d| d.ordinal()) != first {
            return Err(Error::op(op, "tensors are on different devices"));
        }
    }
    Ok(())
}

fn same_float_dtype(op: &'static str, ts: &[&Tensor]) -> Result<DType> {
    let dt = ts[0].dtype();
    if dt == DType::I32 {
        return Err(Error::op(op, "expected a float tensor, got i32"));
    }
    for t in &ts[1..] {
        if t.dtype() != dt {
            return Err(Error::op(
                op,
                format!("mixed dtypes {} and {}", dt, t.dtype()),
            ));
        }
    }
    Ok(dt)
}

fn last_dim(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1)
}

/// The rows m, outputs n and inputs k of a linear of x [..., k] by w [n, k] (bias b [n]),
/// and its output's shape [..., n]; errors name `op`.
fn linear_shape(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> Result<(usize, usize, usize, Vec<usize>)> {
    if w.shape().len() != 2 || x.shape().is_empty() {
        return Err(Error::op(
            op,
            format!("x {:?}, w {:?}", x.shape(), w.shape()),
        ));
    }
    let (n_out, k) = (w.shape()[0], w.shape()[1]);
    if last_dim(x) != k || k == 0 {
        return Err(Error::op(
            op,
            format!("x {:?} does not match w {:?}", x.shape(), w.shape()),
        ));
    }
    if let Some(b) = b {
        if b.shape() != [n_out] {
            return Err(Error::op(
                op,
                format!("bias {:?}, expected [{n_out}]", b.shape()),
            ));
        }
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n_out;
    Ok((x.len() / k, n_out, k, shape))
}

/// `x @ w^T + b`, then `act`. x: [..., in], w: [out, in], b: [out] -> [..., out].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Activation) -> Result<Tensor> {
    const OP: &str = "linear";
    let mut all = vec![x, w];
    all.extend(b);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    let (m, n_out, k, shape) = linear_shape(OP, x, w, b)?;
    let storage = match &x.storage {
        Storage::CpuF32(xv) => Storage::CpuF32(cpu::linear(
            xv,
            w.cpu_f32(OP)?,
            b.map(|b| b.cpu_f32(OP)).transpose()?,
            act,
            m,
            n_out,
            k,
        )),
        Storage::Cuda(xs) => Storage::Cuda(cuda::ops::linear(
            xs,
            w.cuda(OP)?,
            b.map(|b| b.cuda(OP)).transpose()?,
            act,
            m,
            n_out,
            k,
        )?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(shape, dt, storage))
}

/// Layer normalization over the last dimension of `x + residual` (residual optional).
pub fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let mut all = vec![x, gamma, beta];
    all.extend(residual);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    let h = last_dim(x);
    if gamma.shape() != [h] || beta.shape() != [h] {
        return Err(Error::op(
            OP,
            format!(
                "x {:?}, gamma {:?}, beta {:?}",
                x.shape(),
                gamma.shape(),
                beta.shape()
            ),
        ));
    }
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            return Err(Error::op(
                OP,
                format!("residual {:?} != x {:?}", r.shape(), x.shape()),
            ));
        }
    }
    let rows = x.len() / h.max(1);
    let storage = match &x.storage {
        Storage::CpuF32(xv) => Storage::CpuF32(cpu::layer_norm(
            xv,
            residual.map(|r| r.cpu_f32(OP)).transpose()?,
            gamma.cpu_f32(OP)?,
            beta.cpu_f32(OP)?,
            eps,
            rows,
            h,
        )),
        Storage::Cuda(xs) => Storage::Cuda(cuda::ops::layer_norm(
            xs,
            residual.map(|r| r.cuda(OP)).transpose()?,
            gamma.cuda(OP)?,
            beta.cuda(OP)?,
            eps,
            rows,
            h,
        )?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dt, storage))
}

/// The output of a post-norm residual block: `layer_norm(linear(x, w, b) + residual)` over
/// the last dimension (`w` [n, k], `residual` shaped as the linear's output). With
/// `LIGHTSEQ_FUSED_LN=1` on CUDA the GEMM runs the sum and the layer norm in its epilogue
/// (sm_90, 16-bit, more than 128 rows; slower than the two ops on an H200, so off by
/// default); otherwise it is the two ops.
pub fn linear_add_layer_norm(
    x: &Tensor,
    (w, b): (&Tensor, Option<&Tensor>),
    residual: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "linear_add_layer_norm";
    let mut all = vec![x, w, residual, gamma, beta];
    all.extend(b);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    let (m, n, k, out_shape) = linear_shape(OP, x, w, b)?;
    if residual.shape() != out_shape.as_slice() || [gamma, beta].iter().any(|v| v.shape() != [n]) {
        return Err(Error::op(
            OP,
            format!(
                "residual {:?} (expected {out_shape:?}), gamma {:?}, beta {:?} (expected [{n}])",
                residual.shape(),
                gamma.shape(),
                beta.shape()
            ),
        ));
    }
    if let Storage::Cuda(xs) = &x.storage {
        let fused = cuda::ops::linear_add_layer_norm(
            (xs, w.cuda(OP)?, b.map(|b| b.cuda(OP)).transpose()?),
            residual.cuda(OP)?,
            (gamma.cuda(OP)?, beta.cuda(OP)?, eps),
            (m, n, k),
        )?;
        if let Some(y) = fused {
            return Ok(Tensor::from_parts(out_shape, dt, Storage::Cuda(y)));
        }
    }
    let y = linear(x, w, b, Activation::None)?;
    layer_norm(&y, Some(residual), gamma, beta, eps)
}

/// Element-wise `a + b` of equal shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    same_device(OP, &[a, b])?;
    let dt = same_float_dtype(OP, &[a, b])?;
    if a.shape() != b.shape() {
        return Err(Error::op(OP, format!("{:?} != {:?}", a.shape(), b.shape())));
    }
    let storage = match &a.storage {
        Storage::CpuF32(av) => Storage::CpuF32(cpu::add(av, b.cpu_f32(OP)?)),
        Storage::Cuda(s) => Storage::Cuda(cuda::ops::add(s, b.cuda(OP)?)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(a.shape().to_vec(), dt, storage))
}

/// Sum of row lookups: `out[i] = sum_k tables[k][ids[k][i]]`. tables: [V_k, H], ids: i32 [n].
/// Ids must already be validated against each table's row count.
pub fn embed(lookups: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    embed_scaled(lookups, 1.0)
}

/// [`embed`] with the first table's rows multiplied by `scale` (scaled token embeddings).
pub fn embed_scaled(lookups: &[(&Tensor, &Tensor)], scale: f32) -> Result<Tensor> {
    const OP: &str = "embed";
    if lookups.is_empty() || lookups.len() > 3 {
        return Err(Error::op(OP, "takes one to three (table, ids) pairs"));
    }
    let tables: Vec<&Tensor> = lookups.iter().map(|l| l.0).collect();
    let mut all = tables.clone();
    all.extend(lookups.iter().map(|l| l.1));
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &tables)?;
    let h = last_dim(tables[0]);
    let n = lookups[0].1.len();
    for (t, ids) in lookups {
        if t.shape().len() != 2 || t.shape()[1] != h || ids.dtype() != DType::I32 || ids.len() != n
        {
            return Err(Error::op(
                OP,
                format!(
                    "table {:?} with ids {:?} ({})",
                    t.shape(),
                    ids.shape(),
                    ids.dtype()
                ),
            ));
        }
    }
    let storage = match &tables[0].storage {
        Storage::CpuF32(_) => {
            let mut parts = Vec::new();
            for (t, ids) in lookups {
                parts.push((t.cpu_f32(OP)?, ids.cpu_i32(OP)?, t.shape()[0]));
            }
            Storage::CpuF32(cpu::embed(&parts, n, h, scale)?)
        }
        Storage::Cuda(_) => {
            let mut parts = Vec::new();
            for (t, ids) in lookups {
                parts.push((t.cuda(OP)?, ids.cuda(OP)?));
            }
            Storage::Cuda(cuda::ops::embed(&parts, n, h, scale)?)
        }
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(vec![n, h], dt, storage))
}

/// One of the query, key or value inputs of [`attention`]: a [batch, rows, width] tensor in
/// which head h occupies columns `col + h * head_dim .. col + (h + 1) * head_dim`, so q, k and
/// v can be slices of one fused projection.
#[derive(Clone, Copy)]
pub struct Heads<'a> {
    /// [batch, rows, width]
    pub tensor: &'a Tensor,
    /// First column of head 0.
    pub col: usize,
}

/// T5-style relative position bias, added to the scores.
pub struct RelativeBias<'a> {
    /// [num_buckets, heads], f32.
    pub table: &'a Tensor,
    /// Bucket of each relative position `key_pos - query_pos`, indexed by
    /// `key_pos - query_pos + (q_offset + len_q - 1)` (length `q_offset + len_q - 1 + len_k`).
    pub buckets: Vec<i32>,
}

/// Options of one [`attention`] call.
pub struct AttentionOptions<'a> {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` must be a multiple (grouped-query attention).
    pub kv_heads: usize,
    /// Size of each head.
    pub head_dim: usize,
    /// Multiplies q.k.
    pub scale: f32,
    /// Query i sits at position `q_offset + i`; with `causal` it sees keys j <= that position.
    pub causal: bool,
    /// Position of the first query (tokens already in a cache).
    pub q_offset: usize,
    /// With `Some(w)`, a query also ignores keys more than w - 1 positions behind it.
    pub window: Option<usize>,
    /// Per sequence, the half-open range of valid key rows (padding excluded).
    pub key_ranges: Vec<(usize, usize)>,
    /// Optional additive relative-position bias.
    pub bias: Option<RelativeBias<'a>>,
    /// `key_ranges` already on the device as i32 [2 * batch] (starts, then ends), to save
    /// an upload per call; must hold the same values.
    pub ranges_on_device: Option<&'a Tensor>,
}

/// Multi-head attention `softmax(q k^T * scale + bias + mask) v`, with an online softmax
/// (no [len_q x len_k] buffer) on every device. Returns [batch, len_q, heads * head_dim];
/// rows of queries that see no key are zero.
///
/// k and v may hold fewer sequences than q, a divisor of q's: with q's batch g times
/// theirs, query sequence b attends to key sequence b / g (the beams of one source
/// sharing its cross-attention keys and values, stored once).
pub fn attention(q: Heads, k: Heads, v: Heads, o: &AttentionOptions) -> Result<Tensor> {
    attention_with(q, k, v, o, false)
}

/// [`attention`] called right after the kernels that computed q (a layer's query
/// projection): whatever else it reads (k, v, the key ranges) was written before those, so
/// the CUDA decode kernels may read it before they wait for the kernel before them.
pub(crate) fn attention_after_projection(
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
) -> Result<Tensor> {
    attention_with(q, k, v, o, true)
}

fn attention_with(
    q: Heads,
    k: Heads,
    v: Heads,
    o: &AttentionOptions,
    settled: bool,
) -> Result<Tensor> {
    const OP: &str = "attention";
    let dt = check_attention(OP, &q, &k, &v, o)?;
    let (batch, len_q) = (q.tensor.shape()[0], q.tensor.shape()[1]);
    let kv_batch = k.tensor.shape()[0];
    // Only the single-query CUDA kernel reads shared rows in place; the other kernels get
    // each query sequence's keys and values gathered.
    if kv_batch != batch && matches!(q.tensor.storage, Storage::Cuda(_)) && len_q != 1 {
        let per = batch / kv_batch;
        let idx: Vec<usize> = (0..batch).map(|b| b / per).collect();
        let k_rows = index_select(k.tensor, &idx)?;
        let v_rows = if std::ptr::eq(k.tensor, v.tensor) {
            None
        } else {
            Some(index_select(v.tensor, &idx)?)
        };
        let kh = Heads {
            tensor: &k_rows,
            col: k.col,
        };
        let vh = Heads {
            tensor: v_rows.as_ref().unwrap_or(&k_rows),
            col: v.col,
        };
        // The gather just wrote the keys and values.
        return run_attention(dt, &q, &kh, &vh, o, None, false);
    }
    run_attention(dt, &q, &k, &v, o, None, settled)
}

/// A step of cached self-attention: [`write_rows_pair`] of the step's keys and values
/// (`src`'s columns from `src_cols.0` and `src_cols.1`, `kv_heads * head_dim` wide) into
/// the caches at `row` (`row_on_device` as there), then [`attention`] of `q` over the
/// caches. Everything is checked before anything is written. On CUDA a single-query step
/// does both in one launch.
pub fn attention_cached(
    q: Heads,
    caches: (&mut Tensor, &mut Tensor),
    row: usize,
    row_on_device: Option<&Tensor>,
    src: &Tensor,
    src_cols: (usize, usize),
    o: &AttentionOptions,
) -> Result<Tensor> {
    attention_cached_rows(q, caches, row, row_on_device, src, src_cols, o, None, false)
}

/// [`attention_cached`] where key position j of sequence b lives in cache row
/// `key_rows[b * len_k + j]` (i32 [batch, len_k]): beam search composes its reorders into
/// that table instead of moving the caches. The step's own keys and values go to each
/// sequence's own row, so the table must name it at `row` and after. Values must be below
/// batch (the CUDA kernel reads them unchecked; the decode state keeps them so).
/// `settled`: called right after the kernels that computed q and `src` (the layer's
/// projection), so that the caches, the table and the ranges were written before those
/// (see [`attention_after_projection`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_cached_rows(
    q: Heads,
    caches: (&mut Tensor, &mut Tensor),
    row: usize,
    row_on_device: Option<&Tensor>,
    src: &Tensor,
    src_cols: (usize, usize),
    o: &AttentionOptions,
    key_rows: Option<&Tensor>,
    settled: bool,
) -> Result<Tensor> {
    const OP: &str = "attention_cached";
    let (kc, vc) = caches;
    let width = o.kv_heads * o.head_dim;
    if kc.shape().first() != q.tensor.shape().first() {
        return Err(Error::op(
            OP,
            format!("caches {:?} for queries {:?}", kc.shape(), q.tensor.shape()),
        ));
    }
    let dt = check_attention(
        OP,
        &q,
        &Heads { tensor: kc, col: 0 },
        &Heads { tensor: vc, col: 0 },
        o,
    )?;
    if let Some(t) = key_rows {
        same_device(OP, &[kc, t])?;
        if t.dtype() != DType::I32 || t.len() != kc.shape()[0] * kc.shape()[1] {
            return Err(Error::op(
                OP,
                format!(
                    "key rows {:?} {} for caches {:?}",
                    t.shape(),
                    t.dtype(),
                    kc.shape()
                ),
            ));
        }
    }
    let one_query = q.tensor.shape().get(1) == Some(&1) && src.shape().get(1) == Some(&1);
    if !(one_query && matches!(src.storage, Storage::Cuda(_))) {
        write_rows_pair((kc, vc), row, row_on_device, src, src_cols, width)?;
        // With a table, keys gathered into their sequences' rows: off the hot path (steps
        // of several positions after a reorder). From `row` on the table names each
        // sequence's own row, so with nothing before it (a prompt, a full forward) it says
        // nothing. (This path is never captured: only single-token steps are, and on CUDA
        // they take the kernel below, which reads the table whatever `row` was at capture.)
        let at_start = row == 0;
        let gathered = match key_rows.filter(|_| !at_start) {
            Some(t) => {
                let rows = t.to_i32_vec()?;
                Some((gather_positions(kc, &rows)?, gather_positions(vc, &rows)?))
            }
            None => None,
        };
        let (kt, vt) = gathered.as_ref().map_or((&*kc, &*vc), |(k, v)| (k, v));
        let (k, v) = (Heads { tensor: kt, col: 0 }, Heads { tensor: vt, col: 0 });
        // The rows were just written.
        return run_attention(dt, &q, &k, &v, o, None, false);
    }
    // The checks of write_rows_pair, for the kernel's own writes.
    row_copy_pair(OP, (kc, vc), row, src, src_cols, width)?;
    let append = cuda::ops::CacheAppend {
        src: src.cuda(OP)?,
        src_width: src.shape()[2],
        cols: src_cols,
        row,
        row_on_device: device_row(OP, row_on_device)?,
        key_rows: key_rows.map(|t| t.cuda(OP)).transpose()?,
    };
    let (k, v) = (Heads { tensor: kc, col: 0 }, Heads { tensor: vc, col: 0 });
    run_attention(dt, &q, &k, &v, o, Some(&append), settled)
}

/// `x` [batch, len, width] with position j of sequence b taken from sequence
/// `rows[b * len + j]`.
fn gather_positions(x: &Tensor, rows: &[i32]) -> Result<Tensor> {
    const OP: &str = "gather_positions";
    let s = x.shape();
    let (batch, len, width) = (s[0], s[1], s[2]);
    if rows.len() != batch * len || rows.iter().any(|&r| r < 0 || r as usize >= batch) {
        return Err(Error::op(
            OP,
            format!("key rows for {batch} x {len} positions"),
        ));
    }
    // Flat source position of each output position.
    let at = |i: usize| rows[i] as usize * len + i % len;
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(
            (0..batch * len)
                .flat_map(|i| v[at(i) * width..(at(i) + 1) * width].iter().copied())
                .collect(),
        ),
        Storage::Cuda(c) => {
            let ids: Vec<i32> = (0..batch * len).map(|i| at(i) as i32).collect();
            let ids = c.device().upload_i32(&ids)?;
            Storage::Cuda(cuda::ops::index_select_dev(c, &ids, batch * len, width)?)
        }
        Storage::CpuI32(_) => return Err(Error::op(OP, "needs a float tensor")),
    };
    Ok(Tensor::from_parts(s.to_vec(), x.dtype(), storage))
}

/// The checks of an [`attention`] call, as errors of `op`; returns the dtype.
fn check_attention(
    op: &'static str,
    q: &Heads,
    k: &Heads,
    v: &Heads,
    o: &AttentionOptions,
) -> Result<DType> {
    same_device(op, &[q.tensor, k.tensor, v.tensor])?;
    let dt = same_float_dtype(op, &[q.tensor, k.tensor, v.tensor])?;
    let (qs, ks, vs) = (q.tensor.shape(), k.tensor.shape(), v.tensor.shape());
    // Keys and values may be shared by consecutive query sequences (a source's beams).
    let shared_ok = ks
        .first()
        .is_some_and(|&n| n > 0 && qs.first().is_some_and(|&b| b % n == 0));
    if qs.len() != 3
        || ks.len() != 3
        || vs.len() != 3
        || ks[..2] != vs[..2]
        || !(qs[0] == ks[0] || shared_ok)
    {
        return Err(Error::op(op, format!("q {qs:?}, k {ks:?}, v {vs:?}")));
    }
    if o.heads == 0 || o.kv_heads == 0 || o.head_dim == 0 || !o.heads.is_multiple_of(o.kv_heads) {
        return Err(Error::op(
            op,
            format!(
                "{} heads over {} kv heads of size {}",
                o.heads, o.kv_heads, o.head_dim
            ),
        ));
    }
    for (side, t, h) in [
        ("q", q, o.heads),
        ("k", k, o.kv_heads),
        ("v", v, o.kv_heads),
    ] {
        if t.col + h * o.head_dim > t.tensor.shape()[2] {
            return Err(Error::op(
                op,
                format!(
                    "{side}: {h} heads of {} from column {} exceed width {}",
                    o.head_dim,
                    t.col,
                    t.tensor.shape()[2]
                ),
            ));
        }
    }
    let (batch, len_q, len_k) = (qs[0], qs[1], ks[1]);
    if o.key_ranges.len() != batch || o.key_ranges.iter().any(|&(a, b)| a > b || b > len_k) {
        return Err(Error::op(
            op,
            format!(
                "key ranges {:?} for {batch} sequences of {len_k} keys",
                o.key_ranges
            ),
        ));
    }
    if let Some(b) = &o.bias {
        let need = o.q_offset + len_q + len_k - 1;
        if b.table.dtype() != DType::F32
            || b.table.shape().len() != 2
            || b.table.shape()[1] != o.heads
            || b.buckets.len() < need
        {
            return Err(Error::op(op, "relative bias table must be f32 [buckets, heads] with a bucket per relative position"));
        }
        let n = b.table.shape()[0] as i32;
        if b.buckets.iter().any(|&x| x < 0 || x >= n) {
            return Err(Error::op(op, "relative bias bucket out of range"));
        }
        same_device(op, &[q.tensor, b.table])?;
    }
    Ok(dt)
}

/// [`attention`] after [`check_attention`]; with `append` (CUDA, one query), the kernel
/// also writes the step's keys and values into k's and v's tensors.
fn run_attention(
    dt: DType,
    q: &Heads,
    k: &Heads,
    v: &Heads,
    o: &AttentionOptions,
    append: Option<&cuda::ops::CacheAppend>,
    settled: bool,
) -> Result<Tensor> {
    let (batch, len_q) = (q.tensor.shape()[0], q.tensor.shape()[1]);
    let storage = match &q.tensor.storage {
        Storage::CpuF32(_) => Storage::CpuF32(cpu::attention(q, k, v, o)?),
        Storage::Cuda(_) => Storage::Cuda(cuda::ops::attention(q, k, v, o, append, settled)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(
        vec![batch, len_q, o.heads * o.head_dim],
        dt,
        storage,
    ))
}

/// Multi-head self-attention over a packed projection: qkv [batch, len, 3 * heads * head_dim]
/// holds q, k and v side by side. Sequence b has `lengths[b]` real tokens at the start (right
/// padding). Returns [batch, len, heads * head_dim].
pub fn self_attention(
    qkv: &Tensor,
    heads: usize,
    lengths: &[usize],
    causal: bool,
    scale: f32,
) -> Result<Tensor> {
    let s = qkv.shape();
    if s.len() != 3 || heads == 0 || !s[2].is_multiple_of(3 * heads) {
        return Err(Error::op(
            "self_attention",
            format!("qkv {s:?} with {heads} heads"),
        ));
    }
    let hidden = s[2] / 3;
    let side = |i: usize| Heads {
        tensor: qkv,
        col: i * hidden,
    };
    let opts = AttentionOptions {
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        scale,
        causal,
        q_offset: 0,
        window: None,
        key_ranges: lengths.iter().map(|&n| (0, n)).collect(),
        bias: None,
        ranges_on_device: None,
    };
    attention(side(0), side(1), side(2), &opts)
}

/// The same values as another float dtype (on the CPU this rounds through the dtype).
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    const OP: &str = "to_dtype";
    same_float_dtype(OP, &[x])?;
    if dtype == DType::I32 {
        return Err(Error::op(OP, "cannot convert floats to i32"));
    }
    if dtype == x.dtype() {
        return x.to_device(&x.device());
    }
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(dtype.round_f32(v)),
        Storage::Cuda(s) => Storage::Cuda(cuda::ops::cast(s, dtype)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dtype, storage))
}

/// RMS normalization over the last dimension of `x + residual` (T5, Llama):
/// `v / sqrt(mean(v^2) + eps) * gamma`.
pub fn rms_norm(x: &Tensor, residual: Option<&Tensor>, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rms_norm";
    let mut all = vec![x, gamma];
    all.extend(residual);
    same_device(OP, &all)?;
    let dt = same_float_dtype(OP, &all)?;
    let h = last_dim(x);
    if gamma.shape() != [h] {
        return Err(Error::op(
            OP,
            format!("x {:?}, gamma {:?}", x.shape(), gamma.shape()),
        ));
    }
    if let Some(r) = residual {
        if r.shape() != x.shape() {
            return Err(Error::op(
                OP,
                format!("residual {:?} != x {:?}", r.shape(), x.shape()),
            ));
        }
    }
    let rows = x.len() / h.max(1);
    let storage = match &x.storage {
        Storage::CpuF32(xv) => Storage::CpuF32(cpu::rms_norm(
            xv,
            residual.map(|r| r.cpu_f32(OP)).transpose()?,
            gamma.cpu_f32(OP)?,
            eps,
            rows,
            h,
        )),
        Storage::Cuda(xs) => Storage::Cuda(cuda::ops::rms_norm(
            xs,
            residual.map(|r| r.cuda(OP)).transpose()?,
            gamma.cuda(OP)?,
            eps,
            rows,
            h,
        )?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dt, storage))
}

/// Gated unit: x [..., 2 * n] holds (gate, up) halves; returns `act(gate) * up` [..., n].
pub fn glu(x: &Tensor, act: Activation) -> Result<Tensor> {
    const OP: &str = "glu";
    let dt = same_float_dtype(OP, &[x])?;
    let w = last_dim(x);
    if x.shape().is_empty() || !w.is_multiple_of(2) {
        return Err(Error::op(
            OP,
            format!("x {:?} has no even last dimension", x.shape()),
        ));
    }
    let n = w / 2;
    let rows = x.len() / w.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(cpu::glu(v, act, rows, n)),
        Storage::Cuda(s) => Storage::Cuda(cuda::ops::glu(s, act, rows, n)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(shape, dt, storage))
}

/// `x * s`.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    const OP: &str = "scale";
    let dt = same_float_dtype(OP, &[x])?;
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(v.iter().map(|a| a * s).collect()),
        Storage::Cuda(st) => Storage::Cuda(cuda::ops::scale(st, s)?),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    };
    Ok(Tensor::from_parts(x.shape().to_vec(), dt, storage))
}

/// Rotary position embedding (the "rotate half" form of GPT-NeoX and Llama), in place.
///
/// x: [batch, len, width]; heads `0..heads` start at columns `col + h * head_dim`. In each
/// head the first `2 * inv_freq.len()` dimensions rotate: pair (p, p + half) turns by angle
/// `positions[row] * inv_freq[p]`, with cos and sin multiplied by `attention_scaling`.
/// positions: i32 [batch * len]; inv_freq: f32 [half] on the same device.
pub fn rotary(
    x: &mut Tensor,
    col: usize,
    heads: usize,
    head_dim: usize,
    positions: &Tensor,
    inv_freq: &Tensor,
    attention_scaling: f32,
) -> Result<()> {
    const OP: &str = "rotary";
    same_device(OP, &[x, positions, inv_freq])?;
    same_float_dtype(OP, &[x])?;
    let s = x.shape().to_vec();
    let half = inv_freq.len();
    if s.len() != 3
        || col + heads * head_dim > s[2]
        || 2 * half > head_dim
        || positions.dtype() != DType::I32
        || positions.len() != s[0] * s[1]
        || inv_freq.dtype() != DType::F32
    {
        return Err(Error::op(
            OP,
            format!("x {s:?}, {heads} heads of {head_dim} from column {col}, positions {:?}, inv_freq {:?}", positions.shape(), inv_freq.shape()),
        ));
    }
    let geom = cpu::RotaryGeometry {
        rows: s[0] * s[1],
        width: s[2],
        col,
        heads,
        head_dim,
        half,
        attention_scaling,
    };
    match &mut x.storage {
        Storage::CpuF32(v) => {
            cpu::rotary(v, positions.cpu_i32(OP)?, inv_freq.cpu_f32(OP)?, &geom);
            Ok(())
        }
        Storage::Cuda(st) => cuda::ops::rotary(st, positions.cuda(OP)?, inv_freq.cuda(OP)?, &geom),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    }
}

/// Rows of `x` (along its first dimension) in the order of `idx`: `out[i] = x[idx[i]]`.
pub fn index_select(x: &Tensor, idx: &[usize]) -> Result<Tensor> {
    const OP: &str = "index_select";
    let s = x.shape();
    if s.is_empty() {
        return Err(Error::op(OP, "needs at least one dimension"));
    }
    let n = s[0];
    if let Some(&bad) = idx.iter().find(|&&i| i >= n) {
        return Err(Error::op(OP, format!("index {bad} out of {n} rows")));
    }
    let row: usize = s[1..].iter().product();
    let mut shape = s.to_vec();
    shape[0] = idx.len();
    let storage = match &x.storage {
        Storage::CpuF32(v) => Storage::CpuF32(
            idx.iter()
                .flat_map(|&i| v[i * row..(i + 1) * row].iter().copied())
                .collect(),
        ),
        Storage::CpuI32(v) => Storage::CpuI32(
            idx.iter()
                .flat_map(|&i| v[i * row..(i + 1) * row].iter().copied())
                .collect(),
        ),
        Storage::Cuda(st) => Storage::Cuda(cuda::ops::index_select(st, idx, row)?),
    };
    Ok(Tensor::from_parts(shape, x.dtype(), storage))
}

/// The geometry of copying `src[:, :, src_col .. src_col + width]` ([batch, t, _]) into
/// `dst[:, row .. row + t, dst_col .. dst_col + width]` ([batch, rows, _]), or an error of
/// `op` when it does not fit.
fn row_copy(
    op: &'static str,
    ds: &[usize],
    row: usize,
    dst_col: usize,
    ss: &[usize],
    src_col: usize,
    width: usize,
) -> Result<cpu::RowCopy> {
    if ds.len() != 3
        || ss.len() != 3
        || ds[0] != ss[0]
        || row + ss[1] > ds[1]
        || dst_col + width > ds[2]
        || src_col + width > ss[2]
    {
        return Err(Error::op(
            op,
            format!("dst {ds:?} at row {row} col {dst_col}, src {ss:?} cols {src_col}+{width}"),
        ));
    }
    Ok(cpu::RowCopy {
        batch: ss[0],
        rows: ss[1],
        width,
        src_width: ss[2],
        src_col,
        dst_rows: ds[1],
        dst_width: ds[2],
        dst_row: row,
        dst_col,
    })
}

/// The device row of a row copy as its kernels read it (i32 [1] on the device).
fn device_row<'a>(
    op: &'static str,
    row_on_device: Option<&'a Tensor>,
) -> Result<Option<&'a crate::backend::cuda::CudaStorage>> {
    match row_on_device {
        Some(t) if t.dtype() == DType::I32 && t.len() == 1 => Ok(Some(t.cuda(op)?)),
        Some(_) => Err(Error::op(op, "the device row must be i32 [1]")),
        None => Ok(None),
    }
}

/// Writes `src[:, :, src_col .. src_col + width]` ([batch, t, _]) into
/// `dst[:, row .. row + t, dst_col .. dst_col + width]` ([batch, rows, _]): appending keys
/// and values to a cache. `row_on_device`, when given, holds `row` as i32 [1] on the
/// device and the kernel reads it there, so a captured decode step writes at the row of
/// each replay.
pub fn write_rows(
    dst: &mut Tensor,
    row: usize,
    row_on_device: Option<&Tensor>,
    dst_col: usize,
    src: &Tensor,
    src_col: usize,
    width: usize,
) -> Result<()> {
    const OP: &str = "write_rows";
    same_device(OP, &[dst, src])?;
    same_float_dtype(OP, &[dst, src])?;
    let g = row_copy(OP, dst.shape(), row, dst_col, src.shape(), src_col, width)?;
    match (&mut dst.storage, &src.storage) {
        (Storage::CpuF32(d), Storage::CpuF32(s)) => {
            cpu::write_rows(d, s, &g);
            Ok(())
        }
        (Storage::Cuda(d), Storage::Cuda(s)) => {
            cuda::ops::write_rows(d, s, device_row(OP, row_on_device)?, &g)
        }
        _ => Err(Error::op(OP, "unsupported storage")),
    }
}

/// Two [`write_rows`] of one source (a layer's keys and values): `dst.0` takes `width`
/// columns of `src` from `src_cols.0`, `dst.1` from `src_cols.1`; one launch on CUDA.
pub fn write_rows_pair(
    dst: (&mut Tensor, &mut Tensor),
    row: usize,
    row_on_device: Option<&Tensor>,
    src: &Tensor,
    src_cols: (usize, usize),
    width: usize,
) -> Result<()> {
    const OP: &str = "write_rows_pair";
    let (a, b) = dst;
    // Both writes are checked before either happens.
    let g = row_copy_pair(OP, (a, b), row, src, src_cols, width)?;
    match (&a.storage, &b.storage, &src.storage) {
        (Storage::Cuda(d0), Storage::Cuda(d1), Storage::Cuda(s)) => {
            let at = device_row(OP, row_on_device)?;
            cuda::ops::write_rows2((d0, d1), s, at, &g, src_cols.1)
        }
        _ => {
            write_rows(a, row, row_on_device, 0, src, src_cols.0, width)?;
            write_rows(b, row, row_on_device, 0, src, src_cols.1, width)
        }
    }
}

/// The checks of [`write_rows_pair`] (destinations of one shape, dtype and device as
/// `src`, both column ranges fitting), as errors of `op`; returns the first copy's geometry.
fn row_copy_pair(
    op: &'static str,
    (a, b): (&Tensor, &Tensor),
    row: usize,
    src: &Tensor,
    src_cols: (usize, usize),
    width: usize,
) -> Result<cpu::RowCopy> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Err(Error::op(
            op,
            format!("destinations {:?} and {:?}", a.shape(), b.shape()),
        ));
    }
    same_device(op, &[a, b, src])?;
    same_float_dtype(op, &[a, src])?;
    let g = row_copy(op, a.shape(), row, 0, src.shape(), src_cols.0, width)?;
    row_copy(op, a.shape(), row, 0, src.shape(), src_cols.1, width)?;
    Ok(g)
}

/// Copies `src` into `dst` (same shape and dtype), keeping `dst`'s storage.
pub fn copy_into(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "copy_into";
    same_device(OP, &[dst, src])?;
    if dst.shape() != src.shape() || dst.dtype() != src.dtype() {
        return Err(Error::op(
            OP,
            format!(
                "{:?} {} into {:?} {}",
                src.shape(),
                src.dtype(),
                dst.shape(),
                dst.dtype()
            ),
        ));
    }
    match (&mut dst.storage, &src.storage) {
        (Storage::CpuF32(d), Storage::CpuF32(s)) => d.copy_from_slice(s),
        (Storage::CpuI32(d), Storage::CpuI32(s)) => d.copy_from_slice(s),
        (Storage::Cuda(d), Storage::Cuda(s)) => d.copy_from(s)?,
        _ => return Err(Error::op(OP, "unsupported storage")),
    }
    Ok(())
}

/// Sets every element of `x` to zero in place.
pub fn zero_(x: &mut Tensor) -> Result<()> {
    match &mut x.storage {
        Storage::CpuF32(v) => v.fill(0.0),
        Storage::CpuI32(v) => v.fill(0),
        Storage::Cuda(s) => s.zero()?,
    }
    Ok(())
}

/// Overwrites i32 tensor `x` with `data` (of its length) from the host, in place.
pub(crate) fn write_i32_(x: &mut Tensor, data: &[i32]) -> Result<()> {
    if x.dtype() != DType::I32 || x.len() != data.len() {
        return Err(Error::op(
            "write_i32",
            format!("{} ids into {:?} {}", data.len(), x.shape(), x.dtype()),
        ));
    }
    match &mut x.storage {
        Storage::CpuI32(v) => v.copy_from_slice(data),
        Storage::Cuda(s) => s.write_i32(data)?,
        Storage::CpuF32(_) => return Err(Error::op("write_i32", "not an i32 tensor")),
    }
    Ok(())
}

/// A tensor whose values are unspecified until written (no fill on the device).
pub fn empty(shape: &[usize], dtype: DType, device: &crate::tensor::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    match device {
        crate::tensor::Device::Cpu => zeros(shape, dtype, device),
        crate::tensor::Device::Cuda(d) => Ok(Tensor::from_parts(
            shape.to_vec(),
            dtype,
            Storage::Cuda(d.alloc(dtype, n)?),
        )),
    }
}

/// A tensor of zeros (set on the device, nothing uploaded).
pub fn zeros(shape: &[usize], dtype: DType, device: &crate::tensor::Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    match device {
        crate::tensor::Device::Cpu => Tensor::from_f32(&vec![0.0; n], shape, dtype, device),
        crate::tensor::Device::Cuda(d) => Ok(Tensor::from_parts(
            shape.to_vec(),
            dtype,
            Storage::Cuda(d.zeros(dtype, n)?),
        )),
    }
}

/// [`index_select`] with the indices already on the device (i32), for reordering many
/// tensors by the same rows with one upload.
pub fn index_select_by(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    const OP: &str = "index_select_by";
    same_device(OP, &[x, idx])?;
    if idx.dtype() != DType::I32 || x.shape().is_empty() {
        return Err(Error::op(
            OP,
            "needs i32 indices and a tensor of at least one dimension",
        ));
    }
    match (&x.storage, &idx.storage) {
        (Storage::Cuda(xs), Storage::Cuda(is)) => {
            let row: usize = x.shape()[1..].iter().product();
            let mut shape = x.shape().to_vec();
            shape[0] = idx.len();
            Ok(Tensor::from_parts(
                shape,
                x.dtype(),
                Storage::Cuda(cuda::ops::index_select_dev(xs, is, idx.len(), row)?),
            ))
        }
        _ => {
            let ids: Vec<usize> = idx.to_i32_vec()?.iter().map(|&i| i as usize).collect();
            index_select(x, &ids)
        }
    }
}

/// Beam reorders in place: row i of every tensor in `xs` ([rows, ...], one dtype and shape)
/// takes the first `prefix` elements of row idx[i] (i32 [rows], each below rows); the rest
/// of each row is unspecified afterwards.
pub fn reorder_row_prefixes(xs: &mut [&mut Tensor], idx: &Tensor, prefix: usize) -> Result<()> {
    const OP: &str = "reorder_row_prefixes";
    let Some(first) = xs.first() else {
        return Ok(());
    };
    let (shape, dt) = (first.shape().to_vec(), first.dtype());
    let rows = shape.first().copied().unwrap_or(0);
    let row: usize = shape.iter().skip(1).product();
    if xs.iter().any(|x| x.shape() != shape || x.dtype() != dt)
        || idx.dtype() != DType::I32
        || idx.len() != rows
        || prefix > row
    {
        return Err(Error::op(
            OP,
            format!(
                "tensors {shape:?} {dt}, {} indices, prefix {prefix}",
                idx.len()
            ),
        ));
    }
    let all: Vec<&Tensor> = xs.iter().map(|x| &**x).chain([idx]).collect();
    same_device(OP, &all)?;
    let cuda: Option<Vec<&crate::backend::cuda::CudaStorage>> = xs
        .iter()
        .map(|x| match &x.storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
        .collect();
    match (cuda, &idx.storage) {
        (Some(c), Storage::Cuda(i)) => cuda::ops::reorder_prefix(&c, i, rows, row, prefix),
        _ => {
            let ids = idx.to_i32_vec()?;
            if ids.iter().any(|&i| i < 0 || i as usize >= rows) {
                return Err(Error::op(OP, "index out of range"));
            }
            let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
            for x in xs.iter_mut() {
                let g = index_select(x, &ids)?;
                copy_into(x, &g)?;
            }
            Ok(())
        }
    }
}

/// [`reorder_row_prefixes`] of one CUDA tensor `x` [rows, ...] through the caller's
/// `scratch` (at least rows x prefix elements of x's dtype), which a caller reordering every
/// step keeps, with its `idx`, instead of allocating them each time.
pub(crate) fn reorder_row_prefix_with(
    x: &mut Tensor,
    idx: &Tensor,
    scratch: &Tensor,
    prefix: usize,
) -> Result<()> {
    const OP: &str = "reorder_row_prefix_with";
    let rows = x.shape().first().copied().unwrap_or(0);
    let row: usize = x.shape().iter().skip(1).product();
    if idx.dtype() != DType::I32 || idx.len() != rows || prefix > row {
        return Err(Error::op(
            OP,
            format!(
                "tensor {:?}, {} indices, prefix {prefix}",
                x.shape(),
                idx.len()
            ),
        ));
    }
    match (&x.storage, &idx.storage, &scratch.storage) {
        (Storage::Cuda(x), Storage::Cuda(i), Storage::Cuda(s)) => {
            cuda::ops::reorder_prefix_one(x, i, s, rows, row, prefix)
        }
        _ => Err(Error::op(OP, "CUDA tensors only")),
    }
}

/// The k most likely tokens of each row of `logits` [rows, vocab]: their log-probabilities
/// (log-softmax over the whole row), ids, and each row's log-sum-exp, on the host. Order:
/// most likely first, ties to the lower id. Rows flagged in an [`EosMask`] exclude its ids,
/// as HF's min-length processor does.
pub struct TopK {
    pub k: usize,
    /// [rows * k]
    pub logprobs: Vec<f32>,
    /// [rows * k]
    pub ids: Vec<i32>,
    /// [rows]
    pub lse: Vec<f32>,
}

/// End-of-sequence ids a [`logprob_topk`] leaves out of the flagged rows.
#[derive(Clone, Copy, Debug)]
pub struct EosMask<'a> {
    /// One flag per row.
    pub rows: &'a [bool],
    pub eos: &'a [i64],
    /// Whether a flagged row's log-sum-exp leaves the ids out too (HF's greedy search and
    /// sampling mask logits before the softmax) or not (its beam search masks
    /// log-probabilities after it).
    pub renormalize: bool,
}

/// See [`TopK`].
pub fn logprob_topk(logits: &Tensor, k: usize, mask_eos: Option<EosMask>) -> Result<TopK> {
    const OP: &str = "logprob_topk";
    same_float_dtype(OP, &[logits])?;
    let s = logits.shape();
    if s.len() != 2 || k == 0 || k > s[1] {
        return Err(Error::op(OP, format!("logits {s:?} with k {k}")));
    }
    let (rows, vocab) = (s[0], s[1]);
    if let Some(m) = mask_eos {
        if m.rows.len() != rows {
            return Err(Error::op(OP, "one mask flag per row"));
        }
    }
    match &logits.storage {
        Storage::CpuF32(v) => Ok(cpu::logprob_topk(v, rows, vocab, k, mask_eos)),
        Storage::Cuda(st) => cuda::ops::logprob_topk(st, rows, vocab, k, mask_eos),
        Storage::CpuI32(_) => unreachable!("checked by same_float_dtype"),
    }
}
