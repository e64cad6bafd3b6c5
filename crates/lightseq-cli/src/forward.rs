use crate::input::read_batch;
use anyhow::{Context, Result};
use lightseq::io::{safetensors, ModelDir};
use lightseq::{models, DType, DeviceSpec};
use std::path::Path;
use std::time::Instant;

pub fn run(model_dir: &Path, input: &Path, out: &Path, device: &str, dtype: &str) -> Result<()> {
    let dtype: DType = dtype.parse()?;
    let device = device.parse::<DeviceSpec>()?.open()?;
    let batch = read_batch(input)?;
    let dir = ModelDir::open(model_dir)?;
    let t0 = Instant::now();
    let model = models::load(&dir, dtype, &device)?;
    let loaded = t0.elapsed();
    let t1 = Instant::now();
    let output = model.forward(&batch)?;
    let ran = t1.elapsed();
    safetensors::write_f32(out, &[(output.name, &output.shape, &output.data)])
        .with_context(|| format!("writing {}", out.display()))?;
    let tokens: usize = batch.input_ids.iter().map(Vec::len).sum();
    eprintln!(
        "lightseq forward: {} sequences, {tokens} tokens on {device} ({dtype}): load {:.0} ms, forward {:.1} ms -> {} {:?}",
        batch.input_ids.len(),
        loaded.as_secs_f64() * 1e3,
        ran.as_secs_f64() * 1e3,
        output.name,
        output.shape
    );
    Ok(())
}
