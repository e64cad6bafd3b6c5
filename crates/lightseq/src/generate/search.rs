//! The decoding loops: greedy and sampling, beam search (HF 5.x semantics), diverse beam
//! search by groups (Hamming penalty between groups) and by sibling rank (`diverse_lambda`).
//! Every row keeps the sequence HF would see for its prompt alone, so a ragged batch gives
//! what each prompt gives by itself.

use super::beam_select::{BeamSelect, SelectInputs};
use super::config::{EarlyStopping, Resolved};
use super::processors::{
    begin_index, forced_tokens, log_softmax, log_softmax_at, min_length_masks_eos, process,
    softmax, warp, RowContext,
};
use super::Hypothesis;
use crate::error::Result;
use crate::models::decode::{DecodeState, Decoder};
use crate::ops;

/// True when a processor that needs the whole row on the host acts at this step. With
/// `eos_mask_on_device`, the min-length EOS mask does not count (beam search applies it on
/// the device).
fn host_processing_needed(cfg: &Resolved, row: &RowContext, eos_mask_on_device: bool) -> bool {
    let len = row.seq.len();
    let begin = begin_index(cfg, row);
    cfg.repetition_penalty != 1.0
        || cfg.no_repeat_ngram_size > 0
        || !cfg.bad_words.is_empty()
        || !cfg.suppress.is_empty()
        || (!cfg.begin_suppress.is_empty() && len == begin)
        || (cfg.forced_bos.is_some() && len == 1)
        || (!cfg.forced_eos.is_empty() && len + 1 == row.max_length)
        || (!eos_mask_on_device && min_length_masks_eos(cfg, len, row.min_length))
}

/// `LIGHTSEQ_DEVICE_BEAMS=0`: beam search chooses every step's beams on the host, after
/// the step's top-k reaches it, instead of where the logits are (beam_select.rs).
fn device_select_on() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !crate::backend::cuda::env_equals(&OFF, "LIGHTSEQ_DEVICE_BEAMS", "0")
}

/// Most candidates (beams x top-k a row) a group may rank on the device; larger searches
/// choose on the host.
const MAX_DEVICE_CANDIDATES: usize = 2048;

/// HF's stand-in for minus infinity in beam scores.
pub(crate) const NEG: f32 = -1.0e9;

/// With LIGHTSEQ_SEARCH_TIMING=1, the host's time between a step's scores reaching it and
/// the next step's launch (the search's bookkeeping, while the device waits), reported on
/// stderr at the end of each search.
struct HostClock {
    on: bool,
    since: Option<std::time::Instant>,
    total: std::time::Duration,
    steps: usize,
    /// Time between consecutive [`HostClock::lap`]s, by the name of the lap that ends it.
    laps: Vec<(&'static str, std::time::Duration)>,
    last_lap: Option<std::time::Instant>,
}

impl HostClock {
    fn new() -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        HostClock {
            on: crate::backend::cuda::env_equals(&ON, "LIGHTSEQ_SEARCH_TIMING", "1"),
            since: None,
            total: std::time::Duration::ZERO,
            steps: 0,
            laps: Vec::new(),
            last_lap: None,
        }
    }

    /// Ends the lap `name`, which began at the previous lap's end.
    fn lap(&mut self, name: &'static str) {
        if !self.on {
            return;
        }
        let now = std::time::Instant::now();
        if let Some(t) = self.last_lap {
            match self.laps.iter_mut().find(|l| l.0 == name) {
                Some(l) => l.1 += now - t,
                None => self.laps.push((name, now - t)),
            }
        }
        self.last_lap = Some(now);
    }

    /// The step's scores are on the host.
    fn start(&mut self) {
        if self.on {
            self.since = Some(std::time::Instant::now());
        }
    }

    /// The next step is about to launch (or the search ends).
    fn stop(&mut self) {
        if let Some(t) = self.since.take() {
            self.total += t.elapsed();
            self.steps += 1;
        }
    }

    fn report(&self, search: &str, rows: usize) {
        if self.on && self.steps > 0 {
            eprintln!(
                "lightseq: {search} over {rows} rows: {:.1} us of host work a step ({} steps)",
                self.total.as_secs_f64() * 1e6 / self.steps as f64,
                self.steps
            );
            if !self.laps.is_empty() {
                let laps: Vec<String> = self
                    .laps
                    .iter()
                    .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e6 / self.steps as f64))
                    .collect();
                eprintln!("lightseq: {search}, us a step: {}", laps.join(", "));
            }
        }
    }
}

