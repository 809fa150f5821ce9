//! An application overlay: what turns a base into a ready service VM.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "CLDOVRLY"
//! 8       2     version (u16 LE) = 2
//! 10      2     reserved, 0
//! 12      32    id of the base it applies to (SHA-256, see crate::base)
//! 44      8     index offset (u64 LE)
//! 52      8     index length (u64 LE)
//! 60      8     CRC-64/XZ of the index
//! 68      8     CRC-64/XZ of bytes 0..68
//! 76      …     chunks: each one zstd frame of whole 4 KiB pages
//! index   …     postcard [`Index`]
//! ```
//!
//! The index says, per guest page, how the customised VM's RAM differs from the base's:
//! nothing (same page at the same place — most pages), zero, a copy of another base page
//! (dedup by content against the base), data in a chunk, or a copy of a page an earlier chunk
//! wrote (dedup within the overlay). Each chunk carries its own CRC and decodes on its own, so
//! a reader can fetch and apply any chunk independently (lazy start, handoff). (Each chunk
//! carries an XXH3-64 checksum; the header and the index a CRC-64/XZ.)
//!
//! Apply order: zero runs → base copies (read from the base image, never from the VM) →
//! chunks (in parallel) → overlay copies. [`Overlay::open`] checks the header, the index and
//! every page number and chunk bound before anything is applied; [`Overlay::verify_chunks`]
//! checks every chunk's XXH3-64 checksum (a few GB/s, so a lazy start can afford it before
//! any vCPU runs), and each chunk is checked again before it is decompressed. A full pass
//! can be recorded beside the file (`<overlay>.verified`: magic "CLDVRFY1" + XXH3-64 of the
//! file's device, inode, size, mtime, ctime and header), so the next user of the unchanged
//! file skips it ([`Overlay::verified_before`]).
//!
//! The disk δ (the customised VM's copy-on-write disk layer) rides along as a second block
//! space: [`Index::disk_chunks`], chunks of whole 4 KiB disk blocks after the RAM chunks,
//! checked and decoded the same way ([`Overlay::disk_blocks`]).
//!
//! Version 2 changed the chunk checksum from CRC-64/XZ to XXH3-64 (about 10× faster here) and
//! added the disk δ.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use xxhash_rust::xxh3::xxh3_64;

use crate::mapped::Mapped;
use crate::{CRC64, PAGE_SIZE};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CLDOVRLY";
/// Format version.
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 76;
/// Most pages in one chunk (4 MiB raw).
pub const MAX_CHUNK_PAGES: u64 = 1024;
/// Checksums are compared, except in fuzzing builds (`cfg(fuzzing)`, set by cargo-fuzz),
/// where they would stop every mutation at the first check.
const CHECK_CRC: bool = !cfg!(fuzzing);

/// First bytes of a `<overlay>.verified` record ([`Overlay::record_verified`]).
const VERIFIED_MAGIC: &[u8; 8] = b"CLDVRFY1";

/// Largest index accepted (bytes).
pub const MAX_INDEX: u64 = 256 << 20;

/// Why an overlay was refused or could not be written or applied.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// File I/O failed.
    #[error("failed to {0} '{1}'")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// Not an overlay, or damaged.
    #[error("'{0}' is not a usable overlay: {1}")]
    Invalid(PathBuf, String),
    /// Built for another base.
    #[error("overlay '{path}' applies to base {wanted}, not to base {have}")]
    WrongBase {
        /// The overlay.
        path: PathBuf,
        /// Base id the overlay names.
        wanted: String,
        /// Base id offered.
        have: String,
    },
    /// A chunk is damaged.
    #[error("chunk {chunk} of overlay '{path}' is damaged: {why}")]
    Chunk {
        /// The overlay.
        path: PathBuf,
        /// Chunk number.
        chunk: usize,
        /// What is wrong.
        why: String,
    },
    /// Writing into the VM failed.
    #[error("failed to apply the overlay: {0}")]
    Sink(String),
    /// Inputs of a build disagree.
    #[error("cannot build an overlay: {0}")]
    Build(String),
}

/// `count` pages from `first`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First page number.
    pub first: u64,
    /// Number of pages.
    pub count: u64,
}

/// Page `dst` gets the contents of page `src`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCopy {
    /// Destination page.
    pub dst: u64,
    /// Source page.
    pub src: u64,
}

/// One compressed chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// File offset of the zstd frame.
    pub offset: u64,
    /// Compressed length.
    pub len: u64,
    /// XXH3-64 of the compressed bytes.
    pub xxh3: u64,
    /// Where its pages go, in order.
    pub pages: Vec<Run>,
}

impl Chunk {
    /// Pages in the chunk.
    pub fn page_count(&self) -> u64 {
        self.pages.iter().map(|r| r.count).sum()
    }
}

/// What an overlay holds, in pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Guest pages.
    pub pages: u64,
    /// Equal to the base at the same place (not stored).
    pub same: u64,
    /// Zero where the base is not (stored as runs).
    pub zero: u64,
    /// Equal to another base page (stored as references).
    pub base_dedup: u64,
    /// Equal to an earlier overlay page (stored as references).
    pub self_dedup: u64,
    /// Stored in chunks.
    pub data: u64,
    /// Compressed bytes of all chunks.
    pub compressed_bytes: u64,
    /// Disk δ blocks stored.
    pub disk_blocks: u64,
}

/// The index at the end of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Guest RAM in pages (must match the base).
    pub mem_pages: u64,
    /// Pages to zero.
    pub zero: Vec<Run>,
    /// Pages copied from other base pages.
    pub base_copies: Vec<PageCopy>,
    /// Data chunks.
    pub chunks: Vec<Chunk>,
    /// Pages copied from pages written by chunks.
    pub self_copies: Vec<PageCopy>,
    /// Size in bytes of the disk the disk δ applies to (0: no disk).
    pub disk_bytes: u64,
    /// The disk δ: 4 KiB blocks of the customised VM's disk that differ from the base disk
    /// (its copy-on-write layer), in chunks like RAM pages, after the RAM chunks.
    pub disk_chunks: Vec<Chunk>,
    /// The customised VM's machine state (a vmm state file, opaque here).
    pub state: Vec<u8>,
    /// What the overlay holds.
    pub stats: Stats,
}

