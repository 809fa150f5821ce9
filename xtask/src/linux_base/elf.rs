//! Packing an x86-64 vmlinux for the base: the same memory image, a much smaller file.
//!
//! An x86-64 kernel's link pads its image to 2 MiB boundaries: the entry text (for page
//! table isolation), the end of the text and of the read-only data are each aligned to 2
//! MiB, and its segments sit at 2 MiB file offsets (`-z max-page-size=0x200000`). For a
//! small kernel that padding is most of the file: zeros, and in the text `int3` (0xCC), the
//! linker's fill between text sections, which nothing executes. VMMs load an ELF kernel by
//! its program headers (linux-loader, QEMU's PVH loader), and a loadable segment's bytes past
//! its `p_filesz` up to `p_memsz` are zero by definition, so:
//!
//! - each `PT_LOAD` is cut at every run of ≥ [`MIN_ZERO_RUN`] bytes of fill (whole 4 KiB
//!   pages of zeros, or, in an executable segment, of 0xCC): a piece keeps its data as file
//!   bytes and the run after it as `p_memsz` beyond `p_filesz` — the run then loads as zeros
//!   (for a 0xCC run: never-executed padding that reads as zeros instead of `int3`);
//! - pieces are stored back to back at 4 KiB file offsets (`p_align` 4 KiB);
//! - `PT_NOTE`s (the PVH entry) point into the piece holding their bytes; section headers
//!   are dropped.
//!
//! The loaded memory is byte for byte the original's except those 0xCC runs, which are zero
//! (a unit test checks both).

use anyhow::{bail, ensure, Context, Result};

/// ELF64 file header bytes.
const EHDR: usize = 64;
/// ELF64 program header bytes.
const PHDR: usize = 56;
/// Page size: pieces start at page boundaries, in memory and in the file.
const PAGE: u64 = 4096;
/// Shortest run of fill bytes (whole pages) a segment is cut at.
pub const MIN_ZERO_RUN: u64 = 16 * PAGE;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `p_flags` bit of an executable segment.
const PF_X: u32 = 1;
/// The linker's fill between text sections (`int3`).
const TEXT_FILL: u8 = 0xcc;