/// A deterministic generator for sampling (SplitMix64).
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEECE66D)
    }

    /// A token drawn from softmax(`logits`) ([`Rng::categorical`] of [`softmax`]) and its
    /// log-probability (as [`log_softmax`] gives it), from one pass of exponentials.
    pub fn draw_logits(&mut self, logits: &[f32]) -> (usize, f32) {
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            // softmax gives zeros, from which categorical takes index 0.
            self.uniform();
            return (0, f32::NEG_INFINITY);
        }
        let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
        let sum: f32 = e.iter().sum();
        let p: Vec<f32> = e.iter().map(|v| v / sum).collect();
        let i = self.categorical(&p);
        let wide: f64 = e.iter().map(|&v| v as f64).sum();
        (i, logits[i] - (m + wide.ln() as f32))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn with probability proportional to `p` (non-negative, not all zero).
    pub fn categorical(&mut self, p: &[f32]) -> usize {
        let total: f64 = p.iter().map(|&x| x as f64).sum();
        let mut u = self.uniform() * total;
        let mut last = 0;
        for (i, &x) in p.iter().enumerate() {
            if x > 0.0 {
                last = i;
                if u < x as f64 {
                    return i;
                }
                u -= x as f64;
            }
        }
        last
    }
}

/// Where each batch item stands: its input length and HF's length limits.
#[derive(Clone, Copy)]
pub struct ItemLimits {
    pub input_len: usize,
    pub max_length: usize,
    pub min_length: usize,
}

/// How a run starts: each row's sequence, the first (prefill) step's tokens, each item's
/// limits, rows per item, and the token fed to rows that have finished.
pub struct Start {
    pub starts: Vec<Vec<i64>>,
    pub first_step: Vec<Vec<i64>>,
    pub limits: Vec<ItemLimits>,
    pub per_item: usize,
    pub fill: i64,
}

fn row_ctx<'a>(limits: &[ItemLimits], b: usize, seq: &'a [i64]) -> RowContext<'a> {
    let lim = limits[b];
    RowContext {
        seq,
        input_len: lim.input_len,
        max_length: lim.max_length,
        min_length: lim.min_length,
    }
}

