//! Beam search's choice of the next beams where the step's logits are (search.rs `beam`,
//! one group a search): on CUDA a kernel after the top-k writes the next step's token ids
//! and source rows on the device, so the next step launches without waiting for the host,
//! which reads each group's ranked candidates (the record) while that step runs. The CPU
//! runs the same selection in [`select_on_host`].

use super::search::{keep_best_pairs, push_top_k, NEG};
use crate::backend::{cpu, cuda};
use crate::error::{Error, Result};
use crate::ops::{self, EosMask};
use crate::tensor::{DType, Device, Storage, Tensor};

/// The selection's buffers, kept across a search's steps.
pub(crate) struct BeamSelect {
    /// The next step's token ids, i32 [rows].
    pub ids: Tensor,
    /// The row each row continues, i32 [rows].
    pub src: Tensor,
    /// Per group, its `kc` best candidates' values, then the candidates (beam * vocab +
    /// token) as f32 bits: on CUDA in `record_dev`, copied into `pinned` without blocking;
    /// on the CPU in `record_host`.
    record_dev: Option<Tensor>,
    pinned: Option<cuda::PinnedF32>,
    record_host: Vec<f32>,
    /// CUDA: the EOS ids on the device (i32), with the list they hold, uploaded once a
    /// search rather than once a step.
    eos_dev: Option<(Vec<i64>, Tensor)>,
}

/// What one selection takes besides the logits.
pub(crate) struct SelectInputs<'a> {
    /// Top-k a row (at least `kc / gs`, at most the vocabulary).
    pub kt: usize,
    /// Candidates kept per group (the search's 2 x beams or more).
    pub kc: usize,
    /// Beams per group.
    pub gs: usize,
    /// Per row the running beam's score, then per group 0 (done), 1 (running) or 2
    /// (running at its last step, where every candidate stops).
    pub params: &'a [f32],
    pub eos: &'a [i64],
    /// The token of a done group's rows.
    pub fill: i64,
    pub mask: Option<EosMask<'a>>,
}

impl BeamSelect {
    pub(crate) fn new(rows: usize, device: &Device) -> Result<Self> {
        let zeros = vec![0i32; rows];
        Ok(BeamSelect {
            ids: Tensor::from_i32(&zeros, &[rows], device)?,
            src: Tensor::from_i32(&zeros, &[rows], device)?,
            record_dev: None,
            pinned: None,
            record_host: Vec::new(),
            eos_dev: None,
        })
    }

    /// The last selection's record, once its copy to the host is done.
    pub(crate) fn record(&self) -> Result<&[f32]> {
        match &self.pinned {
            Some(p) if self.record_dev.is_some() => p.wait(),
            _ => Ok(&self.record_host),
        }
    }

