use anyhow::Result;
use lightseq::io::ModelDir;
use lightseq::models;
use std::collections::BTreeMap;
use std::path::Path;

/// Prints a preset's config.json.
pub fn preset(name: &str) -> Result<()> {
    let cfg = models::presets::config(name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown preset `{name}` (one of {})",
            models::presets::NAMES.join(", ")
        )
    })?;
    println!("{}", serde_json::to_string_pretty(&cfg)?);
    Ok(())
}

pub fn run(model_dir: &Path) -> Result<()> {
    let dir = ModelDir::open(model_dir)?;
    let info = models::describe(&dir)?;
    let mut params = 0usize;
    let mut dtypes: BTreeMap<&str, usize> = BTreeMap::new();
    let names: Vec<&str> = dir.checkpoint.names().collect();
    for name in &names {
        if let Some((shape, dt)) = dir.checkpoint.info(name) {
            let n: usize = shape.iter().product();
            params += n;
            *dtypes.entry(dt).or_default() += n;
        }
    }
    println!("model:        {}", model_dir.display());
    println!("model_type:   {}", dir.model_type()?);
    println!("architecture: {}", info.architecture);
    for (k, v) in &info.sizes {
        println!("  {k:<24} {v}");
    }
    println!("tensors:      {}", names.len());
    println!("parameters:   {} ({:.1}M)", params, params as f64 / 1e6);
    let dt: Vec<String> = dtypes
        .iter()
        .map(|(k, n)| format!("{k} ({n} values)"))
        .collect();
    println!("dtypes:       {}", dt.join(", "));
    Ok(())
}
