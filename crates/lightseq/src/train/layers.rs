//! Layers with their backward passes, on any device: linear, layer norm, dropout,
//! multi-head attention (self and cross), the feed-forward block, Transformer layers
//! (pre- and post-LN, with optional cross attention) and embeddings. Forward passes
//! return what their backward needs; backward passes add parameter gradients into
//! [`Params`] and return input gradients.

use super::ops::{self as tops, Mats};
use super::params::{Params, Pid};
use crate::error::{Error, Result};
use crate::ops::{self, Activation};
use crate::tensor::{DType, Tensor};
use std::cell::Cell;

/// Dropout rates and the Philox stream they draw from.
pub struct Dropout {
    pub hidden: f32,
    pub attention: f32,
    pub activation: f32,
    pub seed: u64,
    /// Next Philox offset; every dropout call takes one.
    pub offset: Cell<u64>,
}

impl Dropout {
    pub fn off() -> Self {
        Dropout {
            hidden: 0.0,
            attention: 0.0,
            activation: 0.0,
            seed: 0,
            offset: Cell::new(0),
        }
    }

    /// Applies rate `p` to `x`; returns the output and the offset its backward reuses.
    pub fn apply(&self, x: Tensor, p: f32) -> Result<(Tensor, Option<u64>)> {
        let (y, off) = self.apply_ref(&x, p)?;
        Ok((y.unwrap_or(x), off))
    }

    /// Takes the next Philox offset for a dropout of rate `p` that a fused kernel applies
    /// (None when `p` is 0), as [`Dropout::apply_ref`] would.
    pub fn reserve(&self, p: f32) -> Option<u64> {
        if p <= 0.0 {
            return None;
        }
        let off = self.offset.get();
        self.offset.set(off + 1);
        Some(off)
    }

    /// [`Dropout::apply`] keeping the input: None when no dropout applies (use `x`).
    pub fn apply_ref(&self, x: &Tensor, p: f32) -> Result<(Option<Tensor>, Option<u64>)> {
        match self.reserve(p) {
            Some(off) => Ok((Some(tops::dropout(x, p, self.seed, off)?), Some(off))),
            None => Ok((None, None)),
        }
    }

    /// The backward of [`Dropout::apply_ref`]: None when it was a no-op.
    pub fn backward_ref(&self, dy: &Tensor, p: f32, off: Option<u64>) -> Result<Option<Tensor>> {
        match off {
            Some(o) => Ok(Some(tops::dropout(dy, p, self.seed, o)?)),
            None => Ok(None),
        }
    }

    /// The backward of [`Dropout::apply`].
    pub fn backward(&self, dy: Tensor, p: f32, off: Option<u64>) -> Result<Tensor> {
        Ok(self.backward_ref(&dy, p, off)?.unwrap_or(dy))
    }
}

/// `y = x @ w^T + b`.
#[derive(Debug, Clone, Copy)]
pub struct Lin {
    pub w: Pid,
    pub b: Option<Pid>,
}

impl Lin {
    pub fn forward(&self, ps: &Params, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, ps.w(self.w), self.b.map(|b| ps.w(b)), Activation::None)
    }

    /// [`Lin::forward`] plus `res` when given (a residual, added by the GEMM).
    pub fn forward_add(&self, ps: &Params, x: &Tensor, res: Option<&Tensor>) -> Result<Tensor> {
        match res {
            Some(r) => tops::linear_add(x, ps.w(self.w), self.b.map(|b| ps.w(b)), r),
            None => self.forward(ps, x),
        }
    }

    /// Adds dW, db; returns dx.
    pub fn backward(&self, ps: &mut Params, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        self.backward_params(ps, x, dy)?;
        tops::linear_input_grad(dy, ps.w(self.w))
    }

    /// Adds dW, db, and dx into `acc` (which must not share its storage).
    pub fn backward_into(
        &self,
        ps: &mut Params,
        x: &Tensor,
        dy: &Tensor,
        acc: &mut Tensor,
    ) -> Result<()> {
        self.backward_params(ps, x, dy)?;
        tops::linear_input_grad_into(acc, dy, ps.w(self.w))
    }

    pub fn backward_params(&self, ps: &mut Params, x: &Tensor, dy: &Tensor) -> Result<()> {
        ps.accumulate_weight_grad(self.w, self.b, dy, x)
    }

    /// Adds dW, db; dx added into `acc` and returned, or returned alone when None.
    pub fn backward_to(
        &self,
        ps: &mut Params,
        x: &Tensor,
        dy: &Tensor,
        acc: Option<Tensor>,
    ) -> Result<Tensor> {
        match acc {
            Some(mut acc) => {
                self.backward_into(ps, x, dy, &mut acc)?;
                Ok(acc)
            }
            None => self.backward(ps, x, dy),
        }
    }
}