/// Greedy decoding or sampling, `per_item` rows per batch item.
pub fn greedy(
    m: &dyn Decoder,
    st: &mut DecodeState,
    cfg: &Resolved,
    start: Start,
) -> Result<Vec<Vec<Hypothesis>>> {
    let Start {
        starts,
        first_step,
        limits,
        per_item,
        fill,
    } = start;
    let rows = starts.len();
    let mut seqs = starts;
    let mut scores = vec![0f32; rows];
    let mut unfinished = vec![true; rows];
    let mut rng = Rng::new(cfg.seed);
    let mut logits = m.step_logits(st, &first_step)?;
    let vocab = m.vocab();
    let mut clock = HostClock::new();
    loop {
        let mut next = vec![fill; rows];
        let rows_ctx = |r: usize| {
            let lim = limits[r / per_item];
            (
                lim,
                RowContext {
                    seq: &seqs[r],
                    input_len: lim.input_len,
                    max_length: lim.max_length,
                    min_length: lim.min_length,
                },
            )
        };
        // The device picks tokens when no host-side processor is active at this step.
        let fast_k = if cfg.do_sample {
            (1..=64).contains(&cfg.top_k).then_some(cfg.top_k)
        } else {
            Some(1)
        };
        // A row whose processors force one token takes it without its logits.
        let forced: Vec<Option<i64>> = (0..rows)
            .map(|r| {
                let f = forced_tokens(cfg, &rows_ctx(r).1, vocab)?;
                (unfinished[r] && f.len() == 1).then_some(f[0])
            })
            .collect();
        let fast = fast_k.filter(|_| {
            (0..rows).all(|r| {
                !unfinished[r]
                    || forced[r].is_some()
                    || !host_processing_needed(cfg, &rows_ctx(r).1, true)
            })
        });
        let choices: Vec<Option<(usize, f32)>> = if let Some(k) = fast {
            // The min-length processor masks EOS in the logits, before the softmax (HF's
            // greedy search and sampling), so the masked rows renormalize without it.
            let mask: Vec<bool> = (0..rows)
                .map(|r| min_length_masks_eos(cfg, seqs[r].len(), rows_ctx(r).0.min_length))
                .collect();
            let top = ops::logprob_topk(
                &logits,
                k.min(vocab),
                mask.iter().any(|&m| m).then_some(ops::EosMask {
                    rows: &mask,
                    eos: &cfg.eos,
                    renormalize: true,
                }),
            )?;
            clock.start();
            (0..rows)
                .map(|r| {
                    if !unfinished[r] {
                        return None;
                    }
                    if let Some(t) = forced[r] {
                        // The host path draws once from the one-token distribution too.
                        if cfg.do_sample {
                            rng.uniform();
                        }
                        return Some((t as usize, 0.0));
                    }
                    let (ids, lps) = (
                        &top.ids[r * top.k..(r + 1) * top.k],
                        &top.logprobs[r * top.k..(r + 1) * top.k],
                    );
                    if !cfg.do_sample {
                        return Some((ids[0] as usize, lps[0]));
                    }
                    // Sampling among the top-k: their logits, warped (temperature, top-p; the
                    // rest of the vocabulary has probability zero), drawn.
                    let mut s: Vec<f32> = lps.iter().map(|&lp| lp + top.lse[r]).collect();
                    warp(cfg, &mut s, 1);
                    let (j, lp) = rng.draw_logits(&s);
                    Some((ids[j] as usize, lp))
                })
                .collect()
        } else {
            let host = logits.to_f32_vec()?;
            clock.start();
            (0..rows)
                .map(|r| {
                    if !unfinished[r] {
                        return None;
                    }
                    let mut s = host[r * vocab..(r + 1) * vocab].to_vec();
                    process(cfg, &rows_ctx(r).1, &mut s);
                    if cfg.do_sample {
                        warp(cfg, &mut s, 1);
                        return Some(rng.draw_logits(&s));
                    }
                    // First maximum, as torch.argmax.
                    let mut tok = 0;
                    for (i, &v) in s.iter().enumerate() {
                        if v > s[tok] {
                            tok = i;
                        }
                    }
                    Some((tok, log_softmax_at(&s, tok)))
                })
                .collect()
        };
        for (r, c) in choices.into_iter().enumerate() {
            let Some((tok, lp)) = c else { continue };
            let lim = limits[r / per_item];
            scores[r] += lp;
            seqs[r].push(tok as i64);
            next[r] = tok as i64;
            if cfg.eos.contains(&(tok as i64)) || seqs[r].len() >= lim.max_length {
                unfinished[r] = false;
                st.set_idle(r);
            }
        }
        if !unfinished.iter().any(|&u| u) {
            clock.stop();
            break;
        }
        let tokens: Vec<Vec<i64>> = next.iter().map(|&t| vec![t]).collect();
        clock.stop();
        logits = m.step_logits(st, &tokens)?;
    }
    clock.report("greedy search / sampling", rows);
    Ok(seqs
        .into_iter()
        .zip(scores)
        .collect::<Vec<_>>()
        .chunks(per_item)
        .map(|c| {
            c.iter()
                .map(|(t, s)| Hypothesis {
                    tokens: t.clone(),
                    score: *s,
                })
                .collect()
        })
        .collect())
}

/// One beam group of one batch item.
struct Group {
    /// Running beams: sequence, accumulated log-probability, cache row.
    running: Vec<(Vec<i64>, f32, usize)>,
    /// Finished slots: sequence, length-normalized score, filled.
    finished: Vec<(Vec<i64>, f32, bool)>,
    open: bool,
    done: bool,
}

/// The best `n` of the finished slots `old` and of new ones scored `new`, finished ones
/// first on ties; a new one is built by `make` (from its index in `new`) only where kept.
fn keep_best(
    old: Vec<(Vec<i64>, f32, bool)>,
    new: &[f32],
    n: usize,
    mut make: impl FnMut(usize) -> (Vec<i64>, f32, bool),
) -> Vec<(Vec<i64>, f32, bool)> {
    let nf = old.len();
    let scores: Vec<f32> = old.iter().map(|f| f.1).chain(new.iter().copied()).collect();
    let mut old: Vec<Option<(Vec<i64>, f32, bool)>> = old.into_iter().map(Some).collect();
    top_k_stable(&scores, n)
        .into_iter()
        .map(|i| match old.get_mut(i).and_then(Option::take) {
            Some(f) => f,
            None => make(i - nf),
        })
        .collect()
}

/// Indices of the `k` largest values, ties to the lower index (stable).
fn top_k_stable(v: &[f32], k: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(k.min(v.len()));
    push_top_k(v, k, &mut Vec::new(), &mut out);
    out
}

/// Row `row` of `top` as the processors leave a forced step: the forced tokens at
/// log-probability 0, then other tokens at minus infinity.
fn set_forced(top: &mut ops::TopK, row: usize, forced: &[i64]) {
    let others = (0i64..).filter(|t| !forced.contains(t));
    let ids = forced.iter().copied().chain(others).take(top.k);
    for (t, id) in ids.enumerate() {
        top.ids[row * top.k + t] = id as i32;
        top.logprobs[row * top.k + t] = if t < forced.len() {
            0.0
        } else {
            f32::NEG_INFINITY
        };
    }
}