/// Where an overlay is applied: the guest memory of the VM being synthesised. Page numbers
/// are guest-RAM page indexes (RAM regions back to back, as in the memory image).
pub trait PageSink: Sync {
    /// Writes whole pages from `first`.
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), String>;
    /// Zeroes `count` pages from `first`.
    fn zero_pages(&self, first: u64, count: u64) -> Result<(), String>;
    /// Copies page `src` of the base image (as it is on disk) to guest page `dst`.
    fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), String>;
    /// Copies guest page `src` (already written) to guest page `dst`.
    fn copy_page(&self, dst: u64, src: u64) -> Result<(), String>;
    /// Hint: pages `first..first+count` will be wholly overwritten or must read as zero, so
    /// the base's content there is not needed. A sink that can then provide fresh zeroed
    /// pages cheaply returns true (the applier then skips writing zeros to them).
    fn fresh_pages(&self, _first: u64, _count: u64) -> bool {
        false
    }
}

/// A checksum pass over an overlay's chunks that any number of threads share, chunk by
/// chunk: each [`ChunkChecks::work`] takes the next unchecked chunk until none is left or one
/// fails. Threads may join late (lazy synthesis checks on a helper thread while the VM is
/// built, then the starting thread helps finish).
#[derive(Debug, Default)]
pub struct ChunkChecks {
    next: std::sync::atomic::AtomicUsize,
    failed: std::sync::Mutex<Option<OverlayError>>,
}

impl ChunkChecks {
    /// A pass with every chunk still to check.
    pub fn new() -> Self {
        Self::default()
    }

    /// A pass with nothing left to check (a full pass was recorded before).
    pub fn finished() -> Self {
        ChunkChecks {
            next: Self::DONE.into(),
            failed: Default::default(),
        }
    }

    /// "Nothing left": far above any chunk count, and far enough below `usize::MAX` that the
    /// workers' increments never wrap it back to chunk 0.
    const DONE: usize = usize::MAX / 2;

