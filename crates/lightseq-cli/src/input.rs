//! Reading a batch: IN.json (token ids) or IN.safetensors (`pixel_values`).

use anyhow::{bail, Context, Result};
use lightseq::io::safetensors::SafeTensorsFile;
use lightseq::models::Batch;
use std::path::Path;

/// Reads a batch from `path`: `.safetensors` files hold `pixel_values`
/// [batch, channels, height, width]; anything else is the JSON id format.
pub fn read_batch(path: &Path) -> Result<Batch> {
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        let f = SafeTensorsFile::open(path)?;
        let (shape, values) = f.read_f32("pixel_values")?;
        if shape.len() != 4 {
            bail!(
                "{}: `pixel_values` has shape {shape:?}, expected [batch, channels, height, width]",
                path.display()
            );
        }
        return Ok(Batch {
            pixel_values: Some((shape, values)),
            ..Default::default()
        });
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?;
    Batch::from_json(&v).with_context(|| path.display().to_string())
}