    /// Selects the next beams from `logits` [rows, vocab] (see search.cu `beam_select`).
    pub(crate) fn run(&mut self, logits: &Tensor, inp: &SelectInputs) -> Result<()> {
        const OP: &str = "beam_select";
        let s = logits.shape();
        let [rows, vocab] = *s else {
            return Err(Error::op(
                OP,
                format!("logits {s:?}: [rows, vocab] expected"),
            ));
        };
        let groups = rows / inp.gs.max(1);
        if inp.gs == 0
            || !rows.is_multiple_of(inp.gs)
            || inp.kt == 0
            || inp.kt > vocab
            || inp.kc > inp.gs * inp.kt
            || inp.params.len() != rows + groups
            || self.ids.shape() != [rows]
        {
            return Err(Error::op(
                OP,
                format!(
                    "logits {s:?}, {} beams a group, {} a row, {} kept",
                    inp.gs, inp.kt, inp.kc
                ),
            ));
        }
        match &logits.storage {
            Storage::CpuF32(v) => {
                let top = cpu::logprob_topk(v, rows, vocab, inp.kt, inp.mask);
                let (ids, src, record) = select_on_host(&top.logprobs, &top.ids, vocab, inp);
                ops::write_i32_(&mut self.ids, &ids)?;
                ops::write_i32_(&mut self.src, &src)?;
                self.record_host = record;
                Ok(())
            }
            Storage::Cuda(x) => {
                let dev = x.device();
                let top = cuda::ops::logprob_topk_on_device(x, rows, vocab, inp.kt, inp.mask)?;
                let params = dev.upload_f32(inp.params, DType::F32)?;
                let len = groups * 2 * inp.kc;
                if self.record_dev.as_ref().is_none_or(|r| r.len() != len) {
                    self.record_dev = Some(ops::empty(&[len], DType::F32, &logits.device())?);
                }
                if !inp.eos.is_empty()
                    && self.eos_dev.as_ref().is_none_or(|(ids, _)| ids != inp.eos)
                {
                    let e: Vec<i32> = inp.eos.iter().map(|&t| t as i32).collect();
                    let t = Tensor::from_i32(&e, &[e.len()], &logits.device())?;
                    self.eos_dev = Some((inp.eos.to_vec(), t));
                }
                let eos = match &self.eos_dev {
                    Some((_, t)) if !inp.eos.is_empty() => Some(t.cuda(OP)?),
                    _ => None,
                };
                let record = self
                    .record_dev
                    .as_ref()
                    .expect("allocated above")
                    .cuda(OP)?;
                cuda::ops::beam_select(
                    &top,
                    rows,
                    inp.kt,
                    inp.kc,
                    vocab,
                    inp.gs,
                    &params,
                    eos,
                    inp.fill,
                    (self.ids.cuda(OP)?, self.src.cuda(OP)?, record),
                )?;
                record.download_f32_async(&mut self.pinned)
            }
            Storage::CpuI32(_) => Err(Error::op(OP, "logits must be float")),
        }
    }
}

