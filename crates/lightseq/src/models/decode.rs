//! Incremental decoding: key/value caches, the state of one decoding run, and the trait
//! generative models implement. Full forward passes of decoders run through the same path
//! (one step over the whole padded batch), so prefill, decode steps and `forward` share code.

use super::step_graph::{self, StepGraph};
use super::{Batch, ModelOutput, Padded};
use crate::error::{Error, Result};
use crate::generate::beam_select::BeamSelect;
use crate::nn::CrossAttention;
use crate::ops;
use crate::tensor::{DType, Device, Tensor};
use std::sync::Arc;

pub use crate::nn::attention::KvCache;

/// Everything a decoder carries between steps.
pub struct DecodeState {
    /// Sequences decoded side by side (batch x beams).
    pub rows: usize,
    /// Positions each cache holds.
    pub capacity: usize,
    /// Positions filled so far (the same for every row; prompts are left-padded).
    pub len: usize,
    /// Per row, the first valid cache position (left padding before it).
    pub key_start: Vec<usize>,
    /// Per row, an end of valid keys that overrides `len` (right-padded full forwards).
    pub key_end: Option<Vec<usize>>,
    /// Self-attention caches, one per decoder layer.
    pub caches: Vec<KvCache>,
    /// Encoder-decoders: cross-attention keys/values per layer [items, src_len, 2 * inner],
    /// shared by each item's `rows / items` rows ([rows, ...] after a reorder across items).
    pub cross: Vec<Tensor>,
    /// Encoder-decoders: valid source positions per row.
    pub src_ranges: Vec<(usize, usize)>,
    /// `src_ranges` on the model's device (i32 starts then ends), set by `begin`.
    pub src_ranges_dev: Option<Tensor>,
    /// Encoder-decoders: consecutive rows sharing one source (0 when unknown).
    pub rows_per_item: usize,
    /// Single-token steps captured as a CUDA graph (see `step_graph`).
    pub(crate) graph: StepGraph,
    /// CUDA caches: the table the caches' `rows` share (see [`DecodeState::reorder`]).
    pub(crate) key_rows: Option<Arc<Tensor>>,
    /// Set by beam search: the table is made before a single-token step is captured, so
    /// the first reorder keeps the captured graph's buffers.
    pub(crate) reorders: bool,
    /// The [`Parking`] of the model that made this state (0: none); only it keeps it.
    pub(crate) owner: u64,
    /// The graph was captured in an earlier run (see [`Parking`]): if this run's buffers
    /// differ after all, its capture is treated as the run's first.
    pub(crate) graph_carried: bool,
    /// Rows whose outputs are no longer read (their search has finished; see
    /// [`DecodeState::set_idle`]).
    idle: Vec<bool>,
    /// CUDA reorders: the source rows ([rows] i32) and the composition's scratch ([rows,
    /// capacity] i32), kept from the first reorder on.
    reorder_bufs: Option<(Tensor, Tensor)>,
    /// Beam search's selection on the device (generate/beam_select.rs), kept with the
    /// state; with `ids_from_select` the next step reads its token ids from it.
    pub(crate) select: Option<BeamSelect>,
    pub(crate) ids_from_select: bool,
}

impl DecodeState {
    /// A state with caches allocated for `rows` sequences.
    pub fn new(rows: usize, capacity: usize, caches: Vec<KvCache>) -> Self {
        DecodeState {
            rows,
            capacity,
            len: 0,
            key_start: vec![0; rows],
            key_end: None,
            caches,
            cross: Vec::new(),
            src_ranges: Vec::new(),
            src_ranges_dev: None,
            rows_per_item: 0,
            graph: StepGraph::default(),
            key_rows: None,
            reorders: false,
            owner: 0,
            graph_carried: false,
            idle: vec![false; rows],
            reorder_bufs: None,
            select: None,
            ids_from_select: false,
        }
    }

    /// Reorders rows as [`DecodeState::reorder`] does, by the source rows the device
    /// selection wrote (`select.src`), which stay within each group of rows: key starts
    /// and cross states, the same across a group, do not move.
    pub(crate) fn reorder_from_select(&mut self) -> Result<()> {
        let sel = self
            .select
            .take()
            .ok_or_else(|| Error::op("reorder", "no device selection"))?;
        let moved = self.reorder_rows_by(&sel.src);
        self.select = Some(sel);
        moved
    }