    /// Checks chunks of `ov` until none is left or one fails.
    pub fn work(&self, ov: &Overlay) {
        use std::sync::atomic::Ordering;
        let mut buf = Vec::new();
        let n = ov.chunk_count();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            if let Err(e) = ov.verify_chunk(i, &mut buf) {
                self.next.store(Self::DONE, Ordering::Relaxed);
                let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert(e);
                return;
            }
        }
    }

    /// The first failure, once every worker has returned.
    pub fn result(&self) -> Result<(), OverlayError> {
        match self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A checked overlay, ready to apply.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    /// The whole file, mapped: chunks are decompressed in place. Overlays are immutable once
    /// staged (the agent installs them by rename), so the mapping is stable.
    map: Mapped,
    /// The file, for checksum passes that read instead of touching the mapping.
    file: File,
    base_id: [u8; 32],
    index: Index,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Overlay {
    /// Opens `path` and checks header, index, every page number and chunk bound. Chunk
    /// contents are checked when applied.
    pub fn open(path: &Path) -> Result<Self, OverlayError> {
        let invalid = |why: String| OverlayError::Invalid(path.to_owned(), why);
        let file = File::open(path).map_err(|e| OverlayError::Io("open", path.to_owned(), e))?;
        let file_len = file
            .metadata()
            .map_err(|e| OverlayError::Io("inspect", path.to_owned(), e))?
            .len();
        let mut h = [0u8; HEADER_LEN];
        if file_len < HEADER_LEN as u64 {
            return Err(invalid(format!("truncated ({file_len} bytes)")));
        }
        file.read_exact_at(&mut h, 0)
            .map_err(|e| OverlayError::Io("read", path.to_owned(), e))?;
        if &h[..8] != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(invalid(format!(
                "format version {version} (this build reads {VERSION})"
            )));
        }
        if CHECK_CRC && le64(&h, 68) != CRC64.checksum(&h[..68]) {
            return Err(invalid("header checksum mismatch".into()));
        }
        let base_id: [u8; 32] = h[12..44].try_into().expect("32 bytes");
        let (index_off, index_len, index_crc) = (le64(&h, 44), le64(&h, 52), le64(&h, 60));
        if index_off < HEADER_LEN as u64
            || index_len > MAX_INDEX
            || index_off.checked_add(index_len) != Some(file_len)
        {
            return Err(invalid(format!(
                "index at {index_off}+{index_len} does not end the {file_len}-byte file (truncated?)"
            )));
        }
        let mut raw = vec![0u8; index_len as usize];
        file.read_exact_at(&mut raw, index_off)
            .map_err(|e| OverlayError::Io("read", path.to_owned(), e))?;
        if CHECK_CRC && CRC64.checksum(&raw) != index_crc {
            return Err(invalid("index checksum mismatch".into()));
        }
        let (index, rest): (Index, _) = postcard::take_from_bytes(&raw)
            .map_err(|e| invalid(format!("index does not decode: {e}")))?;
        if !rest.is_empty() {
            return Err(invalid("bytes after the index".into()));
        }
        validate(&index, index_off).map_err(invalid)?;
        let map = Mapped::from_file(&file, file_len as usize)
            .map_err(|e| OverlayError::Io("map", path.to_owned(), e))?;
        Ok(Overlay {
            path: path.to_owned(),
            map,
            file,
            base_id,
            index,
        })
    }

    /// Id of the base this overlay applies to.
    pub fn base_id(&self) -> &[u8; 32] {
        &self.base_id
    }

    /// Fails unless the overlay applies to the base with id `id`.
    pub fn check_base(&self, id: &[u8; 32]) -> Result<(), OverlayError> {
        if &self.base_id != id {
            return Err(OverlayError::WrongBase {
                path: self.path.clone(),
                wanted: crate::base::hex(&self.base_id),
                have: crate::base::hex(id),
            });
        }
        Ok(())
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Chunk `i` of all chunks: RAM chunks first, then disk chunks (numbered on).
    fn chunk(&self, i: usize) -> Result<&Chunk, OverlayError> {
        let ram = self.index.chunks.len();
        let c = if i < ram {
            self.index.chunks.get(i)
        } else {
            self.index.disk_chunks.get(i - ram)
        };
        c.ok_or_else(|| self.chunk_err(i, "no such chunk".into()))
    }

    /// The compressed bytes of chunk `i` (RAM chunks, then disk chunks), checked against its
    /// checksum.
    pub fn compressed(&self, i: usize) -> Result<&[u8], OverlayError> {
        let c = self.chunk(i)?;
        // `open` checked that every chunk lies inside the file.
        let comp = &self.map.bytes()[c.offset as usize..(c.offset + c.len) as usize];
        self.check_sum(i, c, comp)?;
        Ok(comp)
    }

    /// Where the record of a full checksum pass over this file is kept: `<overlay>.verified`.
    fn verified_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".verified");
        PathBuf::from(p)
    }

    /// What identifies this file's current content for [`Overlay::record_verified`]: device,
    /// inode, size, mtime and ctime (which no caller can set back), and the header (which
    /// carries the index checksum), hashed.
    fn identity(&self) -> Option<[u8; 16]> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata().ok()?;
        let mut id = Vec::with_capacity(64 + HEADER_LEN);
        for v in [
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ctime() as u64,
            m.ctime_nsec() as u64,
        ] {
            id.extend_from_slice(&v.to_le_bytes());
        }
        id.extend_from_slice(self.map.bytes().get(..HEADER_LEN)?);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(VERIFIED_MAGIC);
        out[8..].copy_from_slice(&xxh3_64(&id).to_le_bytes());
        Some(out)
    }

    /// True when every chunk of this very file (same inode, size, times and header) passed a
    /// full checksum pass before ([`Overlay::record_verified`]). Any change to the file —
    /// a rewrite, a flipped bit written by any program — changes its ctime and voids the
    /// record. Chunks are still checked one by one when decompressed.
    pub fn verified_before(&self) -> bool {
        match (self.identity(), std::fs::read(self.verified_path())) {
            (Some(id), Ok(rec)) => rec == id,
            _ => false,
        }
    }

    /// Records that every chunk passed a full checksum pass, so later users of the unchanged
    /// file may skip it (see [`Overlay::verified_before`]). Best effort: a read-only directory
    /// just means the next user checks again.
    pub fn record_verified(&self) {
        let Some(id) = self.identity() else { return };
        let path = self.verified_path();
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        if std::fs::write(&tmp, id).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Number of chunks, RAM and disk.
    pub fn chunk_count(&self) -> usize {
        self.index.chunks.len() + self.index.disk_chunks.len()
    }

    /// Checks chunk `i`'s checksum, reading it with `pread` into `buf`. Reading rather than
    /// touching the mapping keeps the process's memory-map lock free: during synthesis this
    /// runs beside VM creation, which needs that lock for writing (measured: `KVM_CREATE_VM`
    /// 0.16 ms alone, 1.15 ms beside a populate of the mapping).
    pub fn verify_chunk(&self, i: usize, buf: &mut Vec<u8>) -> Result<(), OverlayError> {
        let c = self.chunk(i)?;
        buf.resize(c.len as usize, 0);
        self.file
            .read_exact_at(buf, c.offset)
            .map_err(|e| self.chunk_err(i, format!("read failed: {e}")))?;
        self.check_sum(i, c, buf)?;
        Ok(())
    }

    /// Checks every chunk's checksum, RAM and disk (not their decompression), with up to
    /// `threads` threads.
    pub fn verify_chunks(&self, threads: usize) -> Result<(), OverlayError> {
        let checks = ChunkChecks::new();
        let threads = threads.clamp(1, self.chunk_count().max(1));
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|| checks.work(self));
            }
            checks.work(self);
        });
        checks.result()
    }

    /// Compares chunk `i`'s compressed bytes with its checksum.
    fn check_sum(&self, i: usize, c: &Chunk, comp: &[u8]) -> Result<(), OverlayError> {
        if CHECK_CRC && xxh3_64(comp) != c.xxh3 {
            return Err(self.chunk_err(i, "checksum mismatch".into()));
        }
        Ok(())
    }

    fn chunk_err(&self, chunk: usize, why: String) -> OverlayError {
        OverlayError::Chunk {
            path: self.path.clone(),
            chunk,
            why,
        }
    }

    /// Checks and decompresses chunk `i` (RAM chunks, then disk chunks) into `out`, resized
    /// to the chunk's raw size.
    pub fn read_chunk(&self, i: usize, out: &mut Vec<u8>) -> Result<(), OverlayError> {
        let comp = self.compressed(i)?;
        out.resize(self.chunk(i)?.page_count() as usize * PAGE_SIZE, 0);
        let n = zstd::bulk::decompress_to_buffer(comp, out)
            .map_err(|e| self.chunk_err(i, format!("does not decompress: {e}")))?;
        if n != out.len() {
            return Err(self.chunk_err(
                i,
                format!("decompressed to {n} bytes, expected {}", out.len()),
            ));
        }
        Ok(())
    }

    /// The disk δ: every stored disk block, decompressed and checked, in block order.
    pub fn disk_blocks(&self) -> Result<Vec<(u64, Vec<u8>)>, OverlayError> {
        let ram = self.index.chunks.len();
        // Sized from the checked chunks, never from `stats` (a count a crafted index could
        // make anything).
        let blocks: u64 = self.index.disk_chunks.iter().map(Chunk::page_count).sum();
        let mut out = Vec::with_capacity(blocks as usize);
        let mut buf = Vec::new();
        for (k, c) in self.index.disk_chunks.iter().enumerate() {
            self.read_chunk(ram + k, &mut buf)?;
            let mut at = 0;
            for r in &c.pages {
                for b in r.first..r.first + r.count {
                    out.push((b, buf[at..at + PAGE_SIZE].to_vec()));
                    at += PAGE_SIZE;
                }
            }
        }
        out.sort_by_key(|(b, _)| *b);
        Ok(out)
    }

    /// Applies the overlay to `sink` with `threads` decompression threads.
    pub fn apply(&self, sink: &dyn PageSink, threads: usize) -> Result<(), OverlayError> {
        let s = |e: String| OverlayError::Sink(e);
        for r in &self.index.zero {
            if !sink.fresh_pages(r.first, r.count) {
                sink.zero_pages(r.first, r.count).map_err(s)?;
            }
        }
        for c in &self.index.chunks {
            for r in &c.pages {
                sink.fresh_pages(r.first, r.count);
            }
        }
        for c in &self.index.base_copies {
            sink.copy_from_base(c.dst, c.src).map_err(s)?;
        }
        let n = self.index.chunks.len();
        let threads = threads.clamp(1, n.max(1));
        let work = |t: usize| -> Result<(), OverlayError> {
            let mut buf = Vec::new();
            for i in (t..n).step_by(threads) {
                self.read_chunk(i, &mut buf)?;
                let pages = &self.index.chunks[i].pages;
                let mut off = 0;
                for r in pages {
                    let len = r.count as usize * PAGE_SIZE;
                    sink.write_pages(r.first, &buf[off..off + len]).map_err(s)?;
                    off += len;
                }
            }
            Ok(())
        };
        if threads == 1 {
            work(0)?;
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (1..threads).map(|t| scope.spawn(move || work(t))).collect();
                let first = work(0);
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(s("a decompression thread panicked".into())))
                    })
                    .chain(std::iter::once(first))
                    .collect::<Result<Vec<()>, _>>()
            })?;
        }
        for c in &self.index.self_copies {
            sink.copy_page(c.dst, c.src).map_err(s)?;
        }
        Ok(())
    }
}