/// A step's choices for every live group (phase 1 of [`beam`]), in flat buffers kept
/// across steps: per group the candidates (beam times vocabulary plus token), their
/// scores, which stop (EOS or the length limit), the scores that rank the next running
/// beams (stopped ones at NEG) and those beams' candidates.
#[derive(Default)]
struct Choices {
    cand: Vec<usize>,
    vals: Vec<f32>,
    stop: Vec<bool>,
    pen: Vec<f32>,
    sel: Vec<usize>,
    /// Per group, items' groups in order: None where the group was done before the step.
    groups: Vec<Option<GroupChoice>>,
    /// Scratch: (candidate, score) pairs of one group, and indices for ranking.
    pairs: Vec<(usize, f32)>,
    order: Vec<usize>,
}

/// Where one group's choices lie in [`Choices`]' buffers.
#[derive(Clone, Copy)]
struct GroupChoice {
    /// The candidates: `cand[at..at + n]` (and the same range of vals, stop, pen).
    at: usize,
    n: usize,
    /// The next running beams' candidates: `sel[sel_at..sel_at + sel_n]`.
    sel_at: usize,
    sel_n: usize,
    /// The step reaches the item's length limit.
    last: bool,
}

impl Choices {
    /// Clears the buffers for a new step.
    fn clear(&mut self) {
        self.cand.clear();
        self.vals.clear();
        self.stop.clear();
        self.pen.clear();
        self.sel.clear();
        self.groups.clear();
    }

    /// Whether every candidate of the group stops.
    fn all_stop(&self, gc: GroupChoice) -> bool {
        self.stop[gc.at..gc.at + gc.n].iter().all(|&s| s)
    }
}

/// Keeps the `k` best (candidate, score) pairs of `c`, best first, ties to the lower
/// candidate: a total order, so selecting the best k before sorting them gives what a full
/// sort would.
pub(crate) fn keep_best_pairs(c: &mut Vec<(usize, f32)>, k: usize) {
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if c.len() > k {
        c.select_nth_unstable_by(k, order);
        c.truncate(k);
    }
    c.sort_by(order);
}

