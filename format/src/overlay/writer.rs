//! Building an overlay: the pages of a customised VM's RAM sorted into same / zero / base copy
//! / overlay copy / data, data compressed into chunks on all cores, the disk δ after them,
//! then the index, then the header written last over the placeholder at offset 0.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use super::{Chunk, Header, HeaderRepr, Index, OverlayError, PageCopy, Run, Stats};
use super::{HEADER_LEN, MAX_CHUNK_PAGES};
use crate::{CRC64, PAGE_SIZE};

/// Why an overlay could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The two RAM images differ in size or are not whole pages.
    #[error(
        "base RAM is {base} bytes, customised RAM {new} bytes: they must be equal whole pages"
    )]
    Sizes {
        /// Bytes of the base RAM.
        base: usize,
        /// Bytes of the customised RAM.
        new: usize,
    },
    /// zstd failed.
    #[error("zstd failed")]
    Compress(#[source] std::io::Error),
    /// A compression thread panicked.
    #[error("compression thread failed")]
    Panicked,
    /// A disk size that is not whole blocks.
    #[error("a disk of {0} bytes is not whole 4 KiB blocks")]
    DiskSize(u64),
    /// A disk δ block that is not a block of the disk.
    #[error("disk δ block {0} is not a 4 KiB block of the disk")]
    DiskBlock(u64),
    /// The index does not encode.
    #[error("the index does not encode")]
    Index(#[source] postcard::Error),
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

/// The customised VM's disk δ: its copy-on-write blocks over the base disk.
#[derive(Clone, Copy, Debug)]
pub struct DiskDelta<'a> {
    /// Disk size in bytes (a multiple of 4096).
    pub disk_bytes: u64,
    /// (block number, 4096 bytes), any order.
    pub blocks: &'a [(u64, Vec<u8>)],
}

/// Page `i` of `m`.
pub(super) fn page(m: &[u8], i: u64) -> &[u8] {
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

/// What each page of `new` is against `base`, with the pages stored as data.
struct Sorted {
    stats: Stats,
    zero: Vec<Run>,
    base_copies: Vec<PageCopy>,
    self_copies: Vec<PageCopy>,
    data_pages: Vec<u64>,
}

fn sort_pages(base: &[u8], new: &[u8]) -> Sorted {
    let pages = (new.len() / PAGE_SIZE) as u64;
    let mut s = Sorted {
        stats: Stats {
            pages,
            ..Default::default()
        },
        zero: Vec::new(),
        base_copies: Vec::new(),
        self_copies: Vec::new(),
        data_pages: Vec::new(),
    };
    // Content index of the base's non-zero pages (first occurrence wins), built on first need.
    let mut base_by_hash: Option<HashMap<u64, u64>> = None;
    let mut self_by_hash: HashMap<u64, u64> = HashMap::new();
    for i in 0..pages {
        let (b, n) = (page(base, i), page(new, i));
        if n == b {
            s.stats.same += 1;
            continue;
        }
        if is_zero(n) {
            push_run(&mut s.zero, i);
            s.stats.zero += 1;
            continue;
        }
        let by_hash = base_by_hash.get_or_insert_with(|| {
            let mut m = HashMap::new();
            for j in (0..pages).filter(|&j| !is_zero(page(base, j))) {
                m.entry(xxh3_64(page(base, j))).or_insert(j);
            }
            m
        });
        let h = xxh3_64(n);
        if let Some(&j) = by_hash.get(&h).filter(|&&j| page(base, j) == n) {
            s.base_copies.push(PageCopy { dst: i, src: j });
            s.stats.base_dedup += 1;
            continue;
        }
        if let Some(&j) = self_by_hash.get(&h).filter(|&&j| page(new, j) == n) {
            s.self_copies.push(PageCopy { dst: i, src: j });
            s.stats.self_dedup += 1;
            continue;
        }
        self_by_hash.insert(h, i);
        s.data_pages.push(i);
        s.stats.data += 1;
    }
    s
}

/// Compresses each group of pages of `new` on up to `threads` threads.
fn compress_groups(
    new: &[u8],
    groups: &[&[u64]],
    level: i32,
    threads: usize,
) -> Result<Vec<Vec<u8>>, BuildError> {
    let threads = threads.clamp(1, groups.len().max(1));
    let mut compressed: Vec<Option<std::io::Result<Vec<u8>>>> = Vec::new();
    compressed.resize_with(groups.len(), || None);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    let mut raw = Vec::new();
                    for (gi, g) in groups.iter().enumerate().skip(t).step_by(threads) {
                        raw.clear();
                        for &p in g.iter() {
                            raw.extend_from_slice(page(new, p));
                        }
                        out.push((gi, zstd::bulk::compress(&raw, level)));
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
    compressed
        .into_iter()
        .map(|c| c.ok_or(BuildError::Panicked)?.map_err(BuildError::Compress))
        .collect()
}

/// The chunk file being written: appends compressed chunks and describes them.
struct ChunkWriter<'a> {
    f: File,
    out: &'a Path,
    /// The write position.
    offset: u64,
}

impl ChunkWriter<'_> {
    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> OverlayError + '_ {
        move |e| OverlayError::Io(what, self.out.to_owned(), e)
    }

    fn append(&mut self, bytes: &[u8], pages: Vec<Run>) -> Result<Chunk, OverlayError> {
        self.f.write_all(bytes).map_err(self.io("write"))?;
        let c = Chunk {
            offset: self.offset,
            len: bytes.len() as u64,
            xxh3: xxh3_64(bytes),
            pages,
        };
        self.offset += bytes.len() as u64;
        Ok(c)
    }
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
    let refuse = OverlayError::Build;
    if base.len() != new.len() || new.len() % PAGE_SIZE != 0 || new.is_empty() {
        return Err(refuse(BuildError::Sizes {
            base: base.len(),
            new: new.len(),
        }));
    }
    let chunk_pages = opts.chunk_pages.clamp(1, MAX_CHUNK_PAGES) as usize;
    let Sorted {
        mut stats,
        zero,
        base_copies,
        self_copies,
        data_pages,
    } = sort_pages(base, new);
    let groups = neighbourhoods(&data_pages, chunk_pages, |&p| p);
    let compressed = compress_groups(new, &groups, opts.level, opts.threads).map_err(refuse)?;

    let f = File::create(out).map_err(|e| OverlayError::Io("create", out.to_owned(), e))?;
    let mut w = ChunkWriter {
        f,
        out,
        offset: HEADER_LEN as u64,
    };
    w.f.write_all(&[0u8; HEADER_LEN]).map_err(w.io("write"))?;
    let mut chunks = Vec::with_capacity(groups.len());
    for (g, bytes) in groups.iter().zip(compressed) {
        let mut runs = Vec::new();
        for &p in g.iter() {
            push_run(&mut runs, p);
        }
        chunks.push(w.append(&bytes, runs)?);
        stats.compressed_bytes += bytes.len() as u64;
    }
    let mut disk_chunks = Vec::new();
    let mut disk_bytes = 0;
    if let Some(d) = disk {
        if d.disk_bytes % PAGE_SIZE as u64 != 0 || d.disk_bytes == 0 {
            return Err(refuse(BuildError::DiskSize(d.disk_bytes)));
        }
        disk_bytes = d.disk_bytes;
        let mut sorted: Vec<&(u64, Vec<u8>)> = d.blocks.iter().collect();
        sorted.sort_by_key(|(b, _)| *b);
        for group in neighbourhoods(&sorted, chunk_pages, |(b, _)| *b) {
            let mut raw = Vec::with_capacity(group.len() * PAGE_SIZE);
            let mut runs = Vec::new();
            for (b, data) in group {
                if data.len() != PAGE_SIZE || *b >= d.disk_bytes / PAGE_SIZE as u64 {
                    return Err(refuse(BuildError::DiskBlock(*b)));
                }
                raw.extend_from_slice(data);
                push_run(&mut runs, *b);
            }
            let bytes = zstd::bulk::compress(&raw, opts.level)
                .map_err(|e| refuse(BuildError::Compress(e)))?;
            disk_chunks.push(w.append(&bytes, runs)?);
            stats.compressed_bytes += bytes.len() as u64;
            stats.disk_blocks += group.len() as u64;
        }
    }
    let index = Index {
        mem_pages: stats.pages,
        zero,
        base_copies,
        chunks,
        self_copies,
        disk_bytes,
        disk_chunks,
        state,
        stats,
    };
    let raw = postcard::to_stdvec(&index).map_err(|e| refuse(BuildError::Index(e)))?;
    w.f.write_all(&raw).map_err(w.io("write"))?;
    let repr = HeaderRepr {
        base_id: *base_id,
        index_offset: w.offset,
        index_len: raw.len() as u64,
        index_crc: CRC64.checksum(&raw),
    };
    let mut h = Header::new_unchecked([0u8; HEADER_LEN]);
    repr.emit(&mut h);
    w.f.seek(SeekFrom::Start(0)).map_err(w.io("seek"))?;
    w.f.write_all(&h.into_inner()).map_err(w.io("write"))?;
    w.f.sync_all().map_err(w.io("sync"))?;
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
}
