//! Fixed (sinusoidal) position tables, computed on the host as HF computes them.

/// Marian's table: row p = [sin(p / 10000^(2i/d)) for the first ceil(d/2) columns |
/// cos(...) for the rest], exponents 2 * (j / 2) / d at even j, in f64 then rounded to f32.
pub fn marian_sinusoidal(rows: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    let sin_cols = d.div_ceil(2);
    for p in 0..rows {
        let row = &mut out[p * d..(p + 1) * d];
        for j in 0..d {
            // Column j of the un-split table uses exponent 2 * (j / 2) / d; even columns go to
            // the sin half, odd ones to the cos half.
            let angle = p as f64 / 10000f64.powf((2 * (j / 2)) as f64 / d as f64);
            if j % 2 == 0 {
                row[j / 2] = angle.sin() as f32;
            } else {
                row[sin_cols + j / 2] = angle.cos() as f32;
            }
        }
    }
    out
}

/// fairseq's table (M2M100, NLLB, FSMT, XGLM): with half = d / 2 and
/// freq_i = exp(-i * ln(10000) / (half - 1)), row p = [sin(p freq) | cos(p freq)] (a zero
/// column appended when d is odd), in f32; row `padding_idx` is zero.
pub fn fairseq_sinusoidal(rows: usize, d: usize, padding_idx: Option<usize>) -> Vec<f32> {
    let half = d / 2;
    let step = (10000f32).ln() / (half as f32 - 1.0).max(1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut out = vec![0f32; rows * d];
    for p in 0..rows {
        if Some(p) == padding_idx {
            continue;
        }
        let row = &mut out[p * d..(p + 1) * d];
        for (i, f) in freqs.iter().enumerate() {
            let a = p as f32 * f;
            row[i] = a.sin();
            row[half + i] = a.cos();
        }
    }
    out
}