/// A sublayer's output gradient, and where its backward leaves the input gradient.
pub enum Dout<'a> {
    /// Read this; return the input gradient alone.
    Alone(&'a Tensor),
    /// Read the first (or the accumulator itself when None) and return the accumulator
    /// with the input gradient added: a post-LN residual's gradient, summed by the
    /// input-gradient GEMMs (beta = 1) instead of a separate pass. With `true`, the
    /// sublayer's output bias already has its gradient (the layer norm's backward summed
    /// the columns of the same gradient).
    Into(Option<&'a Tensor>, Tensor, bool),
}

impl Dout<'_> {
    fn read(&self) -> &Tensor {
        match self {
            Dout::Alone(d) | Dout::Into(Some(d), _, _) => d,
            Dout::Into(None, acc, _) => acc,
        }
    }

    /// The sublayer's output projection as its backward runs: without the bias when its
    /// gradient is already added.
    fn out(&self, lin: &Lin) -> Lin {
        match self {
            Dout::Into(_, _, true) => Lin { b: None, ..*lin },
            _ => *lin,
        }
    }

    fn acc(self) -> Option<Tensor> {
        match self {
            Dout::Alone(_) => None,
            Dout::Into(_, acc, _) => Some(acc),
        }
    }
}

/// Layer normalization over the last dim.
#[derive(Debug, Clone, Copy)]
pub struct Ln {
    pub g: Pid,
    pub b: Pid,
    pub eps: f32,
}

impl Ln {
    pub fn forward(&self, ps: &Params, x: &Tensor) -> Result<Tensor> {
        Ok(tops::add_layer_norm(x, None, ps.w(self.g), ps.w(self.b), self.eps)?.1)
    }

    /// [`Ln::forward`], also returning the rows' statistics where the device keeps them
    /// (for [`Ln::backward_summing`]).
    pub fn forward_keep(&self, ps: &Params, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let f = tops::add_layer_norm_stats(x, None, ps.w(self.g), ps.w(self.b), self.eps, true)?;
        Ok((f.out, f.stats))
    }

    /// `(x + y, LN(x + y))` in one pass, and the rows' statistics as
    /// [`Ln::forward_keep`].
    pub fn add_forward(
        &self,
        ps: &Params,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (g, b) = (ps.w(self.g), ps.w(self.b));
        let f = tops::add_layer_norm_stats(x, Some(y), g, b, self.eps, true)?;
        let s = f.sum.expect("add_layer_norm returns the sum when given y");
        Ok((s, f.out, f.stats))
    }

    pub fn backward(&self, ps: &mut Params, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        self.backward_summing(ps, x, dy, None, None)
    }

    /// [`Ln::backward`], adding the column sums of dx into the gradient of `bias` when
    /// given (the bias of a linear whose output, plus the residual, is `x`). `stats` are
    /// the forward's of this `x`, when it kept them.
    pub fn backward_summing(
        &self,
        ps: &mut Params,
        x: &Tensor,
        dy: &Tensor,
        bias: Option<Pid>,
        stats: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (gamma, dg, db, dbias) = ps.w_and_grads(self.g, self.g, self.b, bias)?;
        tops::layer_norm_backward_into(x, gamma, dy, self.eps, dg, db, dbias, stats)
    }
}

/// The parameter gradients of projections `lins` of input `x` from their packed output
/// gradient `g` (column block i of width h is lins[i]'s).
/// Where every projection has a bias, one pass over `g` sums all their bias gradients, or
/// over `sums` when given (partial column sums with the same column blocks).
/// Where every projection has one or none has, the weight gradients come from one GEMM over
/// all of `g` into a scratch buffer, whose row blocks are then each weight's: at
/// Transformer-big's shapes that GEMM fills the GPU without the split-K reductions that
/// one 1024-wide weight gradient at a time takes. Otherwise each weight's gradient reads
/// its column block of `g` in place.
fn packed_param_grads(
    ps: &mut Params,
    lins: &[&Lin],
    (g, sums): (&Tensor, Option<&Tensor>),
    h: usize,
    x: &Tensor,
) -> Result<()> {
    let biases = lins.iter().map(|l| l.b).collect::<Option<Vec<Pid>>>();
    if let Some(ids) = &biases {
        tops::column_sum_parts_into(&mut ps.grads_of(ids)?, sums.unwrap_or(g))?;
    }
    let none_biased = lins.iter().all(|l| l.b.is_none());
    let n = lins.len() * h;
    let k = x.shape().last().copied().unwrap_or(1);
    let blocks_fit = lins
        .iter()
        .all(|l| ps.list.get(l.w).is_some_and(|p| p.shape == [h, k]));
    if (biases.is_some() || none_biased) && g.shape().last() == Some(&n) && blocks_fit {
        // In g's dtype where every weight's gradient may be kept so (see params.rs).
        let narrow = lins.iter().all(|l| ps.narrow_write(l.w)) && g.dtype() == ps.dtype;
        let dt = if narrow { g.dtype() } else { DType::F32 };
        let mut wide = ops::empty(&[n, k], dt, &x.device())?;
        tops::linear_weight_grad_cols_into(&mut wide, None, (g, 0, n), x, true)?;
        for (i, lin) in lins.iter().enumerate() {
            ps.accumulate_range(lin.w, &wide, i * h * k)?;
        }
        return Ok(());
    }
    for (i, lin) in lins.iter().enumerate() {
        let b = if biases.is_some() { None } else { lin.b };
        ps.accumulate_weight_grad_cols(lin.w, b, (g, i * h, h), x)?;
    }
    Ok(())
}

/// Multi-head attention with separate q, k, v and output projections.
pub struct Attn {
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
    pub heads: usize,
    pub scale: f32,
}