    /// Row i of the caches takes row src[i]'s (i32 [rows], on the caches' device): on CUDA
    /// by composing the key-row table, on the CPU by moving the rows (only the positions
    /// written so far; keys past them are never read).
    fn reorder_rows_by(&mut self, src: &Tensor) -> Result<()> {
        let Some(device) = self.caches.first().map(|c| c.k.device()) else {
            return Ok(());
        };
        if device.is_cuda() {
            let (ids, scratch) = self.take_reorder_bufs(&device)?;
            let composed = self.compose_key_rows_with(src, &scratch);
            self.reorder_bufs = Some((ids, scratch));
            composed
        } else {
            let width = self.caches[0].k.shape()[2];
            let len = self.len * width;
            let mut all: Vec<&mut Tensor> = self
                .caches
                .iter_mut()
                .flat_map(|c| [&mut c.k, &mut c.v])
                .collect();
            ops::reorder_row_prefixes(&mut all, src, len)
        }
    }

    /// The kept [`DecodeState::reorder_bufs`] (allocated at the first reorder), with the
    /// key-row table made; the caller puts them back.
    fn take_reorder_bufs(&mut self, device: &Device) -> Result<(Tensor, Tensor)> {
        self.ensure_key_rows()?;
        match self.reorder_bufs.take() {
            Some(bufs) => Ok(bufs),
            None => Ok((
                ops::empty(&[self.rows], DType::I32, device)?,
                ops::empty(&[self.rows * self.capacity], DType::I32, device)?,
            )),
        }
    }

    /// The device selection's token ids (i32 [rows]), which a step takes as its first input
    /// (the ids) while the search asks for it (`ids_from_select`, set around its step); None
    /// when it does not.
    pub(crate) fn select_ids(&self) -> Result<Option<&Tensor>> {
        if !self.ids_from_select {
            return Ok(None);
        }
        match &self.select {
            Some(sel) => Ok(Some(&sel.ids)),
            None => Err(Error::op(
                "decode step",
                "the step's ids come from a selection that has not run",
            )),
        }
    }

    /// Whether `row`'s outputs are no longer read: the search over it has finished while
    /// other rows go on. Its later steps take position 0, so a finished row beside a
    /// shorter prompt never asks for a position past the model's table (rows advance
    /// together, and a long prompt's row can finish at the last one), and it no longer
    /// counts where a model looks at the longest row (dynamic rope scaling).
    pub fn is_idle(&self, row: usize) -> bool {
        self.idle.get(row).copied().unwrap_or(false)
    }

    /// Marks `row` idle (see [`DecodeState::is_idle`]).
    pub fn set_idle(&mut self, row: usize) {
        if let Some(i) = self.idle.get_mut(row) {
            *i = true;
        }
    }

    /// [`DecodeState::key_ranges`] for a step of `t` positions, uploaded once for all layers
    /// (i32 starts then ends).
    pub fn key_ranges_on(&self, t: usize, device: &Device) -> Result<Tensor> {
        Self::ranges_tensor(&self.key_ranges(t), device)
    }

    /// Ranges as an i32 tensor [2 * rows]: starts, then ends.
    pub fn ranges_tensor(ranges: &[(usize, usize)], device: &Device) -> Result<Tensor> {
        let v = Self::ranges_i32(ranges);
        Tensor::from_i32(&v, &[v.len()], device)
    }

    /// Ranges as i32 starts, then ends.
    fn ranges_i32(ranges: &[(usize, usize)]) -> Vec<i32> {
        let mut v: Vec<i32> = ranges.iter().map(|r| r.0 as i32).collect();
        v.extend(ranges.iter().map(|r| r.1 as i32));
        v
    }

    /// Key ranges of each row once `t` more positions are written.
    pub fn key_ranges(&self, t: usize) -> Vec<(usize, usize)> {
        (0..self.rows)
            .map(|r| {
                let end = self.key_end.as_ref().map_or(self.len + t, |e| e[r]);
                (self.key_start[r], end)
            })
            .collect()
    }

    /// Position id of each of the next `t` tokens of each row ([rows * t]): the count of
    /// real tokens before it (left padding excluded), 0 for padding and for idle rows.
    pub fn positions(&self, t: usize) -> Vec<i32> {
        let mut out = Vec::with_capacity(self.rows * t);
        for r in 0..self.rows {
            let idle = self.is_idle(r);
            for i in 0..t {
                let p = (self.len + i).saturating_sub(self.key_start[r]);
                out.push(if idle { 0 } else { p as i32 });
            }
        }
        out
    }

    /// Checks a step's tokens: one list per row, all of the same length, within capacity.
    pub fn check_step(&self, tokens: &[Vec<i64>]) -> Result<usize> {
        let t = tokens.first().map_or(0, Vec::len);
        if tokens.len() != self.rows || tokens.iter().any(|r| r.len() != t) || t == 0 {
            return Err(Error::Input(format!(
                "a decode step needs {} rows of equal, non-zero length",
                self.rows
            )));
        }
        if self.len + t > self.capacity {
            return Err(Error::Input(format!(
                "decoding past the cache: {} + {t} positions > {}",
                self.len, self.capacity
            )));
        }
        Ok(t)
    }

