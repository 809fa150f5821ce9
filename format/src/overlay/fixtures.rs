//! Test fixtures shared by the overlay's tests: RAM images exercising every page kind, a
//! sink over a `Vec`, and small indexes.

use std::path::PathBuf;
use std::sync::Mutex;

use super::writer::page;
use super::{build, BuildOptions, Index, Overlay, OverlayError, PageSink, Run, SinkError, Stats};
use crate::PAGE_SIZE;

/// Guest memory in a Vec, with the base image beside it.
struct VecSink<'a> {
    mem: Mutex<Vec<u8>>,
    base: &'a [u8],
}

impl PageSink for VecSink<'_> {
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), SinkError> {
        let off = first as usize * PAGE_SIZE;
        self.mem.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero_pages(&self, first: u64, count: u64) -> Result<(), SinkError> {
        let off = first as usize * PAGE_SIZE;
        self.mem.lock().unwrap()[off..off + count as usize * PAGE_SIZE].fill(0);
        Ok(())
    }
    fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        let d = dst as usize * PAGE_SIZE;
        self.mem.lock().unwrap()[d..d + PAGE_SIZE].copy_from_slice(page(self.base, src));
        Ok(())
    }
    fn copy_page(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        let mut m = self.mem.lock().unwrap();
        let s = src as usize * PAGE_SIZE;
        m.copy_within(s..s + PAGE_SIZE, dst as usize * PAGE_SIZE);
        Ok(())
    }
}

/// The memory `ov` makes of `base`, applied with `threads` threads.
pub fn applied(ov: &Overlay, base: &[u8], threads: usize) -> Result<Vec<u8>, OverlayError> {
    let sink = VecSink {
        mem: Mutex::new(base.to_vec()),
        base,
    };
    ov.apply(&sink, threads)?;
    Ok(sink.mem.into_inner().unwrap())
}

/// Pages of [`images`].
pub const PAGES: usize = 600;

/// A base with text-like pages, and a customised copy exercising every page kind.
pub fn images() -> (Vec<u8>, Vec<u8>) {
    let mut base = vec![0u8; PAGES * PAGE_SIZE];
    for p in 0..300 {
        for (k, b) in base[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
            .iter_mut()
            .enumerate()
        {
            *b = ((p * 7 + k / 64) % 251) as u8;
        }
    }
    let mut new = base.clone();
    new[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0); // zero where the base is not
    let p10 = page(&base, 10).to_vec();
    new[400 * PAGE_SIZE..401 * PAGE_SIZE].copy_from_slice(&p10); // copy of a base page
    for p in 310..500 {
        if p == 400 {
            continue;
        }
        let v = (p as u64).wrapping_mul(0x9e37_79b9) as u8;
        new[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(v | 1); // data (values repeat: self dedup)
    }
    (base, new)
}

/// A fresh directory for test `name`.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ovl-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The overlay from `base` to `new` (zstd level 3, 64-page chunks) in `scratch(dir)`.
pub fn write(dir: &str, base: &[u8], new: &[u8]) -> (PathBuf, Stats) {
    let out = scratch(dir).join("app.overlay");
    let opts = BuildOptions {
        level: 3,
        chunk_pages: 64,
        threads: 2,
    };
    let stats = build(base, new, &[7; 32], b"STATE".to_vec(), None, &out, opts).unwrap();
    (out, stats)
}

/// An index of `mem_pages` pages with these zero runs and nothing else.
pub fn index(mem_pages: u64, zero: Vec<Run>) -> Index {
    Index {
        mem_pages,
        zero,
        base_copies: vec![],
        chunks: vec![],
        self_copies: vec![],
        disk_bytes: 0,
        disk_chunks: vec![],
        state: vec![],
        stats: Stats::default(),
    }
}

/// Statistics that describe `ix` (what `build` would have written).
pub fn stats_of(ix: &Index) -> Stats {
    let n = |runs: &[Run]| runs.iter().map(|r| r.count).sum::<u64>();
    let data = ix.chunks.iter().map(|c| n(&c.pages)).sum();
    let zero = n(&ix.zero);
    let (base_dedup, self_dedup) = (ix.base_copies.len() as u64, ix.self_copies.len() as u64);
    Stats {
        pages: ix.mem_pages,
        same: ix.mem_pages - data - zero - base_dedup - self_dedup,
        zero,
        base_dedup,
        self_dedup,
        data,
        compressed_bytes: 0,
        disk_blocks: ix.disk_chunks.iter().map(|c| n(&c.pages)).sum(),
    }
}