/// What [`attend_backward`] needs.
pub struct CoreSaved {
    inputs: Inputs,
    /// The probabilities; None with the fused attention, whose backward computes them again
    /// from q, k and the mask.
    p: Option<Tensor>,
    /// P after dropout; None when attention dropout is off.
    pd: Option<Tensor>,
    /// The fused backward's mask: a copy of the key lengths, and causality.
    key_lens: Option<Tensor>,
    causal: bool,
    drop: Option<u64>,
    heads: usize,
    scale: f32,
    dims: (usize, usize, usize, usize),
    /// Saved by [`tops::short_attention`]; the backward is its fused backward.
    fused: bool,
}

/// Attention's q, k and v as the backward reads them. (One per attention layer: boxing
/// the larger variant would only add an allocation.)
#[allow(clippy::large_enum_variant)]
enum Inputs {
    Separate(Tensor, Tensor, Tensor),
    /// One projection's output [len, batch, 3 h] holding q, k and v as column blocks (only
    /// with the fused attention, which reads the blocks in place).
    Packed(Tensor),
    /// q, and one projection's output [lk, batch, 2 h] holding k and v (cross attention;
    /// only with the fused attention, as Packed).
    PackedKv(Tensor, Tensor),
}

impl Inputs {
    fn qkv(&self) -> tops::Qkv<'_> {
        match self {
            Inputs::Separate(q, k, v) => tops::Qkv::Separate(q, k, v),
            Inputs::Packed(t) => tops::Qkv::Packed(t),
            Inputs::PackedKv(q, kv) => tops::Qkv::PackedKv(q, kv),
        }
    }
}

/// What attention's backward needs.
pub struct AttnSaved {
    core: CoreSaved,
    ctx: Tensor,
    /// The stacked weights of the packed projections: q's, k's and v's where
    /// [`Attn::forward_self`] packed them, k's and v's where [`Attn::forward_cross`] did.
    stacked: Option<Tensor>,
}

/// Every head of a [len, batch, heads * d] activation as a matrix [len, d] inside it: head
/// h of sequence b (batch index b * heads + h) starts at element (b * heads + h) * d and its
/// rows are batch * heads * d apart. The attention GEMMs read and write heads in place.
fn head_mats(t: &Tensor, row: usize, d: usize) -> Mats<'_> {
    Mats {
        t,
        ld: row,
        stride: d,
    }
}

/// `a_h @ b_h^T` for every head h of `a` [lq, batch, heads * d] and `b` [lk, batch, heads *
/// d], read in place: [batch, heads, lq, lk].
fn head_scores(
    a: &Tensor,
    b: &Tensor,
    (batch, heads, lq, lk, d): (usize, usize, usize, usize, usize),
) -> Result<Tensor> {
    let row = batch * heads * d;
    tops::matmul_strided(
        head_mats(a, row, d),
        false,
        head_mats(b, row, d),
        true,
        batch * heads,
        lq,
        lk,
        d,
        lk,
        lq * lk,
        &[batch, heads, lq, lk],
    )
}

/// Score-shaped [batch, heads, lq, lk] matrices, contiguous.
fn score_mats(t: &Tensor, lq: usize, lk: usize) -> Mats<'_> {
    Mats {
        t,
        ld: lk,
        stride: lq * lk,
    }
}

/// `op(p_h) @ x_h` for every head h: p [batch, heads, lq, lk] (transposed per head with
/// `transpose`) times the heads of x, read in place, into [rows, batch, heads * d] where
/// rows is lq, or lk when transposed.
fn scores_by_heads(
    p: &Tensor,
    transpose: bool,
    x: &Tensor,
    (batch, heads, lq, lk, d): (usize, usize, usize, usize, usize),
) -> Result<Tensor> {
    let row = batch * heads * d;
    let (rows, inner) = if transpose { (lk, lq) } else { (lq, lk) };
    tops::matmul_strided(
        score_mats(p, lq, lk),
        transpose,
        head_mats(x, row, d),
        false,
        batch * heads,
        rows,
        d,
        inner,
        row,
        d,
        &[rows, batch, heads * d],
    )
}

/// Scaled dot-product attention of projected q [lq, b, h] over k, v [lk, b, h] with
/// `heads` heads: softmax(scale q k^T + mask) v, keys at or past `key_lens[b]` and, when
/// `causal`, keys after the query masked; attention dropout on the probabilities.
/// Returns the context [lq, b, h].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    drop: &Dropout,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: usize,
    scale: f32,
    key_lens: Option<&Tensor>,
    causal: bool,
) -> Result<(Tensor, CoreSaved)> {
    attend_inputs(
        drop,
        Inputs::Separate(q, k, v),
        heads,
        scale,
        key_lens,
        causal,
    )
}

/// [`attend`] for self-attention over one projection's output qkv [len, b, 3 h] holding q,
/// k and v as column blocks; only where the fused attention runs
/// ([`tops::Qkv::fits`]), else an error.
pub fn attend_packed(
    drop: &Dropout,
    qkv: Tensor,
    heads: usize,
    scale: f32,
    key_lens: Option<&Tensor>,
    causal: bool,
) -> Result<(Tensor, CoreSaved)> {
    attend_inputs(drop, Inputs::Packed(qkv), heads, scale, key_lens, causal)
}

/// [`attend`] for cross attention of q [lq, b, h] over one projection's output kv [lk, b,
/// 2 h] holding k and v as column blocks; only where the fused attention runs, else an
/// error.
pub fn attend_packed_kv(
    drop: &Dropout,
    q: Tensor,
    kv: Tensor,
    heads: usize,
    scale: f32,
    key_lens: Option<&Tensor>,
) -> Result<(Tensor, CoreSaved)> {
    attend_inputs(drop, Inputs::PackedKv(q, kv), heads, scale, key_lens, false)
}

