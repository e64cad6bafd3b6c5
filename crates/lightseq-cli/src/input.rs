//! Parsing IN.json: ragged lists of token ids, every defect named by its position.

use anyhow::{bail, Context, Result};
use lightseq::models::Batch;
use serde_json::Value;
use std::path::Path;

fn ragged(v: &Value, key: &str) -> Result<Vec<Vec<i64>>> {
    let rows = v
        .as_array()
        .with_context(|| format!("`{key}` must be a list of lists of integers"))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r
                .as_array()
                .with_context(|| format!("`{key}[{i}]` must be a list of integers"))?;
            r.iter()
                .enumerate()
                .map(|(j, x)| {
                    x.as_i64()
                        .with_context(|| format!("`{key}[{i}][{j}]` is {x}, not an integer"))
                })
                .collect()
        })
        .collect()
}

/// Reads a batch from `path`.
pub fn read_batch(path: &Path) -> Result<Batch> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: malformed JSON", path.display()))?;
    let Some(obj) = v.as_object() else {
        bail!(
            "{}: expected a JSON object with `input_ids`",
            path.display()
        );
    };
    let ids = obj
        .get("input_ids")
        .with_context(|| format!("{}: no `input_ids`", path.display()))?;
    let input_ids = ragged(ids, "input_ids").with_context(|| path.display().to_string())?;
    let token_type_ids = match obj.get("token_type_ids") {
        None | Some(Value::Null) => None,
        Some(t) => Some(ragged(t, "token_type_ids").with_context(|| path.display().to_string())?),
    };
    Ok(Batch {
        input_ids,
        token_type_ids,
    })
}