    /// Makes a finished run's state the start of a new one over the same buffers: no
    /// positions written, caches zeroed, the key-row table naming every row's own, a
    /// captured graph kept (any other graph state starts over). The caller sets the
    /// sources' values.
    pub(crate) fn reset(&mut self) -> Result<()> {
        self.len = 0;
        self.key_start = vec![0; self.rows];
        self.key_end = None;
        self.reorders = false;
        self.idle = vec![false; self.rows];
        // A graph not captured in the last run (switched off then, or failed) is tried again.
        self.graph_carried = matches!(self.graph, StepGraph::Ready(_));
        if !self.graph_carried {
            self.graph = StepGraph::Cold;
        }
        for c in &mut self.caches {
            ops::zero_(&mut c.k)?;
            ops::zero_(&mut c.v)?;
            c.rows = None;
        }
        if let Some(shared) = self.key_rows.take() {
            let mut table = Arc::try_unwrap(shared)
                .map_err(|_| Error::op("reset", "the key rows are shared elsewhere"))?;
            ops::write_i32_(&mut table, &self.own_rows())?;
            self.share_key_rows(Arc::new(table));
        }
        Ok(())
    }

    /// Gives CUDA caches a key-row table naming every row's own (see
    /// [`DecodeState::reorder`]) when they have none.
    pub(crate) fn ensure_key_rows(&mut self) -> Result<()> {
        let Some(first) = self.caches.first() else {
            return Ok(());
        };
        if self.key_rows.is_some() || !first.k.device().is_cuda() {
            return Ok(());
        }
        let table = Tensor::from_i32(
            &self.own_rows(),
            &[self.rows, self.capacity],
            &first.k.device(),
        )?;
        self.share_key_rows(Arc::new(table));
        Ok(())
    }

    /// A key-row table naming every row's own at every position ([rows, capacity]).
    fn own_rows(&self) -> Vec<i32> {
        (0..self.rows)
            .flat_map(|r| std::iter::repeat_n(r as i32, self.capacity))
            .collect()
    }

    /// Makes `table` the state's key-row table and every cache's.
    fn share_key_rows(&mut self, table: Arc<Tensor>) {
        for c in &mut self.caches {
            c.rows = Some(table.clone());
        }
        self.key_rows = Some(table);
    }

    /// Composes the key-row table with `idx` (the source of each row): row i takes row
    /// idx[i]'s positions written so far, in place (the captured step reads the table at
    /// its address).
    fn compose_key_rows(&mut self, idx: &[i32], device: &Device) -> Result<()> {
        let (mut ids, scratch) = self.take_reorder_bufs(device)?;
        ops::write_i32_(&mut ids, idx)?;
        let composed = self.compose_key_rows_with(&ids, &scratch);
        self.reorder_bufs = Some((ids, scratch));
        composed
    }

    fn compose_key_rows_with(&mut self, idx: &Tensor, scratch: &Tensor) -> Result<()> {
        let shared = self
            .key_rows
            .take()
            .ok_or_else(|| Error::op("reorder", "no key-row table"))?;
        // The caches let go of the table, so it can be written in place.
        for c in &mut self.caches {
            c.rows = None;
        }
        let mut table = match Arc::try_unwrap(shared) {
            Ok(t) => t,
            Err(shared) => {
                self.share_key_rows(shared);
                return Err(Error::op("reorder", "the key rows are shared elsewhere"));
            }
        };
        // Positions from `len` on keep naming each row's own, where steps append.
        let composed = ops::reorder_row_prefix_with(&mut table, idx, scratch, self.len);
        self.share_key_rows(Arc::new(table));
        composed
    }