fn attend_inputs(
    drop: &Dropout,
    inputs: Inputs,
    heads: usize,
    scale: f32,
    key_lens: Option<&Tensor>,
    causal: bool,
) -> Result<(Tensor, CoreSaved)> {
    let fused = inputs.qkv().fits(heads);
    let (ctx, p, pd, off, dims) = if fused {
        // One fused pass; the dropout offset is taken as apply_ref would.
        let off = drop.reserve(drop.attention);
        let spec = off.map(|o| (drop.attention, drop.seed, o));
        let qkv = inputs.qkv();
        let out = tops::short_attention(qkv, heads, scale, key_lens, causal, spec)?;
        let ctx = out.ok_or_else(|| Error::op("attend", "the fused attention did not run"))?;
        let (lq, lk, b, h) = qkv.dims().expect("the fused attention checked the shapes");
        (ctx, None, None, off, (b, lq, lk, h / heads))
    } else {
        let Inputs::Separate(q, k, v) = &inputs else {
            return Err(Error::op(
                "attend",
                "packed q, k, v (or k, v) need the fused attention",
            ));
        };
        let (lq, b, h) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let lk = k.shape()[0];
        let (nh, d) = (heads, h / heads);
        let s = head_scores(q, k, (b, nh, lq, lk, d))?;
        let p = tops::masked_softmax(&s, key_lens, scale, causal)?;
        std::mem::drop(s);
        let (pd, off) = drop.apply_ref(&p, drop.attention)?;
        let ctx = scores_by_heads(pd.as_ref().unwrap_or(&p), false, v, (b, nh, lq, lk, d))?;
        (ctx, Some(p), pd, off, (b, lq, lk, d))
    };
    // The caller keeps its key lengths only for the forward; a copy of b integers.
    let key_lens = match key_lens {
        Some(kl) if fused => Some(tops::concat_rows(&[kl])?),
        _ => None,
    };
    let saved = CoreSaved {
        inputs,
        p,
        pd,
        key_lens,
        causal,
        drop: off,
        heads,
        scale,
        dims,
        fused,
    };
    Ok((ctx, saved))
}

/// The backward of [`attend`] (dq, dk, dv, each [len, b, h]), of [`attend_packed`] (one
/// gradient [len, b, 3 h] with their column blocks) or of [`attend_packed_kv`] (dq, and
/// one [lk, b, 2 h] gradient holding dk and dv).
pub fn attend_backward(drop: &Dropout, s: CoreSaved, dctx: Tensor) -> Result<tops::QkvGrads> {
    Ok(attend_backward_sums(drop, s, dctx, false)?.0)
}

/// [`attend_backward`], with `bias_sums` also the fused backward's partial column sums of
/// dq, dk and dv ([`tops::short_attention_backward`]) where it ran; None otherwise.
pub fn attend_backward_sums(
    drop: &Dropout,
    s: CoreSaved,
    dctx: Tensor,
    bias_sums: bool,
) -> Result<(tops::QkvGrads, Option<Tensor>)> {
    if s.fused {
        let spec = s.drop.map(|o| (drop.attention, drop.seed, o));
        let mask = (s.key_lens.as_ref(), s.causal);
        let qkv = s.inputs.qkv();
        let grads =
            tops::short_attention_backward(qkv, &dctx, s.heads, s.scale, mask, spec, bias_sums)?;
        return grads.ok_or_else(|| Error::op("attend_backward", "the fused backward did not run"));
    }
    let Inputs::Separate(q, k, v) = &s.inputs else {
        return Err(Error::op(
            "attend_backward",
            "packed inputs without the fused attention",
        ));
    };
    let (b, lq, lk, d) = s.dims;
    let dims = (b, s.heads, lq, lk, d);
    let p =
        s.p.as_ref()
            .ok_or_else(|| Error::op("attend_backward", "no probabilities saved"))?;
    let dpd = head_scores(&dctx, v, dims)?;
    let dv = scores_by_heads(s.pd.as_ref().unwrap_or(p), true, &dctx, dims)?;
    let dp = drop.backward(dpd, drop.attention, s.drop)?;
    let ds = tops::softmax_backward(p, &dp, s.scale)?;
    let dq = scores_by_heads(&ds, false, k, dims)?;
    let dk = scores_by_heads(&ds, true, q, dims)?;
    Ok((tops::QkvGrads::Separate(dq, dk, dv), None))
}

/// The weights (and biases) of `lins` stacked along their outputs, where all are square
/// [h, h] and all have biases or none; None otherwise.
fn stacked(ps: &Params, lins: &[&Lin], h: usize) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let ws: Vec<&Tensor> = lins.iter().map(|l| ps.w(l.w)).collect();
    if !ws.iter().all(|w| w.shape() == [h, h]) {
        return Ok(None);
    }
    let b = if lins.iter().all(|l| l.b.is_some()) {
        let bs: Vec<&Tensor> = lins.iter().filter_map(|l| l.b.map(|b| ps.w(b))).collect();
        Some(tops::concat_rows(&bs)?)
    } else if lins.iter().all(|l| l.b.is_none()) {
        None
    } else {
        return Ok(None);
    };
    Ok(Some((tops::concat_rows(&ws)?, b)))
}