/// Appends to `out` the indices of the `k` largest values of `v`, best first, ties to the
/// lower index (`order` is scratch, kept by callers that rank every step).
pub(crate) fn push_top_k(v: &[f32], k: usize, order: &mut Vec<usize>, out: &mut Vec<usize>) {
    let k = k.min(v.len());
    order.clear();
    order.extend(0..v.len());
    let cmp = |a: &usize, b: &usize| v[*b].total_cmp(&v[*a]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    out.extend_from_slice(order);
}

/// Phase 2 of a beam-search step for one group: the new running beams' sequences, the
/// finished slots, and whether the group can still improve (`open`) or is `done`. `base`
/// is the group's first row, `cur` the sequence length before the step.
#[allow(clippy::too_many_arguments)]
fn finish_step(
    cfg: &Resolved,
    grp: &mut Group,
    ch: &Choices,
    gc: GroupChoice,
    base: usize,
    cur: usize,
    lim: ItemLimits,
    vocab: usize,
    hf4: bool,
) {
    let gs = grp.running.len();
    let range = gc.at..gc.at + gc.n;
    let (cand, vals, stop, pen) = (
        &ch.cand[range.clone()],
        &ch.vals[range.clone()],
        &ch.stop[range.clone()],
        &ch.pen[range],
    );
    let sel = &ch.sel[gc.sel_at..gc.sel_at + gc.sel_n];
    let last = gc.last;
    let all_stop = ch.all_stop(gc);
    // Candidate c continues running beam cand[c] / vocab with token cand[c] % vocab; its
    // sequence is built only where it survives (a running or finished slot).
    let extend = |c: usize| {
        let seq = &grp.running[cand[c] / vocab].0;
        let mut s = Vec::with_capacity(seq.len() + 1);
        s.extend_from_slice(seq);
        s.push((cand[c] % vocab) as i64);
        s
    };
    let new_running: Vec<(Vec<i64>, f32, usize)> = sel
        .iter()
        .enumerate()
        .map(|(j, &c)| (extend(c), pen[c], base + j))
        .collect();
    // Finished slots: the best `gs` of the finished ones and the stopped candidates ranked
    // within the first `gs` (others compete at NEG), finished ones first on ties.
    let gen_len = (cur + 1 - lim.input_len) as f32;
    let all_full = grp.finished.iter().all(|f| f.2);
    let (norms, eligible): (Vec<f32>, Vec<bool>) = (0..cand.len())
        .map(|c| {
            let mut norm = vals[c] / gen_len.powf(cfg.length_penalty);
            if cfg.early_stopping == EarlyStopping::True && all_full {
                norm += NEG;
            }
            if !grp.open {
                norm += NEG;
            }
            let eligible = stop[c] && c < gs;
            if !eligible {
                norm += NEG;
            }
            (norm, eligible)
        })
        .unzip();
    let old = std::mem::take(&mut grp.finished);
    grp.finished = keep_best(old, &norms, gs, |c| (extend(c), norms[c], eligible[c]));
    grp.running = new_running;
    // Can a running beam still beat the worst finished one?
    let hyp_len = if cfg.early_stopping == EarlyStopping::Never && cfg.length_penalty > 0.0 {
        lim.max_length - lim.input_len
    } else {
        cur + 1 - lim.input_len
    };
    // HF 4.x's group beam search is done by its best candidate, HF 5.x's by its best
    // running beam.
    let best_sum = if hf4 { vals[0] } else { grp.running[0].1 };
    let best = best_sum / (hyp_len as f32).powf(cfg.length_penalty);
    let worst = grp
        .finished
        .iter()
        .map(|f| f.1)
        .fold(f32::INFINITY, f32::min);
    let cond = grp
        .finished
        .iter()
        .any(|f| best > if f.2 { worst } else { NEG });
    grp.open = grp.open && cond;
    let full = grp.finished.iter().all(|f| f.2);
    grp.done = !grp.open || (full && cfg.early_stopping == EarlyStopping::True) || all_stop;
    if hf4 && last && !grp.done {
        // HF 4.x's finalize: the running beams join the finished ones.
        let norm = gen_len.powf(cfg.length_penalty);
        let scores: Vec<f32> = grp.running.iter().map(|r| r.1 / norm).collect();
        let old = std::mem::take(&mut grp.finished);
        grp.finished = keep_best(old, &scores, gs, |j| {
            (grp.running[j].0.clone(), scores[j], true)
        });
        grp.done = true;
    }
}

/// Beam search over `limits.len()` items of `num_beams` rows each, in `num_beam_groups`
/// groups (diverse beam search when more than one) with optional sibling-rank penalty.
pub fn beam(
    m: &dyn Decoder,
    st: &mut DecodeState,
    cfg: &Resolved,
    start: Start,
) -> Result<Vec<Vec<Hypothesis>>> {
    let Start {
        starts,
        first_step,
        limits,
        fill,
        ..
    } = start;
    let nb = cfg.num_beams;
    let groups = cfg.num_beam_groups;
    let gs = nb / groups;
    let vocab = m.vocab();
    let k = (2usize).max(1 + cfg.eos.len()) * gs;
    // Group beam search follows HF 4.x's `_group_beam_search` (HF 5.x has none): beams do
    // not stop at the length limit but are added to the finished ones after the last step,
    // and a group is done by the best of its candidates, not of its running beams.
    let hf4 = groups > 1;
    let mut rng = Rng::new(cfg.seed);
    // Per item and group.
    let mut items: Vec<Vec<Group>> = (0..limits.len())
        .map(|b| {
            (0..groups)
                .map(|g| Group {
                    running: (0..gs)
                        .map(|j| {
                            let row = b * nb + g * gs + j;
                            (starts[row].clone(), if j == 0 { 0.0 } else { NEG }, row)
                        })
                        .collect(),
                    finished: vec![(starts[b * nb].clone(), NEG, false); gs],
                    open: true,
                    done: false,
                })
                .collect()
        })
        .collect();
    st.reorders = true;
    let mut logits = m.step_logits(st, &first_step)?;
    // One token a row, rewritten in place each step.
    let mut tokens: Vec<Vec<i64>> = vec![vec![fill]; st.rows];
    // The next beams chosen where the logits are (beam_select.rs) at steps that need nothing
    // of the host but the choice: the next step then launches before the host's
    // bookkeeping, which reads the choice while that step runs. The model must take its
    // step's ids as a device input; rows must not shape the step.
    let device_select = !cfg.do_sample
        && groups == 1
        && cfg.diverse_lambda.is_none()
        && vocab >= k
        // The kernel ranks a group's candidates against each other in shared memory.
        && gs * k <= MAX_DEVICE_CANDIDATES
        && device_select_on()
        && !m.idle_rows_shape_steps()
        && m.step_ids_from_device()
        && m.step_inputs(st, &tokens).ok().flatten().is_some();
    let mut generated = 0usize;
    let mut clock = HostClock::new();
    let mut ch = Choices::default();
    let mut chosen: Vec<i64> = Vec::new();
    let mut params: Vec<f32> = Vec::new();
    let mut rec: Vec<f32> = Vec::new();
    loop {
        let mut src = vec![0usize; st.rows];
        let mut next = vec![fill; st.rows];
        // Whether item b's step reaches its length limit.
        let at_last = |b: usize| limits[b].input_len + generated + 1 >= limits[b].max_length;
        // Device path: per-row log-probabilities' top candidates, when every live row can do
        // without host-side processors at this step (the min-length EOS mask runs there,
        // and a forced step needs no logits).
        let mut forced: Vec<(usize, Vec<i64>)> = Vec::new();
        let fast = !cfg.do_sample
            && groups == 1
            && cfg.diverse_lambda.is_none()
            && items.iter().enumerate().all(|(b, it)| {
                it.iter().all(|g| {
                    g.done
                        || g.running.iter().all(|(seq, _, row)| {
                            let ctx = row_ctx(&limits, b, seq);
                            if let Some(f) = forced_tokens(cfg, &ctx, vocab) {
                                forced.push((*row, f));
                                true
                            } else {
                                !host_processing_needed(cfg, &ctx, true)
                            }
                        })
                })
            });
        // The device selects when nothing is forced, some live group is not at its last
        // step (else the search ends without another step) and the model has a position
        // left for the step it launches.
        let on_device = device_select
            && fast
            && forced.is_empty()
            && st.len < m.max_decoder_positions()
            && items
                .iter()
                .enumerate()
                .any(|(b, it)| !at_last(b) && it.iter().any(|g| !g.done));
        clock.lap("checks");
        let mut mask = vec![false; st.rows];
        if fast {
            for (b, it) in items.iter().enumerate() {
                for g in it {
                    for (seq, _, row) in &g.running {
                        mask[*row] = min_length_masks_eos(cfg, seq.len(), limits[b].min_length);
                    }
                }
            }
        }
        let any = mask.iter().any(|&x| x);
        let mut pending = None;
        if on_device {
            // Each row's running score, then each group's flag (0 done, 1 running, 2 at its
            // last step).
            params.clear();
            params.resize(st.rows, 0.0);
            for (b, it) in items.iter().enumerate() {
                for g in it {
                    for &(_, score, row) in &g.running {
                        params[row] = score;
                    }
                }
                params.extend(it.iter().map(|g| match (g.done, at_last(b)) {
                    (true, _) => 0.0,
                    (false, false) => 1.0,
                    (false, true) => 2.0,
                }));
            }
            let inputs = SelectInputs {
                kt: k.min(vocab),
                kc: k,
                gs,
                params: &params,
                eos: &cfg.eos,
                fill,
                mask: any.then_some(ops::EosMask {
                    rows: &mask,
                    eos: &cfg.eos,
                    renormalize: false,
                }),
            };
            if st.select.is_none() {
                st.select = Some(BeamSelect::new(st.rows, &logits.device())?);
            }
            st.select
                .as_mut()
                .expect("made above")
                .run(&logits, &inputs)?;
            st.reorder_from_select()?;
            clock.lap("select");
            clock.start();
            st.ids_from_select = true;
            let next = m.step_logits(st, &tokens);
            st.ids_from_select = false;
            pending = Some(next?);
            clock.lap("launch");
            clock.stop();
            rec.clear();
            rec.extend_from_slice(st.select.as_ref().expect("made above").record()?);
        }
        let top = if fast && !on_device {
            // Beam search masks log-probabilities, after the softmax, as HF does.
            let mut top = ops::logprob_topk(
                &logits,
                k.min(vocab),
                any.then_some(ops::EosMask {
                    rows: &mask,
                    eos: &cfg.eos,
                    renormalize: false,
                }),
            )?;
            for (row, f) in &forced {
                set_forced(&mut top, *row, f);
            }
            Some(top)
        } else {
            None
        };
        let host = if fast {
            Vec::new()
        } else {
            logits.to_f32_vec()?
        };
        clock.lap("scores");
        if !on_device {
            clock.start();
        }
        // Phase 1, on the step's critical path: each live group's candidates and the
        // next running beams (their source rows and tokens), which are all the next step
        // needs.
        ch.clear();
        for (b, item) in items.iter().enumerate() {
            // Tokens the item's earlier groups chose at this step (Hamming diversity).
            chosen.clear();
            for (g, grp) in item.iter().enumerate() {
                let base = b * nb + g * gs;
                if grp.done {
                    for j in 0..gs {
                        src[base + j] = base + j;
                    }
                    // A finished group's beams take the pad token, which later groups'
                    // Hamming diversity counts (HF 4.x's group beam search).
                    chosen.extend(std::iter::repeat_n(fill, gs));
                    ch.groups.push(None);
                    continue;
                }
                let at = ch.cand.len();
                if on_device {
                    // The device's ranked candidates: k values, then k candidates as bits.
                    let r = &rec[(b * groups + g) * 2 * k..][..2 * k];
                    ch.cand.extend(r[k..].iter().map(|c| c.to_bits() as usize));
                    ch.vals.extend_from_slice(&r[..k]);
                } else if let Some(top) = &top {
                    // The best K over all beams are among each beam's best K.
                    let c = &mut ch.pairs;
                    c.clear();
                    for (j, (_, score, row)) in grp.running.iter().enumerate() {
                        for t in 0..top.k {
                            let id = top.ids[row * top.k + t] as usize;
                            c.push((j * vocab + id, top.logprobs[row * top.k + t] + score));
                        }
                    }
                    keep_best_pairs(c, k);
                    ch.cand.extend(c.iter().map(|p| p.0));
                    ch.vals.extend(c.iter().map(|p| p.1));
                } else {
                    // Scores of every (beam, token), processed on log-probabilities.
                    let mut acc = vec![0f32; gs * vocab];
                    for (j, (seq, score, row)) in grp.running.iter().enumerate() {
                        let mut lp = log_softmax(&host[row * vocab..(row + 1) * vocab]);
                        if cfg.diversity_penalty != 0.0 {
                            for &t in &chosen {
                                lp[t as usize] -= cfg.diversity_penalty;
                            }
                        }
                        process(cfg, &row_ctx(&limits, b, seq), &mut lp);
                        if cfg.do_sample {
                            warp(cfg, &mut lp, 1 + cfg.eos.len().max(1));
                        }
                        for (v, x) in lp.iter().enumerate() {
                            acc[j * vocab + v] = x + score;
                        }
                    }
                    let cand: Vec<usize> = if cfg.do_sample {
                        sample_without_replacement(&mut rng, &acc, k)
                    } else if let Some(lambda) = cfg.diverse_lambda {
                        let ranked = sibling_rank_penalized(&acc, gs, vocab, lambda);
                        top_k_stable(&ranked, k)
                    } else {
                        top_k_stable(&acc, k)
                    };
                    ch.vals.extend(cand.iter().map(|&i| acc[i]));
                    ch.cand.extend(cand);
                };
                let n = ch.cand.len() - at;
                // Candidate c continues running beam cand[c] / vocab with token cand[c] % vocab.
                // Group beam search's beams do not stop at the length limit (HF 4.x).
                let last = at_last(b);
                for c in at..at + n {
                    let stop = cfg.eos.contains(&((ch.cand[c] % vocab) as i64)) || (last && !hf4);
                    ch.stop.push(stop);
                    // Next running beams: the best candidates that did not stop.
                    ch.pen
                        .push(if stop { ch.vals[c] + NEG } else { ch.vals[c] });
                }
                let sel_at = ch.sel.len();
                push_top_k(&ch.pen[at..at + n], gs, &mut ch.order, &mut ch.sel);
                for (j, &c) in ch.sel[sel_at..].iter().enumerate() {
                    let c = ch.cand[at + c];
                    let token = (c % vocab) as i64;
                    src[base + j] = grp.running[c / vocab].2;
                    next[base + j] = token;
                    chosen.push(token);
                }
                ch.groups.push(Some(GroupChoice {
                    at,
                    n,
                    sel_at,
                    sel_n: ch.sel.len() - sel_at,
                    last,
                }));
            }
        }
        clock.lap("choices");
        // The next step goes to the device before the bookkeeping below, which then runs
        // while the device works. A group whose candidates all stop finishes at this step;
        // where every live group does, the search ends here without a step. Otherwise some
        // group ends only by the bookkeeping's checks, and where all do, the step launched
        // is not read (one step's work, once a search). Rows of items that have finished
        // advance too, so a step at the model's last position waits for the bookkeeping.
        // Group beam search's groups all end at their last step (HF 4.x's finalize).
        let any_runs = ch
            .groups
            .iter()
            .flatten()
            .any(|&gc| !(ch.all_stop(gc) || (hf4 && gc.last)));
        let mut launch = |st: &mut DecodeState, clock: &mut HostClock| -> Result<crate::Tensor> {
            st.reorder(&src)?;
            for (t, &n) in tokens.iter_mut().zip(&next) {
                t[0] = n;
            }
            clock.lap("reorder");
            clock.stop();
            let logits = m.step_logits(st, &tokens);
            clock.lap("launch");
            logits
        };
        // Only a GPU has anything to overlap (a CPU step runs as it is called), and a
        // model whose steps depend on which rows are idle needs this step's finished
        // groups marked first.
        let early = any_runs
            && st.len < m.max_decoder_positions()
            && m.decoder_device().is_cuda()
            && !m.idle_rows_shape_steps();
        if early && pending.is_none() {
            pending = Some(launch(st, &mut clock)?);
        }
        // Phase 2: sequences, finished hypotheses and the groups' states.
        for (b, item) in items.iter_mut().enumerate() {
            let lim = limits[b];
            let cur = lim.input_len + generated;
            for (g, grp) in item.iter_mut().enumerate() {
                let Some(gc) = ch.groups[b * groups + g] else {
                    continue;
                };
                let base = b * nb + g * gs;
                finish_step(cfg, grp, &ch, gc, base, cur, lim, vocab, hf4);
                if grp.done {
                    for row in base..base + gs {
                        st.set_idle(row);
                    }
                }
            }
        }
        clock.lap("bookkeeping");
        generated += 1;
        if items.iter().all(|it| it.iter().all(|g| g.done)) {
            clock.stop();
            break;
        }
        logits = match pending {
            Some(l) => l,
            None => launch(st, &mut clock)?,
        };
    }
    clock.report("beam search", st.rows);
    let nret = cfg.num_return_sequences;
    Ok(items
        .into_iter()
        .map(|item| {
            // Groups' hypotheses merged, best first (HF's group beam search finalize).
            let mut all: Vec<(Vec<i64>, f32, bool)> =
                item.into_iter().flat_map(|g| g.finished).collect();
            let scores: Vec<f32> = all.iter().map(|f| f.1).collect();
            let order = top_k_stable(&scores, nret);
            order
                .into_iter()
                .map(|i| {
                    let (t, s, _) = std::mem::take(&mut all[i]);
                    Hypothesis {
                        tokens: t,
                        score: s,
                    }
                })
                .collect()
        })
        .collect())
}

/// Scores with each token's rank among its parent beam's continuations subtracted,
/// `lambda` per rank (Li, Monroe and Jurafsky 2016), for choosing candidates.
fn sibling_rank_penalized(acc: &[f32], beams: usize, vocab: usize, lambda: f32) -> Vec<f32> {
    let mut out = acc.to_vec();
    for j in 0..beams {
        let row = &acc[j * vocab..(j + 1) * vocab];
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for (rank, &v) in order.iter().enumerate() {
            out[j * vocab + v] = row[v] - lambda * rank as f32;
        }
    }
    out
}

/// `k` distinct indices drawn in proportion to softmax(`acc`), sorted by score (beam sampling).
/// Where fewer than `k` have a nonzero probability, the rest are the best-scoring of those
/// of probability zero, after every drawn one: torch.multinomial without replacement (HF)
/// fills its `k` with such indices too, and every beam keeps a parent.
fn sample_without_replacement(rng: &mut Rng, acc: &[f32], k: usize) -> Vec<usize> {
    let mut p = softmax(acc);
    let mut picked = Vec::with_capacity(k);
    for _ in 0..k.min(p.iter().filter(|&&x| x > 0.0).count()) {
        let i = rng.categorical(&p);
        picked.push(i);
        p[i] = 0.0;
    }
    picked.sort_by(|&a, &b| acc[b].total_cmp(&acc[a]).then(a.cmp(&b)));
    if picked.len() < k {
        let mut rest = acc.to_vec();
        for &i in &picked {
            rest[i] = f32::NEG_INFINITY;
        }
        let fill = top_k_stable(&rest, k - picked.len());
        picked.extend(fill);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `draw_logits` draws what `categorical` of `softmax` draws from the same generator
    /// state, with `log_softmax`'s value, on random logits (minus infinity among them).
    #[test]
    fn draw_logits_matches_softmax_then_categorical() {
        let mut src = Rng::new(3);
        for case in 0..3000u64 {
            let n = 1 + (src.uniform() * 60.0) as usize;
            let all_masked = case % 97 == 0;
            let logits: Vec<f32> = (0..n)
                .map(|_| {
                    if all_masked || src.uniform() < 0.2 {
                        f32::NEG_INFINITY
                    } else {
                        (src.uniform() * 20.0 - 10.0) as f32
                    }
                })
                .collect();
            let (mut a, mut b) = (Rng::new(case), Rng::new(case));
            let (i, lp) = a.draw_logits(&logits);
            let j = b.categorical(&softmax(&logits));
            assert_eq!(i, j, "case {case}");
            assert_eq!(
                lp.to_bits(),
                log_softmax(&logits)[j].to_bits(),
                "case {case}"
            );
            // The generators stay in step.
            assert_eq!(a.uniform(), b.uniform());
        }
    }
}