/// A program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Phdr {
    fn parse(p: &[u8]) -> Phdr {
        Phdr {
            kind: u32_at(p, 0),
            flags: u32_at(p, 4),
            offset: u64_at(p, 8),
            vaddr: u64_at(p, 16),
            paddr: u64_at(p, 24),
            filesz: u64_at(p, 32),
            memsz: u64_at(p, 40),
            align: u64_at(p, 48),
        }
    }

    fn emit(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.kind.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        for (at, v) in [
            (8, self.offset),
            (16, self.vaddr),
            (24, self.paddr),
            (32, self.filesz),
            (40, self.memsz),
            (48, self.align),
        ] {
            out[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// The program headers of a little-endian ELF64 file, checked against its length.
fn phdrs(elf: &[u8]) -> Result<Vec<Phdr>> {
    ensure!(
        elf.len() >= EHDR && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "not a little-endian ELF64 file"
    );
    ensure!(
        usize::from(u16_at(elf, 0x36)) == PHDR,
        "unexpected program header size"
    );
    let phoff = usize::try_from(u64_at(elf, 0x20))?;
    let phnum = usize::from(u16_at(elf, 0x38));
    let end = phoff
        .checked_add(phnum * PHDR)
        .filter(|&e| e <= elf.len())
        .context("program headers beyond the end of the file")?;
    let v: Vec<Phdr> = elf[phoff..end]
        .chunks_exact(PHDR)
        .map(Phdr::parse)
        .collect();
    for p in &v {
        if p.offset
            .checked_add(p.filesz)
            .is_none_or(|e| e > elf.len() as u64)
        {
            bail!("a segment lies beyond the end of the file");
        }
        if p.kind == PT_LOAD && p.memsz < p.filesz {
            bail!("a segment's memory size is below its file size");
        }
    }
    Ok(v)
}

/// The pieces of segment `bytes` (its file bytes): `(start, data bytes, memory bytes)`, each
/// starting at a page, cut before every fill run of at least [`MIN_ZERO_RUN`] (zeros, or
/// with `text` also [`TEXT_FILL`]).
fn pieces(bytes: &[u8], memsz: u64, text: bool) -> Vec<(u64, u64, u64)> {
    let len = bytes.len() as u64;
    let zero_page = |at: u64| {
        let end = (at + PAGE).min(len);
        let page = &bytes[at as usize..end as usize];
        page.iter().all(|&b| b == 0) || (text && page.iter().all(|&b| b == TEXT_FILL))
    };
    let mut out = Vec::new();
    let (mut start, mut at) = (0u64, 0u64);
    while at < len {
        if !zero_page(at) {
            at += PAGE;
            continue;
        }
        let run_start = at;
        while at < len && zero_page(at) {
            at += PAGE;
        }
        let run_end = at.min(len);
        // A run at the very start stays data (a piece starts with data), and a run shorter
        // than the threshold is not worth a header.
        if run_start > start && run_end - run_start >= MIN_ZERO_RUN {
            out.push((start, run_start - start, run_end - start));
            start = run_end;
        }
    }
    if start < len || out.is_empty() {
        out.push((start, len - start, memsz - start));
    } else if let Some(last) = out.last_mut() {
        // The segment ended in a zero run: the last piece's memory reaches the segment's end.
        last.2 = memsz - last.0;
    }
    out
}

/// The packed copy of `elf` (see the module doc).
pub fn pack(elf: &[u8]) -> Result<Vec<u8>> {
    let old = phdrs(elf)?;
    // The new program headers: each PT_LOAD as its pieces; the rest as they are for now.
    let mut new: Vec<(Phdr, Option<(usize, u64)>)> = Vec::new(); // (header, source: (old index, offset in it))
    for (i, p) in old.iter().enumerate() {
        if p.kind != PT_LOAD {
            new.push((*p, None));
            continue;
        }
        ensure!(
            p.vaddr % PAGE == 0 && p.paddr % PAGE == 0,
            "a segment's address is not 4 KiB aligned"
        );
        let bytes = &elf[p.offset as usize..(p.offset + p.filesz) as usize];
        for (start, data, mem) in pieces(bytes, p.memsz, p.flags & PF_X != 0) {
            let piece = Phdr {
                offset: 0,
                vaddr: p.vaddr + start,
                paddr: p.paddr + start,
                filesz: data,
                memsz: mem,
                align: PAGE,
                ..*p
            };
            new.push((piece, Some((i, start))));
        }
    }
    let phnum = u16::try_from(new.len()).context("too many program headers")?;
    let mut out = vec![0u8; EHDR + new.len() * PHDR];
    out[..EHDR].copy_from_slice(&elf[..EHDR]);
    out[0x20..0x28].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    out[0x28..0x30].fill(0); // e_shoff
    out[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    out[0x3a..0x40].fill(0); // e_shentsize, e_shnum, e_shstrndx
    for (p, src) in new.iter_mut() {
        if let Some((i, start)) = *src {
            let at = (out.len() as u64).next_multiple_of(PAGE);
            out.resize(at as usize, 0);
            let from = (old[i].offset + start) as usize;
            out.extend_from_slice(&elf[from..from + p.filesz as usize]);
            p.offset = at;
        }
    }
    // Notes and other headers with file bytes: into the piece that holds them.
    let loads: Vec<(Phdr, u64)> = new
        .iter()
        .filter_map(|(p, src)| src.map(|(i, start)| (*p, old[i].offset + start)))
        .collect();
    for (p, src) in new.iter_mut() {
        if src.is_some() || p.filesz == 0 {
            continue;
        }
        let holder = loads
            .iter()
            .find(|(l, from)| p.offset >= *from && p.offset + p.filesz <= from + l.filesz);
        p.offset = match holder {
            Some((l, from)) => l.offset + (p.offset - from),
            None if p.kind == PT_NOTE => {
                let at = out.len() as u64;
                out.extend_from_slice(&elf[p.offset as usize..(p.offset + p.filesz) as usize]);
                at
            }
            None => bail!("a program header has file bytes outside every segment"),
        };
    }
    for (k, (p, _)) in new.iter().enumerate() {
        p.emit(&mut out[EHDR + k * PHDR..EHDR + (k + 1) * PHDR]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The memory an ELF's PT_LOADs describe: physical address → byte, zeros included.
    fn image(elf: &[u8]) -> BTreeMap<u64, u8> {
        let mut m = BTreeMap::new();
        for p in phdrs(elf).unwrap().iter().filter(|p| p.kind == PT_LOAD) {
            for k in 0..p.memsz {
                let b = if k < p.filesz {
                    elf[(p.offset + k) as usize]
                } else {
                    0
                };
                assert!(m.insert(p.paddr + k, b).is_none(), "segments overlap");
            }
        }
        m
    }

    /// An ELF64 shaped like vmlinux: a text segment with a 2 MiB zero gap in the middle and
    /// a short zero run, a data segment ending in zeros with a bss, 2 MiB file offsets, a
    /// note inside the text and section headers at the end.
    fn sample() -> Vec<u8> {
        let mut f = vec![0u8; 0x80_0000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[0x18..0x20].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        f[0x28..0x30].copy_from_slice(&0x7f_0000u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        let headers = [
            (PT_LOAD, 0x20_0000, 0x100_0000, 0x30_1800, 0x30_1800),
            (PT_LOAD, 0x60_0000, 0x140_0000, 0x2_0000, 0x3_0000),
            (PT_NOTE, 0x20_1000, 0x100_1000, 0x20, 0x20),
        ];
        for (i, (kind, off, addr, filesz, memsz)) in headers.into_iter().enumerate() {
            Phdr {
                kind,
                flags: 5,
                offset: off,
                vaddr: addr + 0xffff_ffff_8000_0000,
                paddr: addr,
                filesz,
                memsz,
                align: 0x20_0000,
            }
            .emit(&mut f[0x40 + i * 56..0x40 + (i + 1) * 56]);
        }
        let fill = |f: &mut Vec<u8>, from: usize, to: usize, seed: usize| {
            for (k, b) in f[from..to].iter_mut().enumerate() {
                *b = ((k + seed) % 251) as u8 | 1;
            }
        };
        fill(&mut f, 0x20_0000, 0x20_3000, 1); // text, note inside
        fill(&mut f, 0x20_5000, 0x20_6000, 2); // after a short (2-page) zero run
        f[0x20_6000..0x21_6000].fill(TEXT_FILL); // int3 padding: 64 KiB, in the 2 MiB gap
        fill(&mut f, 0x40_6000, 0x50_1800, 3); // after the gap
        fill(&mut f, 0x60_0000, 0x60_8000, 4); // data, then 96 KiB of zeros, then bss
        f
    }

    #[test]
    fn packs_to_the_same_memory_image() {
        let elf = sample();
        let packed = pack(&elf).unwrap();
        assert!(
            packed.len() < 0x12_0000,
            "the zero gaps are gone: {:#x}",
            packed.len()
        );
        let (want, got) = (image(&elf), image(&packed));
        assert_eq!(want.len(), got.len());
        for (addr, b) in &want {
            let in_int3_run = (0x100_6000..0x101_6000).contains(addr);
            let expect = if in_int3_run { 0 } else { *b };
            assert_eq!(got[addr], expect, "byte at {addr:#x}");
        }
        let new = phdrs(&packed).unwrap();
        let loads: Vec<&Phdr> = new.iter().filter(|p| p.kind == PT_LOAD).collect();
        assert_eq!(
            loads.len(),
            3,
            "text cut once at its 2 MiB gap; data kept whole"
        );
        assert!(loads
            .iter()
            .all(|p| p.offset % PAGE == 0 && p.align == PAGE));
        assert_eq!(
            (loads[0].filesz, loads[0].memsz),
            (0x6000, 0x20_6000),
            "the short zero run stays data; the gap becomes memory"
        );
        assert_eq!((loads[2].filesz, loads[2].memsz), (0x8000, 0x3_0000));
        let note = new.iter().find(|p| p.kind == PT_NOTE).unwrap();
        assert_eq!(
            &packed[note.offset as usize..note.offset as usize + 0x20],
            &elf[0x20_1000..0x20_1020],
            "the note still points at its bytes"
        );
        assert_eq!(u64_at(&packed, 0x28), 0, "no section headers");
        assert_eq!(u64_at(&packed, 0x18), 0x100_0000, "entry kept");
        assert!(pack(&elf[..100]).is_err(), "a truncated file is refused");
    }
}