impl Attn {
    /// Whether q, k and v all have biases (with packed inputs their gradients then come from
    /// the fused backward's column sums).
    fn has_biases(&self) -> bool {
        self.q.b.is_some() && self.k.b.is_some() && self.v.b.is_some()
    }

    /// xq [lq, b, h] attends to xkv [lk, b, h]; keys at or past `key_lens[b]` and, when
    /// `causal`, keys after the query are masked. With `res`, the output projection adds it
    /// (a residual of the output's shape).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        ps: &Params,
        drop: &Dropout,
        xq: &Tensor,
        xkv: &Tensor,
        key_lens: Option<&Tensor>,
        causal: bool,
        res: Option<&Tensor>,
    ) -> Result<(Tensor, AttnSaved)> {
        let (ctx, core) = attend(
            drop,
            self.q.forward(ps, xq)?,
            self.k.forward(ps, xkv)?,
            self.v.forward(ps, xkv)?,
            self.heads,
            self.scale,
            key_lens,
            causal,
        )?;
        let out = self.o.forward_add(ps, &ctx, res)?;
        let stacked = None;
        Ok((out, AttnSaved { core, ctx, stacked }))
    }

    /// Self-attention of x [len, b, h]. Where the fused attention runs and the q, k and v
    /// projections are alike (square, all with biases or none), one GEMM over their stacked
    /// weights gives q, k and v as column blocks of one output, which the fused kernels read
    /// in place: N = 3 h keeps the GEMM nearer its peak than three of N = h. Otherwise as
    /// [`Attn::forward`] with x for both inputs. Its backward is [`Attn::backward_self`].
    pub fn forward_self(
        &self,
        ps: &Params,
        drop: &Dropout,
        x: &Tensor,
        key_lens: Option<&Tensor>,
        causal: bool,
        res: Option<&Tensor>,
    ) -> Result<(Tensor, AttnSaved)> {
        let h = x.shape().last().copied().unwrap_or(0);
        let fits = tops::Qkv::Separate(x, x, x).fits(self.heads);
        let packed = if fits {
            stacked(ps, &[&self.q, &self.k, &self.v], h)?
        } else {
            None
        };
        let Some((w, b)) = packed else {
            return self.forward(ps, drop, x, x, key_lens, causal, res);
        };
        let qkv = ops::linear(x, &w, b.as_ref(), Activation::None)?;
        let (ctx, core) = attend_packed(drop, qkv, self.heads, self.scale, key_lens, causal)?;
        let out = self.o.forward_add(ps, &ctx, res)?;
        let stacked = Some(w);
        Ok((out, AttnSaved { core, ctx, stacked }))
    }

    /// Cross attention of xq [lq, b, h] over memory [lk, b, h] (no causal mask). Where the
    /// fused attention runs and k and v are alike, one GEMM over their stacked weights gives
    /// k and v as column blocks of one output, as [`Attn::forward_self`] does for q, k and v;
    /// otherwise as [`Attn::forward`]. Its backward is [`Attn::backward`].
    pub fn forward_cross(
        &self,
        ps: &Params,
        drop: &Dropout,
        xq: &Tensor,
        mem: &Tensor,
        key_lens: Option<&Tensor>,
        res: Option<&Tensor>,
    ) -> Result<(Tensor, AttnSaved)> {
        let h = mem.shape().last().copied().unwrap_or(0);
        // q's projection square too, so q has xq's width, which the check reads.
        let fits =
            ps.w(self.q.w).shape() == [h, h] && tops::Qkv::Separate(xq, mem, mem).fits(self.heads);
        let packed = if fits {
            stacked(ps, &[&self.k, &self.v], h)?
        } else {
            None
        };
        let Some((w, b)) = packed else {
            return self.forward(ps, drop, xq, mem, key_lens, false, res);
        };
        let q = self.q.forward(ps, xq)?;
        let kv = ops::linear(mem, &w, b.as_ref(), Activation::None)?;
        let (ctx, core) = attend_packed_kv(drop, q, kv, self.heads, self.scale, key_lens)?;
        let out = self.o.forward_add(ps, &ctx, res)?;
        let stacked = Some(w);
        Ok((out, AttnSaved { core, ctx, stacked }))
    }

    /// The backward of self-attention (`xq` = `xkv` = `x`): dx, the three projections'
    /// input gradients summed by their GEMMs.
    pub fn backward_self(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: AttnSaved,
        x: &Tensor,
        dout: Dout,
    ) -> Result<Tensor> {
        let dctx = dout.out(&self.o).backward(ps, &s.ctx, dout.read())?;
        let want_sums = self.has_biases() && s.stacked.is_some();
        let (grads, sums) = attend_backward_sums(drop, s.core, dctx, want_sums)?;
        match (grads, s.stacked) {
            (tops::QkvGrads::Separate(dq, dk, dv), _) => {
                let mut dx = self.q.backward_to(ps, x, &dq, dout.acc())?;
                self.k.backward_into(ps, x, &dk, &mut dx)?;
                self.v.backward_into(ps, x, &dv, &mut dx)?;
                Ok(dx)
            }
            // One gradient holding dq, dk and dv as column blocks: the projections'
            // parameter gradients come from it (packed_param_grads), and one GEMM over the
            // stacked weights gives the input gradient.
            (tops::QkvGrads::Packed(dqkv), Some(w)) => {
                let lins = [&self.q, &self.k, &self.v];
                packed_param_grads(ps, &lins, (&dqkv, sums.as_ref()), w.shape()[1], x)?;
                match dout.acc() {
                    Some(mut acc) => {
                        tops::linear_input_grad_into(&mut acc, &dqkv, &w)?;
                        Ok(acc)
                    }
                    None => tops::linear_input_grad(&dqkv, &w),
                }
            }
            _ => Err(Error::op(
                "self-attention backward",
                "packed gradients without the stacked weights, or from cross attention",
            )),
        }
    }

    /// Returns dxq; adds dxkv into `dkv` (set when None; its tensor must not share storage).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: AttnSaved,
        xq: &Tensor,
        xkv: &Tensor,
        dout: Dout,
        dkv: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let dctx = dout.out(&self.o).backward(ps, &s.ctx, dout.read())?;
        let want_sums = self.has_biases() && s.stacked.is_some();
        let (grads, sums) = attend_backward_sums(drop, s.core, dctx, want_sums)?;
        match (grads, s.stacked) {
            (tops::QkvGrads::Separate(dq, dk, dv), _) => {
                let dxq = self.q.backward_to(ps, xq, &dq, dout.acc())?;
                let acc = match dkv {
                    Some(acc) => {
                        self.k.backward_into(ps, xkv, &dk, acc)?;
                        acc
                    }
                    None => dkv.insert(self.k.backward(ps, xkv, &dk)?),
                };
                self.v.backward_into(ps, xkv, &dv, acc)?;
                Ok(dxq)
            }
            // dk and dv as column blocks of one gradient: k's and v's parameter gradients
            // come from it (packed_param_grads), and one GEMM over the stacked weights gives
            // the memory's gradient.
            (tops::QkvGrads::PackedKv(dq, g_kv), Some(w)) => {
                let (q, k, v) = match (&sums, self.q.b, self.k.b, self.v.b) {
                    // All three bias gradients from the fused kernel's sums, in one pass.
                    (Some(sums), Some(qb), Some(kb), Some(vb)) => {
                        tops::column_sum_parts_into(&mut ps.grads_of(&[qb, kb, vb])?, sums)?;
                        let unbiased = |l: &Lin| Lin { b: None, ..*l };
                        (unbiased(&self.q), unbiased(&self.k), unbiased(&self.v))
                    }
                    _ => (self.q, self.k, self.v),
                };
                let dxq = q.backward_to(ps, xq, &dq, dout.acc())?;
                packed_param_grads(ps, &[&k, &v], (&g_kv, None), w.shape()[1], xkv)?;
                match dkv {
                    Some(acc) => tops::linear_input_grad_into(acc, &g_kv, &w)?,
                    None => *dkv = Some(tops::linear_input_grad(&g_kv, &w)?),
                }
                Ok(dxq)
            }
            _ => Err(Error::op(
                "attention backward",
                "packed k and v gradients without the stacked weights, or from self-attention",
            )),
        }
    }
}