    /// Reorders rows (beam search): row i takes the state of row `src[i]`. CUDA caches do
    /// not move: a table of the row holding each position of each sequence (shared by the
    /// caches, read by the decode attention) is composed with `src` instead, which costs a
    /// gather of [rows, len] ids rather than of every layer's keys and values.
    pub fn reorder(&mut self, src: &[usize]) -> Result<()> {
        if src.len() != self.rows {
            return Err(Error::op(
                "reorder",
                format!("{} indices for {} rows", src.len(), self.rows),
            ));
        }
        if let Some(&s) = src.iter().find(|&&s| s >= self.rows) {
            return Err(Error::op(
                "reorder",
                format!("source row {s} of {} rows", self.rows),
            ));
        }
        if src.iter().enumerate().all(|(i, &s)| i == s) {
            return Ok(());
        }
        if let Some(device) = self.caches.first().map(|c| c.k.device()) {
            let idx: Vec<i32> = src.iter().map(|&s| s as i32).collect();
            if device.is_cuda() {
                self.compose_key_rows(&idx, &device)?;
            } else {
                self.reorder_rows_by(&Tensor::from_i32(&idx, &[idx.len()], &device)?)?;
            }
        }
        self.key_start = src.iter().map(|&s| self.key_start[s]).collect();
        // Rows of one batch item share their source, so cross keys/values need no reorder
        // when every row stays within its item; otherwise follow `src` exactly.
        let same_item = |i: usize, s: usize| {
            self.rows_per_item > 0 && i / self.rows_per_item == s / self.rows_per_item
        };
        if !self.cross.is_empty() && !src.iter().enumerate().all(|(i, &s)| same_item(i, s)) {
            for c in &mut self.cross {
                // Shared per item (or already per row after an earlier such reorder):
                // gather each row's own.
                let per = self.rows / c.shape()[0].max(1);
                let idx: Vec<usize> = src.iter().map(|&s| s / per).collect();
                *c = ops::index_select(c, &idx)?;
            }
            self.src_ranges = src.iter().map(|&s| self.src_ranges[s]).collect();
            if let Some(t) = &self.src_ranges_dev {
                self.src_ranges_dev = Some(Self::ranges_tensor(&self.src_ranges, &t.device())?);
            }
        }
        Ok(())
    }
}