/// Checks page numbers, chunk bounds and sizes; no page is written twice by chunks, so
/// chunks can be applied in parallel.
fn validate(ix: &Index, index_off: u64) -> Result<(), String> {
    let pages = ix.mem_pages;
    if pages == 0 || pages > (1 << 40) / PAGE_SIZE as u64 {
        return Err(format!("implausible guest size of {pages} pages"));
    }
    let in_range = |first: u64, count: u64| first.checked_add(count).is_some_and(|e| e <= pages);
    for r in &ix.zero {
        if !in_range(r.first, r.count) {
            return Err(format!(
                "zero run {}+{} outside guest memory",
                r.first, r.count
            ));
        }
    }
    for c in ix.base_copies.iter().chain(&ix.self_copies) {
        if c.dst >= pages || c.src >= pages {
            return Err(format!(
                "page copy {} ← {} outside guest memory",
                c.dst, c.src
            ));
        }
    }
    let mut end = HEADER_LEN as u64;
    check_chunks(
        &ix.chunks,
        "chunk",
        "pages",
        "guest memory",
        pages,
        index_off,
        &mut end,
    )?;
    if ix.disk_bytes % PAGE_SIZE as u64 != 0 || (ix.disk_bytes == 0 && !ix.disk_chunks.is_empty()) {
        return Err(format!("implausible disk size of {} bytes", ix.disk_bytes));
    }
    let disk_blocks = ix.disk_bytes / PAGE_SIZE as u64;
    check_chunks(
        &ix.disk_chunks,
        "disk chunk",
        "blocks",
        &format!("the {disk_blocks}-block disk"),
        disk_blocks,
        index_off,
        &mut end,
    )?;
    check_stats(ix)
}

/// The statistics must describe the index they come with: readers show them and may size
/// work by them, and a crafted index could say anything.
fn check_stats(ix: &Index) -> Result<(), String> {
    let st = &ix.stats;
    let count = |runs: &mut dyn Iterator<Item = &Run>| runs.map(|r| r.count).sum::<u64>();
    let chunk_pages = count(&mut ix.chunks.iter().flat_map(|c| &c.pages));
    let disk_blocks = count(&mut ix.disk_chunks.iter().flat_map(|c| &c.pages));
    let expect = [
        ("pages", st.pages, ix.mem_pages),
        ("data", st.data, chunk_pages),
        ("zero", st.zero, count(&mut ix.zero.iter())),
        ("base_dedup", st.base_dedup, ix.base_copies.len() as u64),
        ("self_dedup", st.self_dedup, ix.self_copies.len() as u64),
        ("disk_blocks", st.disk_blocks, disk_blocks),
    ];
    for (name, said, is) in expect {
        if said != is {
            return Err(format!(
                "its statistics say {said} {name}, the index holds {is}"
            ));
        }
    }
    let described = [st.same, st.zero, st.base_dedup, st.self_dedup, st.data]
        .iter()
        .try_fold(0u64, |a, &v| a.checked_add(v));
    if described != Some(ix.mem_pages) {
        return Err(format!(
            "its statistics describe {described:?} pages of {}",
            ix.mem_pages
        ));
    }
    Ok(())
}

/// Checks one space's chunks (RAM pages or disk blocks): each lies in the data area after
/// the one before (`end` moves on), holds 1 to [`MAX_CHUNK_PAGES`] units inside `0..limit`,
/// and no two write the same unit.
fn check_chunks(
    chunks: &[Chunk],
    what: &str,
    units: &str,
    space: &str,
    limit: u64,
    index_off: u64,
    end: &mut u64,
) -> Result<(), String> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if c.offset < *end || c.offset.checked_add(c.len).is_none_or(|e| e > index_off) {
            return Err(format!(
                "{what} {i} at {}+{} overlaps or leaves the data area",
                c.offset, c.len
            ));
        }
        *end = c.offset + c.len;
        let n: u64 = c
            .pages
            .iter()
            .try_fold(0u64, |a, r| a.checked_add(r.count))
            .unwrap_or(u64::MAX);
        if n == 0 || n > MAX_CHUNK_PAGES {
            return Err(format!(
                "{what} {i} holds {n} {units} (1 to {MAX_CHUNK_PAGES} allowed)"
            ));
        }
        for r in &c.pages {
            if r.first.checked_add(r.count).is_none_or(|e| e > limit) {
                return Err(format!(
                    "{what} {i} writes {units} {}+{} outside {space}",
                    r.first, r.count
                ));
            }
            runs.push(*r);
        }
    }
    runs.sort_by_key(|r| r.first);
    if runs
        .windows(2)
        .any(|w| w[0].first + w[0].count > w[1].first)
    {
        return Err(format!(
            "two {what}s write the same {}",
            &units[..units.len() - 1]
        ));
    }
    Ok(())
}

/// How an overlay is built.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    /// zstd level.
    pub level: i32,
    /// Pages per chunk (≤ [`MAX_CHUNK_PAGES`]).
    pub chunk_pages: u64,
    /// Compression threads.
    pub threads: usize,
}

/// Defaults measured on the appliance hosts (16 MiB of model data, 2 cores): zstd level 1
/// gave the smallest overlay (8.02 MiB; level 3: 8.29, 9: 8.51, 19: 8.07) and by far the
/// fastest synthesis (14.5 ms median; level 3: 25, 9: 29, 19: 17), built in 0.13 s (level
/// 19: 4.8 s). 64-page chunks keep both cores busy and make chunks small units for lazy
/// start and handoff.
impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            level: 1,
            chunk_pages: 64,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Page `i` of `m`.
