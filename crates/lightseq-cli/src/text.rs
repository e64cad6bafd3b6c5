//! The model directory's tokenizer.json, when the `text` feature is built.

use anyhow::Result;
use std::path::Path;

#[cfg(feature = "text")]
pub struct Tokenizer(tokenizers::Tokenizer);

#[cfg(feature = "text")]
impl Tokenizer {
    /// The tokenizer in `dir`, if it has tokenizer.json.
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join("tokenizer.json");
        if !p.is_file() {
            return Ok(None);
        }
        let t = tokenizers::Tokenizer::from_file(&p)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        Ok(Some(Tokenizer(t)))
    }

    /// Token ids of `text`, with the tokenizer's special tokens as HF's tokenizer adds them.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let e = self
            .0
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing `{text}`: {e}"))?;
        Ok(e.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().filter(|&&i| i >= 0).map(|&i| i as u32).collect();
        self.0
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }
}

#[cfg(not(feature = "text"))]
pub struct Tokenizer;

#[cfg(not(feature = "text"))]
impl Tokenizer {
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        if dir.join("tokenizer.json").is_file() {
            eprintln!("lightseq: built without the `text` feature; tokenizer.json is ignored");
        }
        Ok(None)
    }
    pub fn encode(&self, _text: &str) -> Result<Vec<i64>> {
        anyhow::bail!("built without the `text` feature")
    }
    pub fn decode(&self, _ids: &[i64]) -> Result<String> {
        anyhow::bail!("built without the `text` feature")
    }
}