/// A model that generates: decoder-only language models and encoder-decoders.
pub trait Decoder: Send + Sync {
    /// Output vocabulary size.
    fn vocab(&self) -> usize;
    /// True for encoder-decoders.
    fn is_encoder_decoder(&self) -> bool;
    /// The device of the weights.
    fn decoder_device(&self) -> &Device;
    /// Longest decoder sequence the model's positions allow.
    fn max_decoder_positions(&self) -> usize;
    /// Where HF caps a default generation length (20 new tokens): the model's
    /// max_position_embeddings, which rotary models may step past.
    fn default_length_cap(&self) -> usize {
        self.max_decoder_positions()
    }
    /// Whether a step's outputs for some rows depend on which other rows are idle (see
    /// [`DecodeState::set_idle`]): then a search marks finished rows idle before it
    /// launches the next step (Llama's dynamic rope scales by the longest live row).
    fn idle_rows_shape_steps(&self) -> bool {
        false
    }
    /// Whether a single-token step's inputs other than its token ids ([`Decoder::step_inputs`])
    /// do not depend on the tokens, so that the ids may come from a device buffer (beam
    /// search's selection on the device). Positions counted over non-pad tokens (fairseq's)
    /// depend on them.
    fn step_ids_from_device(&self) -> bool {
        false
    }
    /// Starts a run of `rows` sequences with caches of `capacity` positions. Encoder-decoders
    /// encode `sources` (one per batch item) and repeat each item's encoding `rows /
    /// sources.len()` times (beams); decoder-only models take no sources.
    fn begin(
        &self,
        sources: Option<&[Vec<i64>]>,
        rows: usize,
        capacity: usize,
    ) -> Result<DecodeState>;
    /// The decoder start token when the configuration names none (T5: its pad token).
    fn default_decoder_start(&self) -> Option<i64> {
        None
    }
    /// Encoder-decoders: the encoder output [batch, src_len, d_model] (f32) of `sources` and
    /// each item's length, for decoding later with `begin_from_states`.
    fn encode_sources(&self, _sources: &[Vec<i64>]) -> Result<(Tensor, Vec<usize>)> {
        Err(Error::Input("this model has no encoder".into()))
    }
    /// Like `begin`, from encoder outputs computed elsewhere: states [batch, src_len, d_model]
    /// with `lengths[b]` valid positions.
    fn begin_from_states(
        &self,
        _states: &Tensor,
        _lengths: &[usize],
        _rows: usize,
        _capacity: usize,
    ) -> Result<DecodeState> {
        Err(Error::Input(
            "this model decodes without encoder states".into(),
        ))
    }
    /// Feeds `tokens` (one equal-length list per row) and returns the final hidden states
    /// [rows * t, d_model] after the last norm.
    fn decode(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor>;
    /// The LM head: hidden [n, d_model] -> logits [n, vocab].
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;

    /// Host-side inputs of a step of `tokens`, validated, for [`Decoder::decode_inputs`]:
    /// i32 lists (token ids, positions, key ranges, ...) that the step's kernels read from
    /// the device. None (the default) for models that only decode through `decode`.
    fn step_inputs(
        &self,
        _st: &DecodeState,
        _tokens: &[Vec<i64>],
    ) -> Result<Option<Vec<Vec<i32>>>> {
        Ok(None)
    }

    /// Whether single-token steps may be captured as a CUDA graph (models with
    /// `decode_inputs` whose steps read no other step-dependent value).
    fn graph_steps(&self) -> bool {
        true
    }

    /// The step of `decode` over `inputs`, the device copies of `step_inputs` in order, for
    /// `t` tokens per row. Every value a kernel reads that changes between steps must come
    /// from `inputs`, and its only effect on `st` other than writing the caches must be
    /// `st.len += t`: single-token steps are then captured once and replayed as a CUDA graph.
    fn decode_inputs(
        &self,
        _st: &mut DecodeState,
        _inputs: &[Tensor],
        _t: usize,
    ) -> Result<Tensor> {
        Err(Error::Input(
            "this model decodes only through `decode`".into(),
        ))
    }

    /// One step: feeds `tokens` and returns the logits of each row's last position,
    /// [rows, vocab], on the model's device.
    fn step_logits(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Tensor> {
        let t = st.check_step(tokens)?;
        if t == 1 {
            if let Some(logits) = step_graph::step(self, st, tokens)? {
                return Ok(logits);
            }
        }
        let h = self.decode(st, tokens)?;
        let h = if t == 1 {
            h
        } else {
            let last: Vec<usize> = (0..st.rows).map(|r| r * t + t - 1).collect();
            ops::index_select(&h, &last)?
        };
        let logits = self.logits(&h)?;
        if t == 1 {
            st.graph.saw_eager_step(&logits);
        }
        Ok(logits)
    }

    /// Takes back a finished run's state, which the model may keep for its next run (see
    /// [`Parking`]); the default drops it.
    fn park(&self, _st: DecodeState) {}

    /// Frees the state kept from the model's last run (caches, cross states, the captured
    /// step graph), which otherwise stays allocated until a run of another shape or the
    /// model's drop.
    fn release_kept_state(&self) {}

    /// [`Decoder::step_logits`] copied to the host as f32.
    fn step(&self, st: &mut DecodeState, tokens: &[Vec<i64>]) -> Result<Vec<f32>> {
        self.step_logits(st, tokens)?.to_f32_vec()
    }
}

/// `decode` for models with [`Decoder::decode_inputs`]: uploads the step's inputs and runs it.
pub(crate) fn decode_via_inputs<D: Decoder + ?Sized>(
    m: &D,
    st: &mut DecodeState,
    tokens: &[Vec<i64>],
) -> Result<Tensor> {
    let t = st.check_step(tokens)?;
    let host = m
        .step_inputs(st, tokens)?
        .ok_or_else(|| Error::Input("this model has no step inputs".into()))?;
    let mut inputs = upload_step_inputs(&host, m.decoder_device())?;
    if let Some(ids) = st.select_ids()? {
        ops::copy_into(ids_input(&mut inputs, ids)?, ids)?;
    }
    m.decode_inputs(st, &inputs, t)
}

/// A step's first input (its token ids), which the device selection's `ids` replace: an
/// error unless it has their shape.
pub(crate) fn ids_input<'a>(inputs: &'a mut [Tensor], ids: &Tensor) -> Result<&'a mut Tensor> {
    inputs
        .first_mut()
        .filter(|t| t.shape() == ids.shape())
        .ok_or_else(|| {
            Error::op(
                "decode step",
                "the step's inputs do not take the selected ids",
            )
        })
}

/// [`Decoder::step_inputs`] on `device`, one i32 tensor per list.
pub(crate) fn upload_step_inputs(host: &[Vec<i32>], device: &Device) -> Result<Vec<Tensor>> {
    host.iter()
        .map(|h| Tensor::from_i32(h, &[h.len()], device))
        .collect()
}

/// The standard inputs of a decoder step, in order: token ids (checked against `vocab`),
/// the position-table row of each token, the key ranges after the step (starts, then
/// ends) and `st.len` (where the caches are written).
pub(crate) fn standard_step_inputs(
    st: &DecodeState,
    tokens: &[Vec<i64>],
    vocab: usize,
    positions: Vec<i32>,
) -> Result<Vec<Vec<i32>>> {
    let t = st.check_step(tokens)?;
    let ids = ids_host(tokens, vocab)?;
    let ranges = DecodeState::ranges_i32(&st.key_ranges(t));
    Ok(vec![ids, positions, ranges, vec![st.len as i32]])
}