fn page(m: &[u8], i: u64) -> &[u8] {
    &m[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
}

fn is_zero(p: &[u8]) -> bool {
    p.iter().all(|&b| b == 0)
}

fn push_run(runs: &mut Vec<Run>, page: u64) {
    match runs.last_mut() {
        Some(r) if r.first + r.count == page => r.count += 1,
        _ => runs.push(Run {
            first: page,
            count: 1,
        }),
    }
}

/// Writes one compressed chunk at `*offset` of `f` (the write position) and describes it.
fn append_chunk(
    f: &mut File,
    offset: &mut u64,
    bytes: &[u8],
    runs: Vec<Run>,
) -> std::io::Result<Chunk> {
    f.write_all(bytes)?;
    let c = Chunk {
        offset: *offset,
        len: bytes.len() as u64,
        xxh3: xxh3_64(bytes),
        pages: runs,
    };
    *offset += bytes.len() as u64;
    Ok(c)
}

/// The customised VM's disk δ: its copy-on-write blocks over the base disk.
#[derive(Clone, Copy, Debug)]
pub struct DiskDelta<'a> {
    /// Disk size in bytes (a multiple of 4096).
    pub disk_bytes: u64,
    /// (block number, 4096 bytes), any order.
    pub blocks: &'a [(u64, Vec<u8>)],
}

/// Splits units sorted by number into chunks of at most `max` that keep to one
/// neighbourhood: a unit more than `max` numbers past the previous one starts a new chunk.
/// A lazily started VM decompresses a whole chunk when it first touches one of its pages, so
/// a chunk should hold pages the guest is likely to touch together; in particular the
/// guest's own scattered kernel-side pages (touched first after every restore) must not
/// share a chunk with bulk application data. Sizes on disk barely change: a gap rarely falls
/// inside a full chunk.
fn neighbourhoods<T>(units: &[T], max: usize, number: impl Fn(&T) -> u64) -> Vec<&[T]> {
    let max = max.max(1);
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=units.len() {
        let split = i == units.len()
            || i - start == max
            || number(&units[i]) > number(&units[i - 1]).saturating_add(max as u64);
        if split {
            groups.push(&units[start..i]);
            start = i;
        }
    }
    groups
}

