//! Reading an overlay: [`Overlay::open`] (or [`Overlay::from_bytes`]) checks header and
//! index, [`Overlay::verify_chunks`] (or a shared [`ChunkChecks`] pass) checks every chunk's
//! checksum, [`Overlay::apply`] writes the customised RAM into a [`PageSink`],
//! [`Overlay::disk_blocks`] decodes the disk δ.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::{Chunk, Header, HeaderRepr, Index, Malformed, OverlayError, CHECK_CRC, HEADER_LEN};
use crate::mapped::Mapped;
use crate::PAGE_SIZE;

/// Where an overlay is applied: the guest memory of the VM being synthesised. Page numbers
/// are guest-RAM page indexes (RAM regions back to back, as in the memory image).
pub trait PageSink: Sync {
    /// Writes whole pages from `first`.
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), SinkError>;
    /// Zeroes `count` pages from `first`.
    fn zero_pages(&self, first: u64, count: u64) -> Result<(), SinkError>;
    /// Copies page `src` of the base image (as it is on disk) to guest page `dst`.
    fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), SinkError>;
    /// Copies guest page `src` (already written) to guest page `dst`.
    fn copy_page(&self, dst: u64, src: u64) -> Result<(), SinkError>;
    /// Hint: pages `first..first+count` will be wholly overwritten or must read as zero, so
    /// the base's content there is not needed. A sink that can then provide fresh zeroed
    /// pages cheaply returns true (the applier then skips writing zeros to them).
    fn fresh_pages(&self, _first: u64, _count: u64) -> bool {
        false
    }
}