/// The decode state of decoder-only model `name`, which takes no source sequences.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decoder_only_state(
    name: &str,
    sources: Option<&[Vec<i64>]>,
    layers: usize,
    rows: usize,
    capacity: usize,
    width: usize,
    dtype: DType,
    device: &Device,
    parking: &Parking,
) -> Result<DecodeState> {
    if sources.is_some() {
        return Err(Error::Input(format!(
            "{name} is decoder-only: it takes no source sequences"
        )));
    }
    let shape = StateShape {
        layers,
        rows,
        capacity,
        width,
        dtype,
        src_len: 0,
    };
    let mut st = match parking.take(&shape)? {
        Some(st) => st,
        None => new_state(layers, rows, capacity, width, dtype, device)?,
    };
    st.owner = parking.id;
    Ok(st)
}

/// What a kept state must match to be reused.
pub(crate) struct StateShape {
    pub layers: usize,
    pub rows: usize,
    pub capacity: usize,
    pub width: usize,
    pub dtype: DType,
    /// Source positions of the cross states (0: a decoder-only state).
    pub src_len: usize,
}

/// A model's last finished run, kept for its next run of the same shape: reusing its
/// buffers keeps a captured step graph valid, so that run replays from its first
/// single-token step instead of capturing again, and saves the allocations. A run of
/// another shape drops it before allocating its own.
pub(crate) struct Parking {
    /// Tells this model's states from others' (a graph bakes in its model's weights).
    id: u64,
    kept: std::sync::Mutex<Option<DecodeState>>,
}

impl Default for Parking {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Parking {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            kept: std::sync::Mutex::new(None),
        }
    }
}

impl Parking {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<DecodeState>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `st`, a state this model made, for the next run (the state kept before is
    /// dropped); other states are dropped, and so is every state when
    /// LIGHTSEQ_KEEP_DECODE_STATE=0.
    pub(crate) fn park(&self, st: DecodeState) {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = crate::backend::cuda::env_equals(&OFF, "LIGHTSEQ_KEEP_DECODE_STATE", "0");
        if st.owner == self.id && !off {
            *self.slot() = Some(st);
        }
    }

    /// Drops the kept state.
    pub(crate) fn clear(&self) {
        *self.slot() = None;
    }

    /// Drops the kept state unless it has `rows` rows of `capacity` positions: called
    /// before a run allocates (an encoder-decoder's encoder runs before `take`).
    pub(crate) fn keep_only(&self, rows: usize, capacity: usize) {
        let mut slot = self.slot();
        if slot
            .as_ref()
            .is_some_and(|st| st.rows != rows || st.capacity != capacity)
        {
            *slot = None;
        }
    }

    /// The kept state, reset for a new run, when it has `shape`; else None (and the kept
    /// state is dropped).
    pub(crate) fn take(&self, shape: &StateShape) -> Result<Option<DecodeState>> {
        let kept = self.slot().take();
        let Some(mut st) = kept else {
            return Ok(None);
        };
        let cache_shape = [shape.rows, shape.capacity, shape.width];
        let fits = st.rows == shape.rows
            && st.capacity == shape.capacity
            && st.caches.len() == shape.layers
            && st
                .caches
                .iter()
                .all(|c| c.k.shape() == cache_shape && c.k.dtype() == shape.dtype)
            && st
                .cross
                .iter()
                .all(|c| c.shape().get(1) == Some(&shape.src_len))
            && (st.cross.is_empty() == (shape.src_len == 0));
        // A state that cannot be reset is dropped; the run allocates its own.
        if !fits || st.reset().is_err() {
            return Ok(None);
        }
        Ok(Some(st))
    }
}

/// A state with one self-attention cache of `width` per layer.
pub(crate) fn new_state(
    layers: usize,
    rows: usize,
    capacity: usize,
    width: usize,
    dtype: DType,
    device: &Device,
) -> Result<DecodeState> {
    let caches = (0..layers)
        .map(|_| KvCache::new(rows, capacity, width, dtype, device))
        .collect::<Result<Vec<_>>>()?;
    Ok(DecodeState::new(rows, capacity, caches))
}

/// An encoder-decoder's state over encoder output `memory` [batch * src_len, d] (batch =
/// `lengths.len()`): cross keys/values of each layer computed once per item, which its
/// `rows / batch` rows share (`ops::attention` reads row r's from item r / (rows / batch)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_state(
    cross: &[&CrossAttention],
    memory: &Tensor,
    lengths: &[usize],
    src_len: usize,
    rows: usize,
    capacity: usize,
    width: usize,
    dtype: DType,
    device: &Device,
    parking: Option<&Parking>,
) -> Result<DecodeState> {
    let batch = lengths.len();
    if batch == 0 || !rows.is_multiple_of(batch) {
        return Err(Error::Input(format!(
            "{rows} decoder rows for {batch} sources"
        )));
    }
    let expand: Vec<usize> = (0..rows).map(|r| r / (rows / batch)).collect();
    let shape = StateShape {
        layers: cross.len(),
        rows,
        capacity,
        width,
        dtype,
        src_len,
    };
    let src_ranges: Vec<(usize, usize)> = expand.iter().map(|&b| (0, lengths[b])).collect();
    let kept = match parking {
        Some(p) => p.take(&shape)?,
        None => None,
    }
    // A kept state for as many rows of another beam count holds other items' rows.
    .filter(|st| st.cross.iter().all(|c| c.shape().first() == Some(&batch)));
    let layer_kv = |c: &CrossAttention| c.memory(memory, batch, src_len);
    // A kept state's buffers take this run's values in place (a captured step reads them
    // at their addresses).
    let mut st = match kept {
        Some(mut st) => {
            for (c, dst) in cross.iter().zip(st.cross.iter_mut()) {
                ops::copy_into(dst, &layer_kv(c)?)?;
            }
            st
        }
        None => {
            let mut st = new_state(cross.len(), rows, capacity, width, dtype, device)?;
            for c in cross {
                st.cross.push(layer_kv(c)?);
            }
            st
        }
    };
    let ranges = DecodeState::ranges_i32(&src_ranges);
    match &mut st.src_ranges_dev {
        Some(t) => ops::write_i32_(t, &ranges)?,
        None => st.src_ranges_dev = Some(Tensor::from_i32(&ranges, &[ranges.len()], device)?),
    }
    st.src_ranges = src_ranges;
    st.rows_per_item = rows / batch;
    if let Some(p) = parking {
        st.owner = p.id;
    }
    Ok(st)
}

