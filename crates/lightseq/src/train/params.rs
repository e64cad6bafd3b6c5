//! Trainable parameters: f32 master values, a copy in the compute dtype when that is not
//! f32, gradients, Adam moments, and how each maps back to the checkpoint's tensors.
//!
//! Gradients are f32, except that on CUDA with a 16-bit compute dtype a weight gradient
//! written whole by one GEMM is kept as that GEMM wrote it, in the compute dtype: these
//! are the values PyTorch AMP's weight gradients have (its f16 GEMM output, cast to f32),
//! at half the bytes for the norm and the optimizer to read. Where a gradient has more
//! than one writer an update (a tied table, several batches an update) the caller keeps
//! it f32 from the start ([`Params::keep_wide`], [`Params::keep_all_wide`]), so every
//! update rounds alike; one found to need adding to otherwise is widened then, and stays
//! f32.

use super::ops::{self as tops, AdamHyper};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::nn::transpose;
use crate::ops::{self, zeros};
use crate::tensor::{DType, Device, Tensor};

/// LIGHTSEQ_WIDE_GRADS=1 keeps every gradient in f32 (for comparing with the default).
fn wide_grads() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    crate::backend::cuda::env_equals(&WIDE, "LIGHTSEQ_WIDE_GRADS", "1")
}

/// Index of a parameter in a [`Params`].
pub type Pid = usize;

/// Named host copies: (checkpoint name, stored shape, f32 values).
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// How a parameter is stored in the checkpoint.
#[derive(Debug, Clone)]
pub enum Stored {
    /// As is, under each of these names (more than one for tied tensors).
    Plain(Vec<String>),
    /// Under `name` with another shape of the same elements (ViT's [1, n, h] tables,
    /// convolution weights kept as matrices).
    Reshaped { name: String, shape: Vec<usize> },
    /// Part `part` of `parts` of a Conv1D weight stored `[in, parts * out]` (GPT2's fused
    /// c_attn); kept here as `[out, in]`.
    Conv1d {
        name: String,
        part: usize,
        parts: usize,
    },
}

/// One parameter.
pub struct Param {
    pub stored: Stored,
    /// Shape used for compute (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    pub value: Tensor,
    compute: Option<Tensor>,
    /// Read it through [`Params::grad`]: while `grad_zero` holds, its values are stale.
    grad: Tensor,
    /// The gradient is zero (since [`Params::zero_grads`], or since the parameter was
    /// made); `grad` is written (or zeroed) by the first update that touches it, so the
    /// buffer is not cleared every step.
    grad_zero: bool,
    /// Whether a whole write of the gradient may keep it in the compute dtype (see the
    /// module's note); cleared for good the first time it has to be widened.
    narrow: bool,
    m: Tensor,
    v: Tensor,
    /// Adam updates applied to this parameter (its bias-correction step).
    pub steps: u64,
}

/// Parameter `p` of `list`, or an error naming it.
fn param_mut(list: &mut [Param], p: Pid) -> Result<&mut Param> {
    list.get_mut(p)
        .ok_or_else(|| Error::Input(format!("no parameter {p}")))
}

/// All trainable parameters of a model.
pub struct Params {
    pub list: Vec<Param>,
    pub dtype: DType,
    pub device: Device,
    /// Checkpoint names of the tensors initialized here because the checkpoint lacked them
    /// (a task head new to the model), in order of creation.
    pub fresh: Vec<String>,
    /// Checkpoint names read into parameters saved under other names (a bare encoder's
    /// tensors, saved with its task model's prefix).
    pub renamed: Vec<String>,
}

impl Params {
    pub fn new(dtype: DType, device: &Device) -> Self {
        Params {
            list: Vec::new(),
            dtype,
            device: device.clone(),
            fresh: Vec::new(),
            renamed: Vec::new(),
        }
    }

