//! Generation: greedy, beam search, diverse beam search and sampling over any [`Decoder`],
//! with HF `generate`'s options and semantics (see docs/generation.md).

pub(crate) mod beam_select;
pub mod config;
pub mod processors;
pub mod search;

pub use config::{EarlyStopping, GenerationOptions, Resolved};

use crate::error::{Error, Result};
use crate::models::decode::Decoder;
use crate::tensor::Tensor;
use search::ItemLimits;

/// One generated sequence and its score: HF's `sequences_scores` for beam search (sum of
/// log-probabilities over the length penalty), else the sum of the chosen tokens'
/// log-probabilities under the processed distribution.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hypothesis {
    /// Decoder-only: prompt then continuation; encoder-decoder: the decoder start token then
    /// the continuation. Trailing pad tokens are removed.
    pub tokens: Vec<i64>,
    pub score: f32,
}

/// What to generate from.
pub enum Inputs<'a> {
    /// Decoder-only prompts, or encoder-decoder sources (token ids, ragged).
    Ids(&'a [Vec<i64>]),
    /// Encoder-decoders: encoder output [batch, src_len, d_model] and each item's length.
    EncoderStates(&'a Tensor, &'a [usize]),
}

/// Generates for every input; returns `num_return_sequences` hypotheses per input, each
/// exactly what HF `generate` returns for that input alone.
pub fn generate(
    m: &dyn Decoder,
    inputs: Inputs,
    opts: &GenerationOptions,
) -> Result<Vec<Vec<Hypothesis>>> {
    let enc_dec = m.is_encoder_decoder();
    let mut opts = opts.clone();
    if enc_dec && opts.decoder_start_token_id.is_none() && opts.bos_token_id.is_none() {
        opts.decoder_start_token_id = m.default_decoder_start();
    }
    let cfg = Resolved::new(&opts, enc_dec)?;
    let batch = match &inputs {
        Inputs::Ids(ids) => ids.len(),
        Inputs::EncoderStates(_, lens) => lens.len(),
    };
    if batch == 0 {
        return Ok(Vec::new());
    }
    if !enc_dec && matches!(inputs, Inputs::EncoderStates(..)) {
        return Err(Error::Input(
            "encoder states need an encoder-decoder model".into(),
        ));
    }
    let vocab = m.vocab();
    let check_ids = |ids: &[i64], what: &str| -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t as u64 >= vocab as u64) {
            return Err(Error::Input(format!(
                "{what} {bad} is outside the vocabulary [0, {vocab})"
            )));
        }
        Ok(())
    };
    // EOS and suppressed ids outside the vocabulary can never be produced and are ignored,
    // as HF ignores them; forced and start tokens must exist.
    check_ids(&cfg.forced_eos, "forced_eos_token_id")?;
    if let Some(t) = cfg.forced_bos {
        check_ids(&[t], "forced_bos_token_id")?;
    }
    let start = cfg.decoder_start;
    if let Some(s) = start {
        check_ids(&[s], "decoder_start_token_id")?;
    }
    // Per item: the sequence HF starts from, and its limits.
    let seeds: Vec<Vec<i64>> = match (&inputs, enc_dec) {
        (Inputs::Ids(ids), false) => {
            for (i, p) in ids.iter().enumerate() {
                if p.is_empty() {
                    return Err(Error::Input(format!("prompt {i} is empty")));
                }
            }
            ids.to_vec()
        }
        _ => vec![vec![start.unwrap()]; batch],
    };
    let limits: Vec<ItemLimits> = seeds
        .iter()
        .map(|s| {
            let (max_length, min_length) = cfg.lengths(s.len(), m.default_length_cap())?;
            Ok(ItemLimits {
                input_len: s.len(),
                max_length,
                min_length,
            })
        })
        .collect::<Result<_>>()?;
    let per_item = if cfg.num_beams > 1 {
        cfg.num_beams
    } else {
        cfg.num_return_sequences
    };
    let rows = batch * per_item;
    let prompt_len = seeds.iter().map(Vec::len).max().unwrap_or(1);
    let capacity = limits
        .iter()
        .map(|l| prompt_len + l.max_length - l.input_len)
        .max()
        .unwrap_or(prompt_len);
    let mut st = match &inputs {
        Inputs::Ids(ids) => m.begin(enc_dec.then_some(*ids), rows, capacity)?,
        Inputs::EncoderStates(states, lens) => m.begin_from_states(states, lens, rows, capacity)?,
    };
    // Left padding for decoder-only prompts: row r's real tokens end at the same slot.
    let starts: Vec<Vec<i64>> = (0..rows).map(|r| seeds[r / per_item].clone()).collect();
    let first_step: Vec<Vec<i64>> = starts
        .iter()
        .map(|s| {
            let mut v = vec![s[0]; prompt_len - s.len()];
            v.extend_from_slice(s);
            v
        })
        .collect();
    st.key_start = starts.iter().map(|s| prompt_len - s.len()).collect();
    // HF 5.x pads shorter returned beams with `pad_token_id or eos_token_id[0]` (a pad id
    // of 0 counts as none there); HF 4.x's group beam search, and greedy search and
    // sampling, pad with the pad id, which is eos_token_id[0] only where the model has none.
    let hf_fill = match (cfg.eos.first(), cfg.pad) {
        (None, _) => -1,
        (Some(&e), pad) if cfg.num_beams > 1 && cfg.num_beam_groups == 1 => {
            pad.filter(|&p| p != 0).unwrap_or(e)
        }
        (Some(&e), pad) => pad.unwrap_or(e),
    };
    let feed = cfg
        .pad
        .filter(|&p| p >= 0 && (p as usize) < vocab)
        .unwrap_or(0);
    let run = search::Start {
        starts,
        first_step,
        limits,
        per_item,
        fill: feed,
    };
    let out = if cfg.num_beams > 1 {
        search::beam(m, &mut st, &cfg, run)?
    } else {
        search::greedy(m, &mut st, &cfg, run)?
    };
    m.park(st);
    Ok(out
        .into_iter()
        .map(|hyps| {
            // Pad to the longest returned sequence as HF does, then drop trailing pads.
            let longest = hyps.iter().map(|h| h.tokens.len()).max().unwrap_or(0);
            hyps.into_iter()
                .map(|mut h| {
                    h.tokens.resize(longest, hf_fill);
                    if let Some(p) = cfg.pad {
                        while h.tokens.len() > 1 && h.tokens.last() == Some(&p) {
                            h.tokens.pop();
                        }
                    }
                    h
                })
                .collect()
        })
        .collect())
}
