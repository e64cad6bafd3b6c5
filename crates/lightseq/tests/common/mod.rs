//! Helpers shared by the integration tests.
#![allow(dead_code)]

use lightseq::{Device, DeviceSpec};
use std::path::PathBuf;

/// Deterministic N(0, 1)-ish values (SplitMix64 + Box-Muller), never all zero.
pub fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) ^ 0xdeadbeef;
    let mut next = move || {
        s = s.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - next(), next());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// ||a - b|| / ||b||.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// tests/fixtures, or $LIGHTSEQ_FIXTURES when the test binary runs away from its checkout.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LIGHTSEQ_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// The CUDA device for GPU tests, or None (with a message) when there is none.
/// With LIGHTSEQ_REQUIRE_GPU=1 (scripts/gpu-check.sh) a missing GPU fails the test instead.
pub fn gpu(test: &str) -> Option<Device> {
    match DeviceSpec::Cuda(0).open() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("LIGHTSEQ_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: GPU required but unavailable: {e}");
            }
            eprintln!("{test}: skipped, no usable GPU ({e})");
            None
        }
    }
}

/// A JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// Whether NVRTC and the CUDA headers are here; without them a test skips with a message,
/// or panics under LIGHTSEQ_REQUIRE_NVRTC=1.
pub fn nvrtc_present() -> bool {
    use lightseq::backend::cuda::nvrtc;
    match nvrtc::check_available().and_then(|_| nvrtc::find_cuda_include().map(|_| ())) {
        Ok(()) => true,
        Err(e) if std::env::var("LIGHTSEQ_REQUIRE_NVRTC").as_deref() == Ok("1") => {
            panic!("NVRTC required but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}
