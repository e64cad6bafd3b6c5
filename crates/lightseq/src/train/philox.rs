//! Philox-4x32-10, the counter-based generator behind dropout: a mask bit is a pure
//! function of (seed, offset, element index), so the backward pass regenerates the forward's
//! mask instead of storing it, and the CPU and CUDA kernels draw the same masks.
//! `kernels/train.cu` implements the same function; tests compare the two.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// The four 32-bit outputs for `counter` under `key`.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// A uniform number in [0, 1) for element `i` of the draw at `offset` under `seed`:
/// counter (i / 4 as two words, offset as two words), lane i % 4, top 24 bits.
pub fn uniform(seed: u64, offset: u64, i: u64) -> f32 {
    let q = i >> 2;
    let out = philox4x32_10(
        [
            q as u32,
            (q >> 32) as u32,
            offset as u32,
            (offset >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    (out[(i & 3) as usize] >> 8) as f32 * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // Random123's published known-answer vectors for philox4x32-10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniform_is_uniform() {
        let n = 100_000;
        let mean = (0..n).map(|i| uniform(7, 3, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let kept = (0..n).filter(|&i| uniform(7, 3, i) >= 0.1).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.01, "{kept}");
    }
}