/// fc2(dropout(act(fc1(x)))).
pub struct Ffn {
    pub fc1: Lin,
    pub fc2: Lin,
    pub act: Activation,
}

pub struct FfnSaved {
    /// fc1's output before the activation; None for ReLU, whose derivative reads the same
    /// from `hd` (positive exactly where the input was, and zero gradient where dropped).
    pre: Option<Tensor>,
    hd: Tensor,
    drop: Option<u64>,
}

impl Ffn {
    /// With `res`, fc2 adds it (a residual of the output's shape).
    pub fn forward(
        &self,
        ps: &Params,
        drop: &Dropout,
        x: &Tensor,
        res: Option<&Tensor>,
    ) -> Result<(Tensor, FfnSaved)> {
        let (pre, h) = if self.act == Activation::Relu {
            // The GEMM applies ReLU in its epilogue.
            let fc1 = &self.fc1;
            let h = ops::linear(x, ps.w(fc1.w), fc1.b.map(|b| ps.w(b)), Activation::Relu)?;
            (None, h)
        } else {
            let pre = self.fc1.forward(ps, x)?;
            let h = tops::activate(&pre, self.act)?;
            (Some(pre), h)
        };
        let (hd, off) = drop.apply(h, drop.activation)?;
        let out = self.fc2.forward_add(ps, &hd, res)?;
        Ok((out, FfnSaved { pre, hd, drop: off }))
    }

    pub fn backward(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: FfnSaved,
        x: &Tensor,
        dout: Dout,
    ) -> Result<Tensor> {
        let dhd = dout.out(&self.fc2).backward(ps, &s.hd, dout.read())?;
        let dh = drop.backward(dhd, drop.activation, s.drop)?;
        let pre = s.pre.as_ref().unwrap_or(&s.hd);
        // fc1's bias gradient is summed in the activation's backward pass; fc1's backward
        // then adds only its weight and input gradients.
        let (dpre, fc1) = match self.fc1.b {
            Some(b) => {
                let bias_grad = ps.grads_mut(b, None)?.0;
                let dpre = tops::activation_backward_bias_into(pre, &dh, self.act, bias_grad)?;
                (
                    dpre,
                    Lin {
                        b: None,
                        ..self.fc1
                    },
                )
            }
            None => (tops::activation_backward(pre, &dh, self.act)?, self.fc1),
        };
        fc1.backward_to(ps, x, &dpre, dout.acc())
    }
}