/// The selection on the host, from each row's top `kt` (log-probabilities and ids):
/// (next ids, source rows, record), as search.cu's `beam_select` writes them.
pub(crate) fn select_on_host(
    logprobs: &[f32],
    top_ids: &[i32],
    vocab: usize,
    inp: &SelectInputs,
) -> (Vec<i32>, Vec<i32>, Vec<f32>) {
    let (kt, kc, gs) = (inp.kt, inp.kc, inp.gs);
    let rows = logprobs.len() / kt;
    let groups = rows / gs;
    let mut ids = vec![inp.fill as i32; rows];
    let mut src: Vec<i32> = (0..rows as i32).collect();
    let mut record = vec![0f32; groups * 2 * kc];
    for g in 0..groups {
        let flag = inp.params[rows + g];
        if flag == 0.0 {
            continue;
        }
        let base = g * gs;
        let mut cands: Vec<(usize, f32)> = (0..gs * kt)
            .map(|c| {
                let (j, t) = (c / kt, c % kt);
                let at = (base + j) * kt + t;
                (
                    j * vocab + top_ids[at] as usize,
                    logprobs[at] + inp.params[base + j],
                )
            })
            .collect();
        keep_best_pairs(&mut cands, kc);
        let rec = &mut record[g * 2 * kc..(g + 1) * 2 * kc];
        for (c, &(cand, v)) in cands.iter().enumerate() {
            rec[c] = v;
            rec[kc + c] = f32::from_bits(cand as u32);
        }
        let pen: Vec<f32> = cands
            .iter()
            .map(|&(cand, v)| {
                let stop = flag == 2.0 || inp.eos.contains(&((cand % vocab) as i64));
                if stop {
                    v + NEG
                } else {
                    v
                }
            })
            .collect();
        let mut sel = Vec::with_capacity(gs);
        push_top_k(&pen, gs, &mut Vec::new(), &mut sel);
        for (i, &c) in sel.iter().enumerate() {
            let cand = cands[c].0;
            ids[base + i] = (cand % vocab) as i32;
            src[base + i] = (base + cand / vocab) as i32;
        }
    }
    (ids, src, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A naive selection from the full logits: every (beam, token) pair scored by its
    /// log-softmax (f64) plus the beam's score, sorted whole.
    fn naive(
        logits: &[f32],
        vocab: usize,
        inp: &SelectInputs,
    ) -> (Vec<i32>, Vec<i32>, Vec<(usize, f32)>) {
        let rows = logits.len() / vocab;
        let groups = rows / inp.gs;
        let mut ids = vec![inp.fill as i32; rows];
        let mut src: Vec<i32> = (0..rows as i32).collect();
        let mut kept = Vec::new();
        for g in 0..groups {
            let flag = inp.params[rows + g];
            if flag == 0.0 {
                continue;
            }
            let base = g * inp.gs;
            let mut all = Vec::new();
            for j in 0..inp.gs {
                let row = &logits[(base + j) * vocab..(base + j + 1) * vocab];
                let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
                let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
                for (t, &x) in row.iter().enumerate() {
                    let lp = (x as f64 - lse) as f32;
                    all.push((j * vocab + t, lp + inp.params[base + j]));
                }
            }
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(inp.kc);
            let stops = |c: usize| flag == 2.0 || inp.eos.contains(&((c % vocab) as i64));
            let mut order: Vec<usize> = (0..all.len()).collect();
            order.sort_by_key(|&i| (stops(all[i].0), i));
            for (r, &i) in order.iter().take(inp.gs).enumerate() {
                ids[base + r] = (all[i].0 % vocab) as i32;
                src[base + r] = (base + all[i].0 / vocab) as i32;
            }
            kept.extend(all);
        }
        (ids, src, kept)
    }

    #[test]
    fn host_selection_matches_a_full_sort() {
        let mut rng = crate::generate::search::Rng::new(7);
        for (gs, vocab, eos, ties) in [(4, 50, vec![3i64], false), (2, 37, vec![0, 5], true)] {
            let groups = 3;
            let rows = groups * gs;
            let kc = (1 + eos.len()).max(2) * gs;
            // Tied logits (multiples of 0.5) exercise the index tie-break.
            let logits: Vec<f32> = (0..rows * vocab)
                .map(|_| {
                    let x = (rng.uniform() * 6.0 - 3.0) as f32;
                    if ties {
                        (x * 2.0).round() / 2.0
                    } else {
                        x
                    }
                })
                .collect();
            let mut params: Vec<f32> = (0..rows)
                .map(|r| {
                    if r % gs == 0 {
                        0.0
                    } else {
                        -(rng.uniform() as f32)
                    }
                })
                .collect();
            params.extend([1.0, 0.0, 2.0]);
            let inp = SelectInputs {
                kt: kc,
                kc,
                gs,
                params: &params,
                eos: &eos,
                fill: 1,
                mask: None,
            };
            let top = cpu::logprob_topk(&logits, rows, vocab, kc, None);
            let (ids, src, record) = select_on_host(&top.logprobs, &top.ids, vocab, &inp);
            let (want_ids, want_src, want_kept) = naive(&logits, vocab, &inp);
            assert_eq!(ids, want_ids, "gs {gs}");
            assert_eq!(src, want_src, "gs {gs}");
            // Groups 0 and 2 run; their records hold the naive ranking's candidates.
            let got: Vec<(usize, f32)> = [0, 2]
                .iter()
                .flat_map(|&g| {
                    let r = &record[g * 2 * kc..(g + 1) * 2 * kc];
                    (0..kc).map(move |c| (r[kc + c].to_bits() as usize, r[c]))
                })
                .collect();
            assert_eq!(got.len(), want_kept.len());
            for (a, b) in got.iter().zip(&want_kept) {
                assert_eq!(a.0, b.0, "gs {gs}: candidates differ");
                assert!((a.1 - b.1).abs() < 1e-5, "gs {gs}: {} vs {}", a.1, b.1);
            }
        }
    }
}