/// Encoder states [batch, src_len, d_model] given by the caller as the `memory` an
/// encoder-decoder attends to ([batch * src_len, d_model] in the model's dtype and device).
pub(crate) fn states_to_memory(
    states: &Tensor,
    lengths: &[usize],
    d_model: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, usize)> {
    let s = states.shape();
    if s.len() != 3 || s[2] != d_model || s[0] != lengths.len() || lengths.iter().any(|&n| n > s[1])
    {
        return Err(Error::Input(format!(
            "encoder states {s:?} with lengths {lengths:?}: expected [batch, src_len, {d_model}]"
        )));
    }
    let memory = ops::to_dtype(&states.to_device(device)?, dtype)?.reshape(&[s[0] * s[1], s[2]])?;
    Ok((memory, s[1]))
}

/// An encoder-decoder's encoder and the decoding state it feeds. The [`Decoder`] methods
/// `begin`, `encode_sources` and `begin_from_states` of every encoder-decoder are the
/// `enc_dec_*` functions below over this.
pub(crate) trait EncoderDecoder {
    /// The model's name, for errors.
    fn name(&self) -> String;
    /// Encodes source ids: the memory [batch * src_len, d_model] and the padding.
    fn encode(&self, src: &[Vec<i64>]) -> Result<(Tensor, super::Padded)>;
    /// The decoder layers' cross attentions, in order.
    fn cross_attentions(&self) -> Vec<&CrossAttention>;
    /// Width of a self-attention cache row (heads x head size).
    fn cache_width(&self) -> usize;
    /// d_model, the compute dtype and the device of the memory.
    fn memory_layout(&self) -> (usize, DType, &Device);
    /// Where the model keeps its last run for the next one (see [`Parking`]).
    fn parking(&self) -> Option<&Parking> {
        None
    }
}

/// Decoding state over `memory` [batch * src_len, d_model], each item repeated for
/// `rows / batch` rows.
fn enc_dec_start(
    m: &impl EncoderDecoder,
    memory: &Tensor,
    lengths: &[usize],
    src_len: usize,
    rows: usize,
    capacity: usize,
) -> Result<DecodeState> {
    let (_, dtype, device) = m.memory_layout();
    cross_state(
        &m.cross_attentions(),
        memory,
        lengths,
        src_len,
        rows,
        capacity,
        m.cache_width(),
        dtype,
        device,
        m.parking(),
    )
}

/// [`Decoder::begin`] of an encoder-decoder: encodes `sources` and starts from them.
pub(crate) fn enc_dec_begin(
    m: &impl EncoderDecoder,
    sources: Option<&[Vec<i64>]>,
    rows: usize,
    capacity: usize,
) -> Result<DecodeState> {
    let src = sources.ok_or_else(|| {
        Error::Input(format!(
            "{} is an encoder-decoder: it needs source sequences",
            m.name()
        ))
    })?;
    if let Some(p) = m.parking() {
        p.keep_only(rows, capacity);
    }
    let (memory, sp) = m.encode(src)?;
    enc_dec_start(m, &memory, &sp.lengths, sp.len, rows, capacity)
}