/// A Transformer layer: self attention, optional cross attention, feed-forward; each
/// sublayer post-LN `LN(x + drop(f(x)))` or pre-LN `x + drop(f(LN(x)))`.
pub struct Layer {
    pub self_attn: Attn,
    pub ln_self: Ln,
    pub cross: Option<(Attn, Ln)>,
    pub ffn: Ffn,
    pub ln_ffn: Ln,
    pub pre_ln: bool,
}

/// Saved state of one sublayer.
pub struct SubSaved<S> {
    /// Sublayer input.
    x: Tensor,
    /// LN(x) for pre-LN; `x + f(x)` (the LN's input) for post-LN.
    mid: Tensor,
    /// The layer norm's row statistics, where its forward kept them.
    stats: Option<Tensor>,
    inner: S,
    drop: Option<u64>,
}

pub struct LayerSaved {
    attn: SubSaved<AttnSaved>,
    cross: Option<SubSaved<AttnSaved>>,
    ffn: SubSaved<FfnSaved>,
}

/// Inputs a layer attends to besides itself.
pub struct LayerInputs<'a> {
    pub self_key_lens: Option<&'a Tensor>,
    pub causal: bool,
    pub memory: Option<&'a Tensor>,
    pub memory_lens: Option<&'a Tensor>,
}

impl Layer {
    /// One sublayer's forward. `f(input, res)` is the sublayer, its output projection adding
    /// `res` when given: without hidden dropout the residual rides in that GEMM, so neither
    /// the sublayer's own output nor a separate add pass is needed.
    fn sub<S>(
        &self,
        ps: &Params,
        drop: &Dropout,
        x: Tensor,
        ln: &Ln,
        f: impl FnOnce(&Tensor, Option<&Tensor>) -> Result<(Tensor, S)>,
    ) -> Result<(Tensor, SubSaved<S>)> {
        let fused = drop.hidden <= 0.0;
        let (out, mid, stats, inner, off) = if self.pre_ln {
            let (a, stats) = ln.forward_keep(ps, &x)?;
            if fused {
                let (out, inner) = f(&a, Some(&x))?;
                (out, a, stats, inner, None)
            } else {
                let (y, inner) = f(&a, None)?;
                let (y, off) = drop.apply(y, drop.hidden)?;
                (ops::add(&x, &y)?, a, stats, inner, off)
            }
        } else if fused {
            let (s, inner) = f(&x, Some(&x))?;
            let (out, stats) = ln.forward_keep(ps, &s)?;
            (out, s, stats, inner, None)
        } else {
            let (y, inner) = f(&x, None)?;
            let (y, off) = drop.apply(y, drop.hidden)?;
            let (s, out, stats) = ln.add_forward(ps, &x, &y)?;
            (out, s, stats, inner, off)
        };
        Ok((
            out,
            SubSaved {
                x,
                mid,
                stats,
                inner,
                drop: off,
            },
        ))
    }

    /// Backward of a sublayer: `fb(inner, f_input, df_out) -> df_input` (for post-LN, the
    /// residual's gradient plus df_input). `out_bias` is the bias of the sublayer's output
    /// projection.
    #[allow(clippy::too_many_arguments)]
    fn sub_backward<S>(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: SubSaved<S>,
        ln: &Ln,
        out_bias: Option<Pid>,
        dy: Tensor,
        fb: impl FnOnce(&mut Params, S, &Tensor, Dout) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.pre_ln {
            let df = drop.backward_ref(&dy, drop.hidden, s.drop)?;
            let da = fb(ps, s.inner, &s.mid, Dout::Alone(df.as_ref().unwrap_or(&dy)))?;
            let dx = ln.backward_summing(ps, &s.x, &da, None, s.stats.as_ref())?;
            ops::add(&dy, &dx)
        } else {
            // Without dropout the output bias's gradient is the column sum of ds, which the
            // layer norm's backward adds in its pass.
            let summed = if s.drop.is_none() { out_bias } else { None };
            let ds = ln.backward_summing(ps, &s.mid, &dy, summed, s.stats.as_ref())?;
            let df = drop.backward_ref(&ds, drop.hidden, s.drop)?;
            fb(
                ps,
                s.inner,
                &s.x,
                Dout::Into(df.as_ref(), ds, summed.is_some()),
            )
        }
    }

    pub fn forward(
        &self,
        ps: &Params,
        drop: &Dropout,
        x: Tensor,
        inp: &LayerInputs,
    ) -> Result<(Tensor, LayerSaved)> {
        let (x, attn) = self.sub(ps, drop, x, &self.ln_self, |a, res| {
            self.self_attn
                .forward_self(ps, drop, a, inp.self_key_lens, inp.causal, res)
        })?;
        let (x, cross) = match &self.cross {
            Some((ca, ln)) => {
                let mem = inp
                    .memory
                    .expect("cross attention needs the encoder output");
                let (x, s) = self.sub(ps, drop, x, ln, |a, res| {
                    ca.forward_cross(ps, drop, a, mem, inp.memory_lens, res)
                })?;
                (x, Some(s))
            }
            None => (x, None),
        };
        let (x, ffn) = self.sub(ps, drop, x, &self.ln_ffn, |a, res| {
            self.ffn.forward(ps, drop, a, res)
        })?;
        Ok((x, LayerSaved { attn, cross, ffn }))
    }

