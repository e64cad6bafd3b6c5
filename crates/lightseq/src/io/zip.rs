//! Reading uncompressed (stored) zip archives, as torch.save writes them: entries are
//! located through the central directory (local headers carry zero sizes), zip64 included.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One stored entry: where its bytes are in the archive.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub start: usize,
    pub len: usize,
}

/// The entries of an archive by name.
pub struct ZipIndex {
    pub entries: HashMap<String, Entry>,
    /// Names in central-directory order.
    pub order: Vec<String>,
}

fn u16le(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
}
fn u32le(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()) as u64)
}
fn u64le(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
}

impl ZipIndex {
    /// Indexes the archive held in `b`; `path` names it in errors.
    pub fn parse(path: &Path, b: &[u8]) -> Result<Self> {
        let bad = |msg: &str| Error::Checkpoint {
            path: PathBuf::from(path),
            msg: format!("zip archive: {msg}"),
        };
        // End of central directory: the last "PK\x05\x06" within the final 64 KiB + 22 bytes.
        let lo = b.len().saturating_sub(65557);
        let eocd = (lo..b.len().saturating_sub(21))
            .rev()
            .find(|&i| &b[i..i + 4] == b"PK\x05\x06")
            .ok_or_else(|| bad("no end-of-central-directory record (truncated?)"))?;
        let mut count = u16le(b, eocd + 10).unwrap();
        let mut cd_offset = u32le(b, eocd + 16).unwrap();
        if cd_offset == 0xFFFF_FFFF || count == 0xFFFF {
            // zip64 locator just before the EOCD points at the zip64 EOCD record.
            let loc = eocd
                .checked_sub(20)
                .filter(|&l| &b[l..l + 4] == b"PK\x06\x07")
                .ok_or_else(|| bad("missing zip64 locator"))?;
            let rec = u64le(b, loc + 8).ok_or_else(|| bad("bad zip64 locator"))? as usize;
            if b.get(rec..rec + 4) != Some(b"PK\x06\x06") {
                return Err(bad("bad zip64 end record"));
            }
            count = u64le(b, rec + 32).ok_or_else(|| bad("bad zip64 end record"))?;
            cd_offset = u64le(b, rec + 48).ok_or_else(|| bad("bad zip64 end record"))?;
        }
        let mut entries = HashMap::new();
        let mut order = Vec::new();
        let mut at = cd_offset as usize;
        for _ in 0..count {
            if b.get(at..at + 4) != Some(b"PK\x01\x02") {
                return Err(bad("corrupt central directory"));
            }
            let field =
                |o: usize| u32le(b, at + o).ok_or_else(|| bad("truncated central directory"));
            let method = u16le(b, at + 10).ok_or_else(|| bad("truncated central directory"))?;
            let mut csize = field(20)?;
            let mut usize_ = field(24)?;
            let name_len = u16le(b, at + 28).unwrap_or(0) as usize;
            let extra_len = u16le(b, at + 30).unwrap_or(0) as usize;
            let comment_len = u16le(b, at + 32).unwrap_or(0) as usize;
            let mut local = field(42)?;
            let name_bytes = b
                .get(at + 46..at + 46 + name_len)
                .ok_or_else(|| bad("truncated central directory"))?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            // zip64 extra: the fields that are 0xFFFFFFFF, in order.
            let mut x = at + 46 + name_len;
            let x_end = x + extra_len;
            while x + 4 <= x_end {
                let id = u16le(b, x).unwrap_or(0);
                let sz = u16le(b, x + 2).unwrap_or(0) as usize;
                if id == 1 {
                    let mut p = x + 4;
                    for v in [&mut usize_, &mut csize, &mut local] {
                        if *v == 0xFFFF_FFFF {
                            *v = u64le(b, p).ok_or_else(|| bad("truncated zip64 field"))?;
                            p += 8;
                        }
                    }
                }
                x += 4 + sz;
            }
            if method != 0 {
                return Err(bad(&format!("entry `{name}` is compressed (method {method}); torch.save writes stored entries")));
            }
            let l = local as usize;
            if b.get(l..l + 4) != Some(b"PK\x03\x04") {
                return Err(bad(&format!(
                    "entry `{name}` has no local header (truncated?)"
                )));
            }
            let lname = u16le(b, l + 26).unwrap_or(0) as usize;
            let lextra = u16le(b, l + 28).unwrap_or(0) as usize;
            let start = l + 30 + lname + lextra;
            let len = usize_ as usize;
            if start + len > b.len() {
                return Err(bad(&format!(
                    "entry `{name}` runs past the end of the file (truncated?)"
                )));
            }
            order.push(name.clone());
            entries.insert(name, Entry { start, len });
            at += 46 + name_len + extra_len + comment_len;
        }
        Ok(ZipIndex { entries, order })
    }
}