/// Builds an overlay at `out` turning RAM `base` into RAM `new` (same size, whole pages),
/// carrying `state`, for the base with id `base_id`.
pub fn build(
    base: &[u8],
    new: &[u8],
    base_id: &[u8; 32],
    state: Vec<u8>,
    disk: Option<DiskDelta<'_>>,
    out: &Path,
    opts: BuildOptions,
) -> Result<Stats, OverlayError> {
    if base.len() != new.len() || new.len() % PAGE_SIZE != 0 || new.is_empty() {
        return Err(OverlayError::Build(format!(
            "base RAM is {} bytes, customised RAM {} bytes: they must be equal whole pages",
            base.len(),
            new.len()
        )));
    }
    let chunk_pages = opts.chunk_pages.clamp(1, MAX_CHUNK_PAGES);
    let pages = (new.len() / PAGE_SIZE) as u64;
    // Content index of the base's non-zero pages (first occurrence wins).
    let mut base_by_hash: HashMap<u64, u64> = HashMap::new();
    let mut stats = Stats {
        pages,
        ..Default::default()
    };
    let mut zero = Vec::new();
    let mut base_copies = Vec::new();
    let mut self_copies = Vec::new();
    let mut data_pages: Vec<u64> = Vec::new();
    let mut self_by_hash: HashMap<u64, u64> = HashMap::new();
    let mut base_indexed = false;
    for i in 0..pages {
        let (b, n) = (page(base, i), page(new, i));
        if n == b {
            stats.same += 1;
            continue;
        }
        if is_zero(n) {
            push_run(&mut zero, i);
            stats.zero += 1;
            continue;
        }
        if !base_indexed {
            for j in 0..pages {
                let p = page(base, j);
                if !is_zero(p) {
                    base_by_hash
                        .entry(xxhash_rust::xxh3::xxh3_64(p))
                        .or_insert(j);
                }
            }
            base_indexed = true;
        }
        let h = xxhash_rust::xxh3::xxh3_64(n);
        if let Some(&j) = base_by_hash.get(&h) {
            if page(base, j) == n {
                base_copies.push(PageCopy { dst: i, src: j });
                stats.base_dedup += 1;
                continue;
            }
        }
        if let Some(&j) = self_by_hash.get(&h) {
            if page(new, j) == n {
                self_copies.push(PageCopy { dst: i, src: j });
                stats.self_dedup += 1;
                continue;
            }
        }
        self_by_hash.insert(h, i);
        data_pages.push(i);
        stats.data += 1;
    }

    // Compress chunks in parallel.
    let groups = neighbourhoods(&data_pages, chunk_pages as usize, |&p| p);
    let threads = opts.threads.clamp(1, groups.len().max(1));
    let mut compressed: Vec<Option<Result<Vec<u8>, String>>> = vec![None; groups.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let groups = &groups;
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut raw = Vec::with_capacity(chunk_pages as usize * PAGE_SIZE);
                    for (gi, g) in groups.iter().enumerate().skip(t).step_by(threads) {
                        raw.clear();
                        for &p in g.iter() {
                            raw.extend_from_slice(page(new, p));
                        }
                        out.push((
                            gi,
                            zstd::bulk::compress(&raw, opts.level).map_err(|e| e.to_string()),
                        ));
                    }
                    out
                })
            })
            .collect();
        for h in handles {
            for (gi, r) in h.join().unwrap_or_default() {
                compressed[gi] = Some(r);
            }
        }
    });

    let io = |what, e| OverlayError::Io(what, out.to_owned(), e);
    let mut f = File::create(out).map_err(|e| io("create", e))?;
    f.write_all(&[0u8; HEADER_LEN])
        .map_err(|e| io("write", e))?;
    let mut offset = HEADER_LEN as u64;
    let mut chunks = Vec::with_capacity(groups.len());
    for (g, c) in groups.iter().zip(compressed) {
        let bytes = c
            .unwrap_or_else(|| Err("compression thread failed".into()))
            .map_err(|e| OverlayError::Build(format!("zstd: {e}")))?;
        let mut runs = Vec::new();
        for &p in g.iter() {
            push_run(&mut runs, p);
        }
        chunks.push(append_chunk(&mut f, &mut offset, &bytes, runs).map_err(|e| io("write", e))?);
        stats.compressed_bytes += bytes.len() as u64;
    }
    let mut disk_chunks = Vec::new();
    let mut disk_bytes = 0;
    if let Some(d) = disk {
        if d.disk_bytes % PAGE_SIZE as u64 != 0 || d.disk_bytes == 0 {
            return Err(OverlayError::Build(format!(
                "a disk of {} bytes is not whole 4 KiB blocks",
                d.disk_bytes
            )));
        }
        disk_bytes = d.disk_bytes;
        let mut sorted: Vec<&(u64, Vec<u8>)> = d.blocks.iter().collect();
        sorted.sort_by_key(|(b, _)| *b);
        for group in neighbourhoods(&sorted, chunk_pages as usize, |(b, _)| *b) {
            let mut raw = Vec::with_capacity(group.len() * PAGE_SIZE);
            let mut runs = Vec::new();
            for (b, data) in group {
                if data.len() != PAGE_SIZE || *b >= d.disk_bytes / PAGE_SIZE as u64 {
                    return Err(OverlayError::Build(format!(
                        "disk δ block {b} is not a 4 KiB block of the disk"
                    )));
                }
                raw.extend_from_slice(data);
                push_run(&mut runs, *b);
            }
            let bytes = zstd::bulk::compress(&raw, opts.level)
                .map_err(|e| OverlayError::Build(format!("zstd: {e}")))?;
            disk_chunks
                .push(append_chunk(&mut f, &mut offset, &bytes, runs).map_err(|e| io("write", e))?);
            stats.compressed_bytes += bytes.len() as u64;
            stats.disk_blocks += group.len() as u64;
        }
    }
    let index = Index {
        mem_pages: pages,
        zero,
        base_copies,
        chunks,
        self_copies,
        disk_bytes,
        disk_chunks,
        state,
        stats,
    };
    let raw =
        postcard::to_stdvec(&index).map_err(|e| OverlayError::Build(format!("index: {e}")))?;
    f.write_all(&raw).map_err(|e| io("write", e))?;
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(base_id);
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    h.extend_from_slice(&CRC64.checksum(&raw).to_le_bytes());
    let crc = CRC64.checksum(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    f.seek(SeekFrom::Start(0)).map_err(|e| io("seek", e))?;
    f.write_all(&h).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_to_one_neighbourhood() {
        let pages = [1u64, 2, 3, 40, 41, 300, 301, 302, 303, 304, 305, 1000];
        let groups = neighbourhoods(&pages, 4, |&p| p);
        let want: Vec<&[u64]> = vec![
            &[1, 2, 3],
            &[40, 41],
            &[300, 301, 302, 303],
            &[304, 305],
            &[1000],
        ];
        assert_eq!(groups, want);
        assert!(neighbourhoods(&[] as &[u64], 4, |&p| p).is_empty());
        // Contiguous units make full chunks.
        let run: Vec<u64> = (0..10).collect();
        let sizes: Vec<usize> = neighbourhoods(&run, 4, |&p| p)
            .iter()
            .map(|g| g.len())
            .collect();
        assert_eq!(sizes, [4, 4, 2]);
    }
    use std::sync::Mutex;

    /// Guest memory in a Vec, with the base image beside it.
    struct VecSink<'a> {
        mem: Mutex<Vec<u8>>,
        base: &'a [u8],
    }

    impl PageSink for VecSink<'_> {
        fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), String> {
            let off = first as usize * PAGE_SIZE;
            self.mem.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero_pages(&self, first: u64, count: u64) -> Result<(), String> {
            let off = first as usize * PAGE_SIZE;
            self.mem.lock().unwrap()[off..off + count as usize * PAGE_SIZE].fill(0);
            Ok(())
        }
        fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), String> {
            let d = dst as usize * PAGE_SIZE;
            self.mem.lock().unwrap()[d..d + PAGE_SIZE].copy_from_slice(page(self.base, src));
            Ok(())
        }
        fn copy_page(&self, dst: u64, src: u64) -> Result<(), String> {
            let mut m = self.mem.lock().unwrap();
            let s = src as usize * PAGE_SIZE;
            m.copy_within(s..s + PAGE_SIZE, dst as usize * PAGE_SIZE);
            Ok(())
        }
    }

    const PAGES: usize = 600;

    /// A base with text-like pages, and a customised copy exercising every page kind.
    fn images() -> (Vec<u8>, Vec<u8>) {
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

    fn write(dir: &str, base: &[u8], new: &[u8]) -> (PathBuf, Stats) {
        let d = std::env::temp_dir().join(format!("ovl-{dir}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let out = d.join("app.overlay");
        let opts = BuildOptions {
            level: 3,
            chunk_pages: 64,
            threads: 2,
        };
        let stats = build(base, new, &[7; 32], b"STATE".to_vec(), None, &out, opts).unwrap();
        (out, stats)
    }

    #[test]
    fn apply_reproduces_the_customised_memory_exactly() {
        let (base, new) = images();
        let (path, stats) = write("rt", &base, &new);
        assert_eq!(stats.pages, PAGES as u64);
        assert_eq!(stats.zero, 1);
        assert_eq!(stats.base_dedup, 1);
        // 189 data pages filled with 128 distinct odd bytes: 61 or more repeats.
        assert!(stats.self_dedup >= 61, "{stats:?}");
        assert_eq!(
            stats.same + stats.zero + stats.base_dedup + stats.self_dedup + stats.data,
            stats.pages
        );
        let ov = Overlay::open(&path).unwrap();
        assert_eq!(ov.index().state, b"STATE");
        ov.check_base(&[7; 32]).unwrap();
        assert!(matches!(
            ov.check_base(&[8; 32]),
            Err(OverlayError::WrongBase { .. })
        ));
        for threads in [1, 2, 3] {
            let sink = VecSink {
                mem: Mutex::new(base.clone()),
                base: &base,
            };
            ov.apply(&sink, threads).unwrap();
            assert!(sink.mem.into_inner().unwrap() == new, "threads = {threads}");
        }
    }

    /// Filling each rewritten page once, from its final source, in reverse order (as a lazy
    /// applier might), gives the same memory as `apply`.
    #[test]
    fn page_sources_reproduce_the_customised_memory_in_any_order() {
        use crate::sources::{PageSources, Source};
        let (base, new) = images();
        let (path, stats) = write("lazy", &base, &new);
        let ov = Overlay::open(&path).unwrap();
        ov.verify_chunks(2).unwrap();
        let src = PageSources::new(ov.index());
        assert_eq!(src.len() as u64, stats.pages - stats.same);
        let mut mem = base.clone();
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        for i in 0..ov.index().chunks.len() {
            let mut b = Vec::new();
            ov.read_chunk(i, &mut b).unwrap();
            chunks.push(b);
        }
        for r in src.runs().iter().rev() {
            for p in (r.first..r.first + r.count).rev() {
                let bytes = match src.get(p).unwrap() {
                    Source::Zero => vec![0u8; PAGE_SIZE],
                    Source::Base(b) => page(&base, b).to_vec(),
                    Source::Chunk { chunk, index } => {
                        page(&chunks[chunk as usize], u64::from(index)).to_vec()
                    }
                };
                mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE].copy_from_slice(&bytes);
            }
        }
        assert!(mem == new);
        let listed: usize = (0..src.chunks())
            .map(|c| src.chunk_pages(c).len())
            .sum::<usize>()
            + src.other_pages().len();
        assert_eq!(listed, src.len());
    }

    /// Later passes of `apply` win: a page zeroed, then base-copied, then written by a chunk
    /// resolves to the chunk; an overlay copy resolves to its source's final source.
    #[test]
    fn page_sources_follow_the_apply_order() {
        use crate::sources::{PageSources, Source};
        let index = Index {
            mem_pages: 16,
            zero: vec![Run { first: 0, count: 4 }],
            base_copies: vec![PageCopy { dst: 2, src: 9 }, PageCopy { dst: 3, src: 9 }],
            chunks: vec![Chunk {
                offset: 0,
                len: 0,
                xxh3: 0,
                pages: vec![Run { first: 3, count: 2 }],
            }],
            self_copies: vec![
                PageCopy { dst: 1, src: 4 },
                PageCopy { dst: 7, src: 1 },
                PageCopy { dst: 8, src: 12 },
            ],
            disk_bytes: 0,
            disk_chunks: vec![],
            state: Vec::new(),
            stats: Stats::default(),
        };
        let s = PageSources::new(&index);
        let c = |index| Some(Source::Chunk { chunk: 0, index });
        assert_eq!(s.get(0), Some(Source::Zero));
        assert_eq!(s.get(1), c(1));
        assert_eq!(s.get(2), Some(Source::Base(9)));
        assert_eq!(s.get(3), c(0));
        assert_eq!(s.get(4), c(1));
        assert_eq!(s.get(7), c(1));
        assert_eq!(s.get(8), Some(Source::Base(12)));
        assert_eq!(s.get(5), None);
        assert_eq!(
            s.runs(),
            &[Run { first: 0, count: 5 }, Run { first: 7, count: 2 }]
        );
        assert_eq!(s.chunk_pages(0), &[(1, 1), (3, 0), (4, 1), (7, 1)]);
        // The runs (computed from the index alone) are exactly the pages with a source.
        let listed: Vec<u64> = s
            .runs()
            .iter()
            .flat_map(|r| r.first..r.first + r.count)
            .collect();
        let with_source: Vec<u64> = (0..16).filter(|&p| s.get(p).is_some()).collect();
        assert_eq!(listed, with_source);
    }

    #[test]
    fn damaged_overlays_are_refused_before_or_while_applying() {
        let (base, new) = images();
        let (path, _) = write("bad", &base, &new);
        let good = std::fs::read(&path).unwrap();
        let try_bytes = |b: &[u8]| -> Result<(), OverlayError> {
            std::fs::write(&path, b).unwrap();
            let ov = Overlay::open(&path)?;
            let sink = VecSink {
                mem: Mutex::new(base.clone()),
                base: &base,
            };
            ov.apply(&sink, 2)
        };
        // Truncations.
        for cut in [
            0,
            10,
            HEADER_LEN - 1,
            HEADER_LEN,
            good.len() / 2,
            good.len() - 1,
        ] {
            assert!(try_bytes(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A flipped bit anywhere (sampled), header, chunks and index alike.
        for at in (0..good.len())
            .step_by(97)
            .chain([8, 12, 44, 70, good.len() - 3])
        {
            let mut b = good.clone();
            b[at] ^= 0x04;
            assert!(try_bytes(&b).is_err(), "flip at {at}");
        }
        let mut v3 = good.clone();
        v3[8] = 3;
        let e = try_bytes(&v3).unwrap_err().to_string();
        assert!(e.contains("version 3"), "{e}");
        try_bytes(&good).unwrap();
    }

    /// Statistics that describe `ix` (what `build` would have written).
    fn stats_of(ix: &Index) -> Stats {
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

    /// An index whose statistics lie is refused (readers may size work by them).
    #[test]
    fn lying_statistics_are_refused() {
        let mut ix = Index {
            mem_pages: 16,
            zero: vec![Run { first: 2, count: 3 }],
            base_copies: vec![],
            chunks: vec![],
            self_copies: vec![],
            disk_bytes: 0,
            disk_chunks: vec![],
            state: vec![],
            stats: Stats::default(),
        };
        ix.stats = stats_of(&ix);
        validate(&ix, 200).unwrap();
        for lie in [
            |s: &mut Stats| s.disk_blocks = 1 << 62,
            |s: &mut Stats| s.data = u64::MAX,
            |s: &mut Stats| s.zero = 4,
            |s: &mut Stats| s.same = u64::MAX,
            |s: &mut Stats| s.pages = 17,
        ] {
            let mut bad = ix.clone();
            lie(&mut bad.stats);
            assert!(
                validate(&bad, 200).unwrap_err().contains("statistics"),
                "{:?}",
                bad.stats
            );
        }
    }

    #[test]
    fn indexes_pointing_outside_memory_are_refused() {
        let mut ix = Index {
            mem_pages: 16,
            zero: vec![Run {
                first: 15,
                count: 2,
            }],
            base_copies: vec![],
            chunks: vec![],
            self_copies: vec![],
            disk_bytes: 0,
            disk_chunks: vec![],
            state: vec![],
            stats: Stats::default(),
        };
        assert!(validate(&ix, 100).unwrap_err().contains("outside"));
        ix.zero.clear();
        ix.base_copies.push(PageCopy { dst: 3, src: 16 });
        assert!(validate(&ix, 100).is_err());
        ix.base_copies.clear();
        let chunk = |offset, first| Chunk {
            offset,
            len: 10,
            xxh3: 0,
            pages: vec![Run { first, count: 2 }],
        };
        ix.chunks = vec![
            chunk(HEADER_LEN as u64, 0),
            chunk(HEADER_LEN as u64 + 10, 1),
        ];
        assert!(
            validate(&ix, 200).unwrap_err().contains("same page"),
            "{:?}",
            validate(&ix, 200)
        );
        ix.chunks = vec![chunk(HEADER_LEN as u64, 0), chunk(HEADER_LEN as u64 + 5, 4)];
        assert!(validate(&ix, 200).unwrap_err().contains("overlaps"));
        ix.chunks = vec![chunk(HEADER_LEN as u64, 0), chunk(195, 4)];
        assert!(validate(&ix, 200).unwrap_err().contains("leaves"));
        ix.chunks = vec![chunk(HEADER_LEN as u64, u64::MAX - 1)];
        assert!(validate(&ix, 200).is_err());
        ix.chunks = vec![
            chunk(HEADER_LEN as u64, 0),
            chunk(HEADER_LEN as u64 + 10, 4),
        ];
        ix.stats = stats_of(&ix);
        validate(&ix, 200).unwrap();
        // Disk chunks: after the RAM chunks, inside the disk, not overlapping each other.
        let after = HEADER_LEN as u64 + 20;
        ix.disk_chunks = vec![chunk(after, 0)];
        assert!(validate(&ix, 200).unwrap_err().contains("disk size"));
        ix.disk_bytes = 4 * PAGE_SIZE as u64;
        ix.stats = stats_of(&ix);
        validate(&ix, 200).unwrap();
        ix.disk_chunks = vec![chunk(after, 3)];
        assert!(validate(&ix, 200)
            .unwrap_err()
            .contains("outside the 4-block disk"));
        ix.disk_chunks = vec![chunk(after, 0), chunk(after + 10, 1)];
        assert!(validate(&ix, 200).unwrap_err().contains("same block"));
        ix.disk_chunks = vec![chunk(HEADER_LEN as u64 + 15, 0)];
        assert!(validate(&ix, 200).unwrap_err().contains("overlaps"));
        ix.disk_bytes = 100;
        ix.disk_chunks.clear();
        assert!(validate(&ix, 200).unwrap_err().contains("disk size"));
    }

    /// A shared pass checks each chunk once across workers, stops at a damaged chunk, and a
    /// finished pass checks nothing however many workers join.
    #[test]
    fn shared_chunk_checks() {
        let (base, new) = images();
        let (path, _) = write("shared-checks", &base, &new);
        let mut bytes = std::fs::read(&path).unwrap();
        let ov = Overlay::open(&path).unwrap();
        let at = ov.index().chunks[1].offset as usize + 2;
        drop(ov);
        bytes[at] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let ov = Overlay::open(&path).unwrap();
        let checks = ChunkChecks::new();
        checks.work(&ov);
        checks.work(&ov);
        assert!(checks.result().is_err(), "chunk 1 is damaged");
        let done = ChunkChecks::finished();
        for _ in 0..3 {
            done.work(&ov);
        }
        assert!(done.result().is_ok(), "a finished pass checks nothing");
    }

    /// A recorded full checksum pass holds only for the unchanged file: a byte rewritten in
    /// place (same path, same size) voids it.
    #[test]
    fn verification_records_are_void_once_the_file_changes() {
        let (base, new) = images();
        let (path, _) = write("verified", &base, &new);
        let ov = Overlay::open(&path).unwrap();
        assert!(!ov.verified_before());
        ov.verify_chunks(2).unwrap();
        ov.record_verified();
        assert!(Overlay::open(&path).unwrap().verified_before());
        drop(ov);
        // Rewrite one byte of the first chunk in place.
        let at = Overlay::open(&path).unwrap().index().chunks[0].offset + 3;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, at).unwrap();
        drop(f);
        let ov = Overlay::open(&path).unwrap();
        assert!(
            !ov.verified_before(),
            "the record must not cover a changed file"
        );
        assert!(ov.verify_chunks(1).is_err());
    }

    /// The disk δ rides in the overlay and comes back block for block; damage to a disk chunk
    /// is caught by the up-front check.
    #[test]
    fn disk_delta_round_trips_and_is_checked() {
        let (base, new) = images();
        let d = std::env::temp_dir().join(format!("ovl-disk-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let out = d.join("app.overlay");
        let blocks: Vec<(u64, Vec<u8>)> = [9u64, 2, 3, 700]
            .iter()
            .map(|&b| (b, vec![b as u8 ^ 0x5a; PAGE_SIZE]))
            .collect();
        let disk = DiskDelta {
            disk_bytes: 1024 * PAGE_SIZE as u64,
            blocks: &blocks,
        };
        let opts = BuildOptions {
            level: 1,
            chunk_pages: 2,
            threads: 2,
        };
        let stats = build(&base, &new, &[7; 32], vec![], Some(disk), &out, opts).unwrap();
        assert_eq!(stats.disk_blocks, 4);
        let ov = Overlay::open(&out).unwrap();
        assert_eq!(ov.index().disk_bytes, 1024 * PAGE_SIZE as u64);
        // Blocks 2 and 3 share a chunk; 9 and 700 are too far from their neighbours.
        assert_eq!(ov.index().disk_chunks.len(), 3);
        ov.verify_chunks(2).unwrap();
        let mut want = blocks.clone();
        want.sort_by_key(|(b, _)| *b);
        assert_eq!(ov.disk_blocks().unwrap(), want);
        // Flip a byte inside the last disk chunk.
        let last = ov.index().disk_chunks.last().unwrap().clone();
        drop(ov);
        let mut bytes = std::fs::read(&out).unwrap();
        bytes[last.offset as usize + 1] ^= 1;
        std::fs::write(&out, &bytes).unwrap();
        let ov = Overlay::open(&out).unwrap();
        assert!(ov
            .verify_chunks(1)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        // A block beyond the disk is refused at build time.
        let bad = vec![(5000u64, vec![0u8; PAGE_SIZE])];
        let disk = DiskDelta {
            disk_bytes: 1024 * PAGE_SIZE as u64,
            blocks: &bad,
        };
        assert!(build(&base, &new, &[7; 32], vec![], Some(disk), &out, opts).is_err());
    }
}