    /// Returns dx; adds the gradient of the memory (encoder output) into `dmemory`.
    pub fn backward(
        &self,
        ps: &mut Params,
        drop: &Dropout,
        s: LayerSaved,
        dy: Tensor,
        memory: Option<&Tensor>,
        dmemory: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let fc2_b = self.ffn.fc2.b;
        let dy = self.sub_backward(
            ps,
            drop,
            s.ffn,
            &self.ln_ffn,
            fc2_b,
            dy,
            |ps, inner, a, df| self.ffn.backward(ps, drop, inner, a, df),
        )?;
        let dy = match (&self.cross, s.cross) {
            (Some((ca, ln)), Some(cs)) => {
                let mem = memory.expect("cross attention needs the encoder output");
                self.sub_backward(ps, drop, cs, ln, ca.o.b, dy, |ps, inner, a, df| {
                    ca.backward(ps, drop, inner, a, mem, df, dmemory)
                })?
            }
            _ => dy,
        };
        let o_b = self.self_attn.o.b;
        self.sub_backward(
            ps,
            drop,
            s.attn,
            &self.ln_self,
            o_b,
            dy,
            |ps, inner, a, df| self.self_attn.backward_self(ps, drop, inner, a, df),
        )
    }
}

/// Position embeddings.
pub enum Positions {
    /// A trained table, row `offset + i`.
    Learned { table: Pid, offset: usize },
    /// A fixed table (sinusoids), row `offset + i`.
    Fixed { table: Tensor, offset: usize },
    /// None (the model has no absolute positions).
    None,
}

/// Token (times `scale`) + position (+ token type) embeddings, optional LN, dropout.
pub struct Emb {
    pub tokens: Pid,
    pub vocab: usize,
    pub scale: f32,
    pub positions: Positions,
    pub types: Option<(Pid, usize)>,
    pub ln: Option<Ln>,
    pub max_positions: usize,
}

pub struct EmbSaved {
    ids: Tensor,
    pos: Tensor,
    types: Option<Tensor>,
    pre_ln: Option<Tensor>,
    drop: Option<u64>,
}

impl EmbSaved {
    /// Replaces the ids the table gradient is scattered by (padding rows masked to -1).
    pub fn with_ids(self, ids: Tensor) -> Self {
        EmbSaved { ids, ..self }
    }
}

impl Emb {
    /// ids, type ids: [l * b] i32, position-major (token i of sequence bi at row i * b + bi,
    /// the layout of every training activation); returns [l, b, h].
    pub fn forward(
        &self,
        ps: &Params,
        drop: &Dropout,
        ids: Tensor,
        types: Option<Tensor>,
        b: usize,
        l: usize,
    ) -> Result<(Tensor, EmbSaved)> {
        let dev = ps.device.clone();
        let offset = match &self.positions {
            Positions::Learned { offset, .. } | Positions::Fixed { offset, .. } => *offset,
            Positions::None => 0,
        };
        if l > self.max_positions {
            return Err(crate::error::Error::Input(format!(
                "a sequence of {l} tokens exceeds the model's {} positions",
                self.max_positions
            )));
        }
        let pos_rows: Vec<i32> = (0..l * b).map(|r| (offset + r / b.max(1)) as i32).collect();
        let pos = Tensor::from_i32(&pos_rows, &[b * l], &dev)?;
        let tok = ps.w(self.tokens);
        let mut lookups: Vec<(&Tensor, &Tensor)> = vec![(tok, &ids)];
        match &self.positions {
            Positions::Learned { table, .. } => lookups.push((ps.w(*table), &pos)),
            Positions::Fixed { table, .. } => lookups.push((table, &pos)),
            Positions::None => {}
        }
        if let (Some((t, _)), Some(ti)) = (self.types, types.as_ref()) {
            lookups.push((ps.w(t), ti));
        }
        let h = tok.shape()[1];
        let x = ops::embed_scaled(&lookups, self.scale)?.reshape(&[l, b, h])?;
        let (x, pre_ln) = match &self.ln {
            Some(ln) => (ln.forward(ps, &x)?, Some(x)),
            None => (x, None),
        };
        let (x, off) = drop.apply(x, drop.hidden)?;
        Ok((
            x,
            EmbSaved {
                ids,
                pos,
                types,
                pre_ln,
                drop: off,
            },
        ))
    }

    pub fn backward(&self, ps: &mut Params, drop: &Dropout, s: EmbSaved, dy: Tensor) -> Result<()> {
        let dy = drop.backward(dy, drop.hidden, s.drop)?;
        let dx = match (&self.ln, &s.pre_ln) {
            (Some(ln), Some(x)) => ln.backward(ps, x, &dy)?,
            _ => dy,
        };
        let (g, _) = ps.grads_mut(self.tokens, None)?;
        tops::embedding_backward_into(g, &s.ids, &dx, self.scale)?;
        if let Positions::Learned { table, .. } = &self.positions {
            let (g, _) = ps.grads_mut(*table, None)?;
            tops::embedding_backward_into(g, &s.pos, &dx, 1.0)?;
        }
        if let (Some((t, _)), Some(ti)) = (self.types, &s.types) {
            let (g, _) = ps.grads_mut(t, None)?;
            tops::embedding_backward_into(g, ti, &dx, 1.0)?;
        }
        Ok(())
    }
}

/// Converts an f32 gradient to the compute dtype of `like`.
pub fn as_dtype_of(g: Tensor, dtype: DType) -> Result<Tensor> {
    if g.dtype() == dtype {
        Ok(g)
    } else {
        ops::to_dtype(&g, dtype)
    }
}
