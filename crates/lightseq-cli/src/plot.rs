//! A loss-curve PNG without dependencies: an RGB raster with axes, grid lines and the
//! curve, written as a PNG of stored (uncompressed) deflate blocks.

use std::path::Path;

const W: usize = 720;
const H: usize = 420;
const MARGIN: usize = 50;

struct Canvas {
    px: Vec<[u8; 3]>,
}

/// 3x5 glyphs (rows top to bottom, 3 bits each, high bit left) for axis numbers.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'e' => [7, 5, 7, 4, 7],
        _ => return None,
    })
}

impl Canvas {
    /// Writes `text` with its top-left corner at (x, y), each glyph pixel `scale` wide.
    fn text(&mut self, x: i64, y: i64, text: &str, c: [u8; 3]) {
        let scale = 2;
        for (i, ch) in text.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            let ox = x + i as i64 * 4 * scale;
            for (r, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits >> (2 - col) & 1 == 1 {
                        for dx in 0..scale {
                            for dy in 0..scale {
                                self.set(ox + col * scale + dx, y + r as i64 * scale + dy, c);
                            }
                        }
                    }
                }
            }
        }
    }

    fn new() -> Self {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }
}

/// One curve: (step, value) points and an RGB colour.
pub type Series<'a> = (&'a [(f64, f64)], [u8; 3]);

/// Plots `series` to `path`.
pub fn loss_curve(path: &Path, series: &[Series]) -> std::io::Result<()> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.0.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    let mut c = Canvas::new();
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.1), a.1.max(p.1)));
    let (x1, y1) = (x1.max(x0 + 1.0), if y1 > y0 { y1 } else { y0 + 1.0 });
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let map = |x: f64, y: f64| {
        (
            MARGIN as f64 + (x - x0) / (x1 - x0) * pw,
            (H - MARGIN) as f64 - (y - y0) / (y1 - y0) * ph,
        )
    };
    let grid = [225, 225, 225];
    for i in 0..=4 {
        let y = (H - MARGIN) as f64 - ph * i as f64 / 4.0;
        c.line((MARGIN as f64, y), ((W - MARGIN) as f64, y), grid, 1);
        let x = MARGIN as f64 + pw * i as f64 / 4.0;
        c.line((x, MARGIN as f64), (x, (H - MARGIN) as f64), grid, 1);
    }
    let axis = [40, 40, 40];
    // Axis numbers: the loss at the bottom and top grid lines, the first and last step.
    let num = |v: f64| {
        if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-2) {
            format!("{v:.1e}")
        } else {
            format!("{v:.3}")
        }
    };
    c.text(4, (H - MARGIN) as i64 - 5, &num(y0), axis);
    c.text(4, MARGIN as i64 - 5, &num(y1), axis);
    c.text(
        MARGIN as i64,
        (H - MARGIN) as i64 + 10,
        &format!("{x0:.0}"),
        axis,
    );
    let last = format!("{x1:.0}");
    c.text(
        (W - MARGIN) as i64 - 8 * last.len() as i64,
        (H - MARGIN) as i64 + 10,
        &last,
        axis,
    );
    let (ox, oy) = (MARGIN as f64, (H - MARGIN) as f64);
    c.line((ox, oy), ((W - MARGIN) as f64, oy), axis, 2);
    c.line((ox, oy), (ox, MARGIN as f64), axis, 2);
    for (s, colour) in series {
        let p: Vec<_> = s.iter().filter(|p| p.1.is_finite()).collect();
        for w in p.windows(2) {
            c.line(map(w[0].0, w[0].1), map(w[1].0, w[1].1), *colour, 2);
        }
        if p.len() == 1 {
            let (x, y) = map(p[0].0, p[0].1);
            c.line((x - 2.0, y), (x + 2.0, y), *colour, 3);
        }
    }
    std::fs::write(path, encode_png(&c.px))
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

fn encode_png(px: &[[u8; 3]]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(H * (1 + 3 * W));
    for row in px.chunks(W) {
        raw.push(0); // filter: none
        for p in row {
            raw.extend_from_slice(p);
        }
    }
    // zlib stream of stored deflate blocks (at most 65535 bytes each).
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn checksums_match_known_values() {
        assert_eq!(super::crc32(b"IEND"), 0xae42_6082);
        assert_eq!(super::adler32(b"Wikipedia"), 0x11e6_0398);
    }
}