    /// A parameter the checkpoint lacks, initialized to `values` and saved as `name`.
    pub fn add_fresh(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<Pid> {
        self.fresh.push(name.to_string());
        self.push(
            Stored::Plain(vec![name.to_string()]),
            shape.to_vec(),
            values,
        )
    }

    fn push(&mut self, stored: Stored, shape: Vec<usize>, values: &[f32]) -> Result<Pid> {
        let dev = &self.device;
        let value = Tensor::from_f32(values, &shape, DType::F32, dev)?;
        let compute = if self.dtype == DType::F32 {
            None
        } else {
            Some(ops::to_dtype(&value, self.dtype)?)
        };
        let narrow = compute.is_some() && dev.is_cuda() && !wide_grads();
        self.list.push(Param {
            stored,
            value,
            compute,
            grad: zeros(&shape, DType::F32, dev)?,
            // Zero: the first write of each gradient overwrites it (and may keep it narrow).
            grad_zero: true,
            narrow,
            m: zeros(&shape, DType::F32, dev)?,
            v: zeros(&shape, DType::F32, dev)?,
            shape,
            steps: 0,
        });
        Ok(self.list.len() - 1)
    }

    /// Loads one tensor stored under the first present of `names`; all of them are written
    /// back when saving.
    pub fn load_tied(&mut self, ck: &Checkpoint, names: &[String], shape: &[usize]) -> Result<Pid> {
        let first = names
            .iter()
            .find(|n| ck.contains(n))
            .ok_or_else(|| Error::MissingTensor {
                dir: ck.dir().to_path_buf(),
                name: names.join(" or "),
            })?;
        self.load_as(ck, first, names, shape)
    }

    /// Loads the checkpoint's tensor `read`, to be saved under `names`.
    pub fn load_as(
        &mut self,
        ck: &Checkpoint,
        read: &str,
        names: &[String],
        shape: &[usize],
    ) -> Result<Pid> {
        let v = ck.read_f32(read, shape)?;
        if !names.iter().any(|n| n == read) {
            self.renamed.push(read.to_string());
        }
        self.push(Stored::Plain(names.to_vec()), shape.to_vec(), &v)
    }

    /// Loads the checkpoint's tensor `read`, stored as `stored`, as a tensor of `shape` (the
    /// same elements in the same order), to be saved as `name` with its stored shape.
    pub fn load_reshaped(
        &mut self,
        ck: &Checkpoint,
        read: &str,
        name: &str,
        stored: &[usize],
        shape: &[usize],
    ) -> Result<Pid> {
        let v = ck.read_f32(read, stored)?;
        if read != name {
            self.renamed.push(read.to_string());
        }
        self.push(
            Stored::Reshaped {
                name: name.to_string(),
                shape: stored.to_vec(),
            },
            shape.to_vec(),
            &v,
        )
    }

    /// Loads the `parts` column blocks of a Conv1D weight `[in, parts * out]` as separate
    /// `[out, in]` parameters.
    pub fn load_conv1d(
        &mut self,
        ck: &Checkpoint,
        name: &str,
        n_in: usize,
        out: usize,
        parts: usize,
    ) -> Result<Vec<Pid>> {
        let v = ck.read_f32(name, &[n_in, parts * out])?;
        let t = transpose(&v, n_in, parts * out); // [parts * out, in]
        self.push_parts(name, &t, parts, &[out, n_in])
    }

    /// Pushes `parts` consecutive equal blocks of `values` as parameters of `shape`, parts
    /// of checkpoint tensor `name`.
    fn push_parts(
        &mut self,
        name: &str,
        values: &[f32],
        parts: usize,
        shape: &[usize],
    ) -> Result<Vec<Pid>> {
        let per = values.len() / parts;
        (0..parts)
            .map(|p| {
                self.push(
                    Stored::Conv1d {
                        name: name.to_string(),
                        part: p,
                        parts,
                    },
                    shape.to_vec(),
                    &values[p * per..(p + 1) * per],
                )
            })
            .collect()
    }

    /// Loads a bias stored as one `[parts * out]` vector, split in `parts`.
    pub fn load_split_bias(
        &mut self,
        ck: &Checkpoint,
        name: &str,
        out: usize,
        parts: usize,
    ) -> Result<Vec<Pid>> {
        let v = ck.read_f32(name, &[parts * out])?;
        self.push_parts(name, &v, parts, &[out])
    }

    /// The weight as compute uses it (the compute-dtype copy, or the f32 master).
    pub fn w(&self, p: Pid) -> &Tensor {
        let q = &self.list[p];
        q.compute.as_ref().unwrap_or(&q.value)
    }

    /// Parameter `p`'s gradient.
    pub fn grad(&mut self, p: Pid) -> Result<&Tensor> {
        self.materialize(p)?;
        Ok(&self.list[p].grad)
    }

    /// Zeroes `p`'s gradient buffer (as f32) if it is stale ([`Param::grad_zero`]).
    fn materialize(&mut self, p: Pid) -> Result<()> {
        let q = param_mut(&mut self.list, p)?;
        if q.grad_zero {
            q.grad = zeros(&q.shape, DType::F32, &self.device)?;
            q.grad_zero = false;
        }
        Ok(())
    }

    /// [`Params::materialize`], and an f32 gradient to add into: one kept in the compute
    /// dtype is widened, and is kept f32 from then on.
    fn writable(&mut self, p: Pid) -> Result<()> {
        self.materialize(p)?;
        let q = &mut self.list[p];
        if q.grad.dtype() != DType::F32 {
            q.grad = ops::to_dtype(&q.grad, DType::F32)?;
            q.narrow = false;
        }
        Ok(())
    }

    /// Keeps `p`'s gradient in f32: for a parameter with more than one writer an update
    /// (a table tied to an output head), whose gradient is added to.
    pub fn keep_wide(&mut self, p: Pid) -> Result<()> {
        param_mut(&mut self.list, p)?.narrow = false;
        Ok(())
    }

    /// Keeps every gradient in f32: for updates that sum several batches' gradients.
    pub fn keep_all_wide(&mut self) {
        for q in &mut self.list {
            q.narrow = false;
        }
    }

    /// Whether the next write of `p`'s gradient overwrites it and may keep it in the
    /// compute dtype (see the module's note).
    pub fn narrow_write(&self, p: Pid) -> bool {
        self.list.get(p).is_some_and(|q| q.grad_zero && q.narrow)
    }

    /// Readies `p`'s stale gradient buffer to be written whole in `dt`: the compute dtype
    /// where [`Params::narrow_write`] allows, else f32. Marks the gradient written.
    fn overwrite_in(&mut self, p: Pid, dt: DType) -> Result<()> {
        let dev = self.device.clone();
        let q = param_mut(&mut self.list, p)?;
        let dt = if q.narrow && dt == self.dtype {
            dt
        } else {
            DType::F32
        };
        if q.grad.dtype() != dt {
            q.grad = ops::empty(&q.shape, dt, &dev)?;
        }
        q.grad_zero = false;
        Ok(())
    }

    /// Adds `g` (any float dtype, same element count) into parameter `p`'s gradient.
    pub fn accumulate(&mut self, p: Pid, g: &Tensor) -> Result<()> {
        self.writable(p)?;
        tops::add_scaled_into(&mut self.list[p].grad, g, 1.0)
    }

    /// Adds `src[offset..offset + n]`, n being `p`'s element count, into `p`'s gradient:
    /// `p`'s share of a gradient computed for several parameters at once. `src` is f32, or
    /// in the compute dtype where [`Params::narrow_write`] holds (it is then copied as is).
    pub fn accumulate_range(&mut self, p: Pid, src: &Tensor, offset: usize) -> Result<()> {
        let overwrite = param_mut(&mut self.list, p)?.grad_zero;
        if overwrite {
            self.overwrite_in(p, src.dtype())?;
        } else {
            self.writable(p)?;
        }
        let q = &mut self.list[p];
        if q.grad.dtype() == src.dtype() {
            return tops::add_range_into(&mut q.grad, src, offset, overwrite);
        }
        // A 16-bit `src` whose part goes to an f32 gradient: only where one parameter takes
        // two parts (the first write narrowed it, the second widened it).
        let wide = ops::to_dtype(src, DType::F32)?;
        tops::add_range_into(&mut q.grad, &wide, offset, overwrite)
    }

    /// Adds the weight gradient `dy^T @ x` of `y = x @ w^T + b` into parameter `p`'s
    /// gradient, and with `bias`, dy's column sums into that parameter's.
    pub fn accumulate_weight_grad(
        &mut self,
        p: Pid,
        bias: Option<Pid>,
        dy: &Tensor,
        x: &Tensor,
    ) -> Result<()> {
        let (w, overwrite, b) = self.weight_grads(p, bias, dy.dtype())?;
        tops::linear_weight_grad_into(w, b, dy, x, overwrite)
    }

    /// [`Params::accumulate_weight_grad`] with dy the column block [col, col + n) of
    /// `dy_wide` [.., w] (CUDA), read in place.
    pub fn accumulate_weight_grad_cols(
        &mut self,
        p: Pid,
        bias: Option<Pid>,
        dy_cols: (&Tensor, usize, usize),
        x: &Tensor,
    ) -> Result<()> {
        let (w, overwrite, b) = self.weight_grads(p, bias, dy_cols.0.dtype())?;
        tops::linear_weight_grad_cols_into(w, b, dy_cols, x, overwrite)
    }

    /// [`Params::grads_mut`] for a write that covers all of the weight's gradient: the
    /// gradient, whether the write should overwrite it (the gradient is zero, its buffer
    /// stale) rather than add into it, and the bias's gradient. An overwritten gradient
    /// comes in `dy_dtype` where that is the compute dtype and the parameter may keep it
    /// so (see the module's note), else f32. The weight's gradient counts as written from
    /// here on.
    #[allow(clippy::type_complexity)]
    pub fn weight_grads(
        &mut self,
        p: Pid,
        bias: Option<Pid>,
        dy_dtype: DType,
    ) -> Result<(&mut Tensor, bool, Option<&mut Tensor>)> {
        if let Some(b) = bias {
            self.writable(b)?;
        }
        let overwrite = param_mut(&mut self.list, p)?.grad_zero;
        if overwrite {
            // Written whole by the caller's GEMM, in dy's dtype where that is the compute
            // dtype and narrow writes are allowed.
            self.overwrite_in(p, dy_dtype)?;
        } else {
            self.writable(p)?;
        }
        let (w, b) = self.split_grads(p, bias)?;
        Ok((w, overwrite, b))
    }

    /// Parameter `read` as compute uses it (see [`Params::w`]) with the gradients of `p`, `q`
    /// and `r` when given (all distinct, else an error), borrowed at once.
    #[allow(clippy::type_complexity)]
    pub fn w_and_grads(
        &mut self,
        read: Pid,
        p: Pid,
        q: Pid,
        r: Option<Pid>,
    ) -> Result<(&Tensor, &mut Tensor, &mut Tensor, Option<&mut Tensor>)> {
        for i in [Some(p), Some(q), r].into_iter().flatten() {
            self.writable(i)?;
        }
        let (mut w, mut gp, mut gq, mut gr) = (None, None, None, None);
        for (i, par) in self.list.iter_mut().enumerate() {
            // Disjoint fields of one element may be borrowed separately.
            let Param {
                value,
                compute,
                grad,
                ..
            } = par;
            if i == read {
                w = Some(compute.as_ref().unwrap_or(value) as &Tensor);
            }
            if i == p {
                gp = Some(grad);
            } else if i == q {
                gq = Some(grad);
            } else if Some(i) == r {
                gr = Some(grad);
            }
        }
        match (w, gp, gq) {
            (Some(w), Some(gp), Some(gq)) if p != q && r.is_some() == gr.is_some() => {
                Ok((w, gp, gq, gr))
            }
            _ => Err(Error::Input(format!(
                "parameters {read}, {p}, {q}, {r:?}: out of range or the gradients coincide"
            ))),
        }
    }

    /// The gradients of `ids` (distinct), borrowed mutably at once, in that order.
    pub fn grads_of(&mut self, ids: &[Pid]) -> Result<Vec<&mut Tensor>> {
        for &i in ids {
            self.writable(i)?;
        }
        let mut slots: Vec<Option<&mut Tensor>> = ids.iter().map(|_| None).collect();
        for (i, q) in self.list.iter_mut().enumerate() {
            if let Some(at) = ids.iter().position(|&p| p == i) {
                slots[at] = Some(&mut q.grad);
            }
        }
        slots
            .into_iter()
            .map(|g| {
                g.ok_or_else(|| {
                    Error::Input(format!(
                        "parameters {ids:?}: out of range or the gradients coincide"
                    ))
                })
            })
            .collect()
    }

    /// The gradients of a weight and of its bias, borrowed mutably at once.
    pub fn grads_mut(
        &mut self,
        p: Pid,
        bias: Option<Pid>,
    ) -> Result<(&mut Tensor, Option<&mut Tensor>)> {
        for i in std::iter::once(p).chain(bias) {
            self.writable(i)?;
        }
        self.split_grads(p, bias)
    }

    /// The gradients of `p` and `bias`, as they are.
    fn split_grads(
        &mut self,
        p: Pid,
        bias: Option<Pid>,
    ) -> Result<(&mut Tensor, Option<&mut Tensor>)> {
        let Some(b) = bias else {
            return Ok((&mut self.list[p].grad, None));
        };
        if b == p {
            return Err(Error::Input(format!(
                "parameter {p} given as both weight and bias"
            )));
        }
        // Two distinct elements of the list.
        let (lo, hi) = self.list.split_at_mut(p.max(b));
        let (w, bias) = if p < b {
            (&mut lo[p], &mut hi[0])
        } else {
            (&mut hi[0], &mut lo[b])
        };
        Ok((&mut w.grad, Some(&mut bias.grad)))
    }

    /// Zeroes every gradient (lazily: see [`Param::grad_zero`]).
    pub fn zero_grads(&mut self) -> Result<()> {
        for q in &mut self.list {
            q.grad_zero = true;
        }
        Ok(())
    }

    /// Zeroes the buffers of the gradients no update has touched since
    /// [`Params::zero_grads`].
    fn materialize_all(&mut self) -> Result<()> {
        (0..self.list.len()).try_for_each(|p| self.materialize(p))
    }

    /// Global L2 norm of all gradients (times `scale`).
    pub fn grad_norm(&mut self, scale: f64) -> Result<f64> {
        self.materialize_all()?;
        let grads: Vec<&Tensor> = self.list.iter().map(|q| &q.grad).collect();
        Ok(tops::sum_squares_all(&grads)?.sqrt() * scale)
    }

    /// One Adam(W) step on every parameter with gradients multiplied by `grad_scale`,
    /// then refreshes the compute copies.
    pub fn adam(&mut self, h: &AdamHyper) -> Result<()> {
        self.materialize_all()?;
        let mut slots: Vec<tops::AdamSlot> = self
            .list
            .iter_mut()
            .map(|q| {
                q.steps += 1;
                tops::AdamSlot {
                    param: &mut q.value,
                    grad: &q.grad,
                    m: &mut q.m,
                    v: &mut q.v,
                    copy: q.compute.as_mut(),
                    step: q.steps,
                }
            })
            .collect();
        tops::adam_step_all(&mut slots, h)
    }

    /// The tensors to write, under checkpoint names and stored shapes (f32).
    pub fn state_dict(&self) -> Result<NamedTensors> {
        self.named(|q| &q.value)
    }

    /// The gradients under checkpoint names and stored shapes.
    pub fn grad_dict(&mut self) -> Result<NamedTensors> {
        self.materialize_all()?;
        self.named(|q| &q.grad)
    }

    fn named(&self, pick: impl Fn(&Param) -> &Tensor) -> Result<NamedTensors> {
        type Part = (usize, usize, Vec<usize>, Vec<f32>);
        let mut out: NamedTensors = Vec::new();
        let mut parts: std::collections::BTreeMap<String, Vec<Part>> = Default::default();
        for q in &self.list {
            let v = pick(q).to_f32_vec()?;
            match &q.stored {
                Stored::Plain(names) => {
                    for n in names {
                        out.push((n.clone(), q.shape.clone(), v.clone()));
                    }
                }
                Stored::Reshaped { name, shape } => {
                    out.push((name.clone(), shape.clone(), v));
                }
                Stored::Conv1d {
                    name,
                    part,
                    parts: n,
                } => {
                    parts
                        .entry(name.clone())
                        .or_default()
                        .push((*part, *n, q.shape.clone(), v));
                }
            }
        }
        for (name, mut ps) in parts {
            ps.sort_by_key(|p| p.0);
            if ps[0].2.len() == 1 {
                let all: Vec<f32> = ps.iter().flat_map(|p| p.3.iter().copied()).collect();
                out.push((name, vec![all.len()], all));
            } else {
                let (o, i) = (ps[0].2[0], ps[0].2[1]);
                // Stacked [parts * out, in] back to Conv1D's [in, parts * out].
                let stacked: Vec<f32> = ps.iter().flat_map(|p| p.3.iter().copied()).collect();
                let rows = ps.len() * o;
                out.push((name, vec![i, rows], transpose(&stacked, rows, i)));
            }
        }
        Ok(out)
    }

    /// Optimizer state (moments and step counts), for `--resume`.
    pub fn optimizer_state(&self) -> Result<NamedTensors> {
        let mut out = Vec::new();
        for (i, q) in self.list.iter().enumerate() {
            out.push((format!("{i}.m"), q.shape.clone(), q.m.to_f32_vec()?));
            out.push((format!("{i}.v"), q.shape.clone(), q.v.to_f32_vec()?));
            out.push((format!("{i}.step"), vec![1], vec![q.steps as f32]));
        }
        Ok(out)
    }

    /// Restores what [`Params::optimizer_state`] wrote.
    pub fn load_optimizer_state(
        &mut self,
        f: &crate::io::safetensors::SafeTensorsFile,
    ) -> Result<()> {
        let dev = self.device.clone();
        for (i, q) in self.list.iter_mut().enumerate() {
            let get = |k: &str| -> Result<Vec<f32>> {
                let (shape, v) = f.read_f32(&format!("{i}.{k}"))?;
                if k != "step" && shape != q.shape {
                    return Err(Error::Input(format!(
                        "optimizer state {i}.{k} has shape {shape:?}, the model's parameter {:?}",
                        q.shape
                    )));
                }
                Ok(v)
            };
            q.m = Tensor::from_f32(&get("m")?, &q.shape, DType::F32, &dev)?;
            q.v = Tensor::from_f32(&get("v")?, &q.shape, DType::F32, &dev)?;
            q.steps = get("step")?[0] as u64;
        }
        Ok(())
    }
}