/// Why a [`PageSink`] could not take a page.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An offset of the memory image past the end of the sink's memory.
    #[error("image offset {0:#x} is outside guest RAM")]
    OutsideMemory(u64),
    /// A page past the end of the base image.
    #[error("base page {0} is beyond the base image")]
    OutsideBase(u64),
    /// The memory refused an access.
    #[error("guest memory access at {gpa:#x} failed")]
    Access {
        /// Guest physical address.
        gpa: u64,
        /// The memory's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a chunk was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// No chunk of that number.
    #[error("no such chunk")]
    Missing,
    /// Reading it failed.
    #[error("read failed")]
    Read(#[source] std::io::Error),
    /// Its bytes do not match its checksum.
    #[error("checksum mismatch")]
    Checksum,
    /// It is not a zstd frame.
    #[error("does not decompress")]
    Decompress(#[source] std::io::Error),
    /// It decompressed to another size than its pages.
    #[error("decompressed to {got} bytes, expected {want}")]
    Size {
        /// Bytes it gave.
        got: usize,
        /// Bytes its pages take.
        want: usize,
    },
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
    /// The file, or what errors call the bytes.
    pub(super) path: PathBuf,
    pub(super) body: Body,
    base_id: [u8; 32],
    index: Index,
}

/// Where an overlay's bytes are.
#[derive(Debug)]
pub(super) enum Body {
    /// A file.
    File {
        /// The whole file, mapped: chunks are decompressed in place. Overlays are immutable
        /// once staged (the agent installs them by rename), so the mapping is stable.
        map: Mapped,
        /// The file, for checksum passes that read instead of touching the mapping.
        file: File,
    },
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

impl Body {
    /// All of the overlay's bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Body::File { map, .. } => map.bytes(),
            Body::Bytes(b) => b,
        }
    }
}

/// Checks the header (`head`: the first bytes of a `len`-byte overlay) and the index it
/// points to, read by `read_index(offset, len)`.
fn check<E: From<Malformed>>(
    len: u64,
    head: &[u8],
    read_index: impl FnOnce(u64, u64) -> Result<Vec<u8>, E>,
) -> Result<(HeaderRepr, Index), E> {
    let header = Header::new_checked(head)
        .and_then(|h| HeaderRepr::parse(&h))
        .and_then(|r| r.check_file_len(len).map(|()| r))
        .map_err(|e| E::from(e.into()))?;
    let raw = read_index(header.index_offset, header.index_len)?;
    let index = Index::parse(&raw, &header).map_err(|e| E::from(e.into()))?;
    Ok((header, index))
}

/// An error of [`check`]: refused, or the index could not be read.
enum CheckError {
    Malformed(Malformed),
    Io(std::io::Error),
}

impl From<Malformed> for CheckError {
    fn from(e: Malformed) -> Self {
        CheckError::Malformed(e)
    }
}

impl Overlay {
    /// Opens `path` and checks header, index, every page number and chunk bound. Chunk
    /// contents are checked when applied.
    pub fn open(path: &Path) -> Result<Self, OverlayError> {
        let io = |what| move |e| OverlayError::Io(what, path.to_owned(), e);
        let file = File::open(path).map_err(io("open"))?;
        let file_len = file.metadata().map_err(io("inspect"))?.len();
        let mut h = [0u8; HEADER_LEN];
        let have = file_len.min(HEADER_LEN as u64) as usize;
        file.read_exact_at(&mut h[..have], 0).map_err(io("read"))?;
        let read_index = |offset, len| {
            let mut raw = vec![0u8; len as usize];
            file.read_exact_at(&mut raw, offset)
                .map_err(CheckError::Io)?;
            Ok(raw)
        };
        let (header, index) = check(file_len, &h[..have], read_index).map_err(|e| match e {
            CheckError::Malformed(m) => OverlayError::Invalid(path.to_owned(), m),
            CheckError::Io(e) => OverlayError::Io("read", path.to_owned(), e),
        })?;
        let map = Mapped::from_file(&file, file_len as usize).map_err(io("map"))?;
        Ok(Overlay {
            path: path.to_owned(),
            body: Body::File { map, file },
            base_id: header.base_id,
            index,
        })
    }

    /// Checks `bytes` as [`Overlay::open`] checks a file; `name` is what errors call it. An
    /// overlay in memory has no verification record ([`Overlay::verified_before`] is false).
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, OverlayError> {
        let name = name.into();
        let head = &bytes[..bytes.len().min(HEADER_LEN)];
        let read_index = |offset: u64, len: u64| {
            // `check` made sure that the index ends the bytes.
            Ok(bytes[offset as usize..(offset + len) as usize].to_vec())
        };
        let (header, index) = match check::<Malformed>(bytes.len() as u64, head, read_index) {
            Ok(v) => v,
            Err(m) => return Err(OverlayError::Invalid(name, m)),
        };
        Ok(Overlay {
            path: name,
            body: Body::Bytes(bytes),
            base_id: header.base_id,
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

    /// Number of chunks, RAM and disk.
    pub fn chunk_count(&self) -> usize {
        self.index.chunks.len() + self.index.disk_chunks.len()
    }

    /// Chunk `i` of all chunks: RAM chunks first, then disk chunks (numbered on).
    fn chunk(&self, i: usize) -> Result<&Chunk, OverlayError> {
        let ram = self.index.chunks.len();
        let c = if i < ram {
            self.index.chunks.get(i)
        } else {
            self.index.disk_chunks.get(i - ram)
        };
        c.ok_or_else(|| self.chunk_err(i, ChunkError::Missing))
    }

    fn chunk_err(&self, chunk: usize, source: ChunkError) -> OverlayError {
        OverlayError::Chunk {
            path: self.path.clone(),
            chunk,
            source,
        }
    }

    /// Compares chunk `i`'s compressed bytes with its checksum.
    fn check_sum(&self, i: usize, c: &Chunk, comp: &[u8]) -> Result<(), OverlayError> {
        if CHECK_CRC && xxh3_64(comp) != c.xxh3 {
            return Err(self.chunk_err(i, ChunkError::Checksum));
        }
        Ok(())
    }

    /// The compressed bytes of chunk `i` (RAM chunks, then disk chunks), checked against its
    /// checksum.
    pub fn compressed(&self, i: usize) -> Result<&[u8], OverlayError> {
        let c = self.chunk(i)?;
        // `open` checked that every chunk lies inside the file.
        let comp = &self.body.bytes()[c.offset as usize..(c.offset + c.len) as usize];
        self.check_sum(i, c, comp)?;
        Ok(comp)
    }

    /// Checks chunk `i`'s checksum, reading it with `pread` into `buf`. Reading rather than
    /// touching the mapping keeps the process's memory-map lock free: during synthesis this
    /// runs beside VM creation, which needs that lock for writing (measured: `KVM_CREATE_VM`
    /// 0.16 ms alone, 1.15 ms beside a populate of the mapping).
    pub fn verify_chunk(&self, i: usize, buf: &mut Vec<u8>) -> Result<(), OverlayError> {
        let c = self.chunk(i)?;
        let Body::File { file, .. } = &self.body else {
            return self.compressed(i).map(|_| ());
        };
        buf.resize(c.len as usize, 0);
        file.read_exact_at(buf, c.offset)
            .map_err(|e| self.chunk_err(i, ChunkError::Read(e)))?;
        self.check_sum(i, c, buf)
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

    /// Checks and decompresses chunk `i` (RAM chunks, then disk chunks) into `out`, resized
    /// to the chunk's raw size.
    pub fn read_chunk(&self, i: usize, out: &mut Vec<u8>) -> Result<(), OverlayError> {
        let comp = self.compressed(i)?;
        out.resize(self.chunk(i)?.page_count() as usize * PAGE_SIZE, 0);
        let n = zstd::bulk::decompress_to_buffer(comp, out)
            .map_err(|e| self.chunk_err(i, ChunkError::Decompress(e)))?;
        if n != out.len() {
            let want = out.len();
            return Err(self.chunk_err(i, ChunkError::Size { got: n, want }));
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
        let s = OverlayError::Sink;
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
                    .map(|h| h.join().unwrap_or(Err(OverlayError::Panicked)))
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