/// [`Decoder::encode_sources`] of an encoder-decoder: f32 states [batch, src_len, d_model].
pub(crate) fn enc_dec_encode_sources(
    m: &impl EncoderDecoder,
    sources: &[Vec<i64>],
) -> Result<(Tensor, Vec<usize>)> {
    let (memory, sp) = m.encode(sources)?;
    Ok((memory_to_states(&memory, sp.batch, sp.len)?, sp.lengths))
}

/// [`Decoder::begin_from_states`] of an encoder-decoder.
pub(crate) fn enc_dec_begin_from_states(
    m: &impl EncoderDecoder,
    states: &Tensor,
    lengths: &[usize],
    rows: usize,
    capacity: usize,
) -> Result<DecodeState> {
    if let Some(p) = m.parking() {
        p.keep_only(rows, capacity);
    }
    let (d_model, dtype, device) = m.memory_layout();
    let (memory, src_len) = states_to_memory(states, lengths, d_model, dtype, device)?;
    enc_dec_start(m, &memory, lengths, src_len, rows, capacity)
}

/// An encoder's output [batch * src_len, d] as f32 states [batch, src_len, d].
pub(crate) fn memory_to_states(memory: &Tensor, batch: usize, src_len: usize) -> Result<Tensor> {
    let d = memory.shape()[1];
    ops::to_dtype(memory, DType::F32)?.reshape(&[batch, src_len, d])
}

/// Flattens equal-length rows of token ids into an i32 tensor [rows * t].
pub(crate) fn ids_tensor(tokens: &[Vec<i64>], vocab: usize, device: &Device) -> Result<Tensor> {
    let flat = ids_host(tokens, vocab)?;
    let n = flat.len();
    Tensor::from_i32(&flat, &[n], device)
}

/// The ids of `tokens`, row after row, checked against `vocab`.
pub(crate) fn ids_host(tokens: &[Vec<i64>], vocab: usize) -> Result<Vec<i32>> {
    let mut flat = Vec::with_capacity(tokens.len() * tokens.first().map_or(0, Vec::len));
    for (r, row) in tokens.iter().enumerate() {
        for &id in row {
            if id < 0 || id as u64 >= vocab as u64 {
                return Err(Error::Input(format!(
                    "row {r}: id {id} is outside the vocabulary [0, {vocab})"
                )));
            }
            flat.push(id as i32);
        }
    }
    Ok(flat)
}

/// A forward pass of a decoder over whole sequences, through the decode path: logits for
/// every position of the decoder inputs (decoder-only: `input_ids`; encoder-decoders:
/// `decoder_input_ids`, with `input_ids` as the sources), right-padded with `pad_id`.
/// `name` names the model in errors.
pub(crate) fn decoder_forward(
    m: &dyn Decoder,
    name: &str,
    batch: &Batch,
    pad_id: i64,
) -> Result<ModelOutput> {
    let (p, logits) = decoder_logits(m, name, batch, pad_id)?;
    p.output("logits", &logits)
}

/// [`decoder_forward`]'s logits left where they were computed: [batch x padded length,
/// vocab], the rows past each sequence's length not zeroed (`Model::forward_on_device`).
pub(crate) fn decoder_logits(
    m: &dyn Decoder,
    name: &str,
    batch: &Batch,
    pad_id: i64,
) -> Result<(Padded, Tensor)> {
    batch.text_only()?;
    let (rows, sources) = if m.is_encoder_decoder() {
        let dec = batch.decoder_input_ids.as_ref().ok_or_else(|| {
            Error::Input(format!(
                "{name} is an encoder-decoder: the input needs `decoder_input_ids`"
            ))
        })?;
        if dec.len() != batch.input_ids.len() {
            return Err(Error::Input(format!(
                "{} decoder_input_ids rows for {} input_ids rows",
                dec.len(),
                batch.input_ids.len()
            )));
        }
        (dec, Some(&batch.input_ids[..]))
    } else {
        (&batch.input_ids, None)
    };
    let p = Padded::new(rows, m.vocab(), m.max_decoder_positions())?;
    if p.batch == 0 || p.len == 0 {
        let empty = ops::zeros(&[0, m.vocab()], DType::F32, m.decoder_device())?;
        return Ok((p, empty));
    }
    let mut st = m.begin(sources, p.batch, p.len)?;
    let padded = p.pad_rows(rows, pad_id);
    st.key_end = Some(p.lengths.clone());
    let h = m.decode(&mut st, &padded)?;
    // Kept like a generation's (it may hold that run's captured step graph).
    m.park(st);
    let logits = m.logits(&h)?;
    Ok((p, logits))
}
