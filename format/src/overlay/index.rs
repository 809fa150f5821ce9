//! The index at the end of an overlay file (postcard, CRC-64/XZ in the header): what each
//! guest page and disk block becomes, and the checks that make it safe to apply — page
//! numbers inside memory, chunk bounds inside the data area, no page written by two chunks,
//! statistics that describe the index.

use serde::{Deserialize, Serialize};

use super::{HeaderRepr, CHECK_CRC, HEADER_LEN, MAX_CHUNK_PAGES};
use crate::{CRC64, PAGE_SIZE};

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

/// The block space a chunk writes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// Guest RAM, in pages.
    Ram,
    /// The disk, of this many 4 KiB blocks.
    Disk(u64),
}

impl Space {
    fn chunk(self) -> &'static str {
        match self {
            Space::Ram => "chunk",
            Space::Disk(_) => "disk chunk",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Space::Ram => "page",
            Space::Disk(_) => "block",
        }
    }
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Space::Ram => f.write_str("guest memory"),
            Space::Disk(blocks) => write!(f, "the {blocks}-block disk"),
        }
    }
}

/// Why an index was refused.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index's bytes do not match the header's checksum.
    #[error("index checksum mismatch")]
    Checksum,
    /// Not a postcard index.
    #[error("index does not decode")]
    Decode(#[source] postcard::Error),
    /// Bytes follow the index.
    #[error("bytes after the index")]
    Trailing,
    /// A guest size of no plausible VM.
    #[error("implausible guest size of {0} pages")]
    GuestSize(u64),
    /// A disk size that is not whole blocks, or disk chunks without a disk.
    #[error("implausible disk size of {0} bytes")]
    DiskSize(u64),
    /// A zero run past the end of memory.
    #[error("zero run {first}+{count} outside guest memory")]
    ZeroRun {
        /// First page.
        first: u64,
        /// Pages.
        count: u64,
    },
    /// A page copy from or to a page past the end of memory.
    #[error("page copy {dst} ← {src} outside guest memory")]
    PageCopy {
        /// Destination page.
        dst: u64,
        /// Source page.
        src: u64,
    },
    /// A chunk outside the data area or overlapping the one before.
    #[error("{} {i} at {offset}+{len} overlaps or leaves the data area", .space.chunk())]
    ChunkBounds {
        /// Its space.
        space: Space,
        /// Chunk number within its space.
        i: usize,
        /// File offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A chunk of no or too many units.
    #[error("{} {i} holds {n} {}s (1 to {MAX_CHUNK_PAGES} allowed)", .space.chunk(), .space.unit())]
    ChunkSize {
        /// Its space.
        space: Space,
        /// Chunk number within its space.
        i: usize,
        /// Units it holds.
        n: u64,
    },
    /// A chunk writing past the end of its space.
    #[error("{} {i} writes {}s {first}+{count} outside {space}", .space.chunk(), .space.unit())]
    ChunkRange {
        /// Its space.
        space: Space,
        /// Chunk number within its space.
        i: usize,
        /// First unit.
        first: u64,
        /// Units.
        count: u64,
    },
    /// Two chunks write the same unit (chunks are applied in parallel).
    #[error("two {}s write the same {}", .0.chunk(), .0.unit())]
    ChunkOverlap(Space),
    /// A statistic that does not describe the index.
    #[error("its statistics say {said} {name}, the index holds {is}")]
    Stats {
        /// The statistic.
        name: &'static str,
        /// Its value.
        said: u64,
        /// What the index holds.
        is: u64,
    },
    /// Statistics whose kinds do not add up to the guest's pages.
    #[error("its statistics describe {described:?} pages of {pages}")]
    StatsSum {
        /// Their sum (`None`: it overflows).
        described: Option<u64>,
        /// Guest pages.
        pages: u64,
    },
}

impl Index {
    /// Checks `raw` (the index bytes the header `h` points to) against the header's checksum,
    /// decodes it and checks it ([`Index::check`]).
    pub fn parse(raw: &[u8], h: &HeaderRepr) -> Result<Index, IndexError> {
        if CHECK_CRC && CRC64.checksum(raw) != h.index_crc {
            return Err(IndexError::Checksum);
        }
        let (index, rest): (Index, _) =
            postcard::take_from_bytes(raw).map_err(IndexError::Decode)?;
        if !rest.is_empty() {
            return Err(IndexError::Trailing);
        }
        index.check(h.index_offset)?;
        Ok(index)
    }

    /// Checks page numbers, chunk bounds (inside `HEADER_LEN..index_off`) and sizes; no page
    /// is written twice by chunks, so chunks can be applied in parallel.
    pub fn check(&self, index_off: u64) -> Result<(), IndexError> {
        let pages = self.mem_pages;
        if pages == 0 || pages > (1 << 40) / PAGE_SIZE as u64 {
            return Err(IndexError::GuestSize(pages));
        }
        let in_range =
            |first: u64, count: u64| first.checked_add(count).is_some_and(|e| e <= pages);
        if let Some(r) = self.zero.iter().find(|r| !in_range(r.first, r.count)) {
            return Err(IndexError::ZeroRun {
                first: r.first,
                count: r.count,
            });
        }
        let copies = self.base_copies.iter().chain(&self.self_copies);
        if let Some(c) = copies
            .into_iter()
            .find(|c| c.dst >= pages || c.src >= pages)
        {
            return Err(IndexError::PageCopy {
                dst: c.dst,
                src: c.src,
            });
        }
        let mut end = HEADER_LEN as u64;
        check_chunks(&self.chunks, Space::Ram, pages, index_off, &mut end)?;
        let disk = self.disk_bytes;
        if disk % PAGE_SIZE as u64 != 0 || (disk == 0 && !self.disk_chunks.is_empty()) {
            return Err(IndexError::DiskSize(disk));
        }
        let blocks = disk / PAGE_SIZE as u64;
        check_chunks(
            &self.disk_chunks,
            Space::Disk(blocks),
            blocks,
            index_off,
            &mut end,
        )?;
        self.check_stats()
    }

    /// The statistics must describe the index they come with: readers show them and may size
    /// work by them, and a crafted index could say anything.
    pub fn check_stats(&self) -> Result<(), IndexError> {
        let st = &self.stats;
        let count = |runs: &mut dyn Iterator<Item = &Run>| runs.map(|r| r.count).sum::<u64>();
        let chunk_pages = count(&mut self.chunks.iter().flat_map(|c| &c.pages));
        let disk_blocks = count(&mut self.disk_chunks.iter().flat_map(|c| &c.pages));
        let expect = [
            ("pages", st.pages, self.mem_pages),
            ("data", st.data, chunk_pages),
            ("zero", st.zero, count(&mut self.zero.iter())),
            ("base_dedup", st.base_dedup, self.base_copies.len() as u64),
            ("self_dedup", st.self_dedup, self.self_copies.len() as u64),
            ("disk_blocks", st.disk_blocks, disk_blocks),
        ];
        for (name, said, is) in expect {
            if said != is {
                return Err(IndexError::Stats { name, said, is });
            }
        }
        let described = [st.same, st.zero, st.base_dedup, st.self_dedup, st.data]
            .iter()
            .try_fold(0u64, |a, &v| a.checked_add(v));
        if described != Some(self.mem_pages) {
            return Err(IndexError::StatsSum {
                described,
                pages: self.mem_pages,
            });
        }
        Ok(())
    }
}

/// Checks one space's chunks (RAM pages or disk blocks): each lies in the data area after
/// the one before (`end` moves on), holds 1 to [`MAX_CHUNK_PAGES`] units inside `0..limit`,
/// and no two write the same unit.
fn check_chunks(
    chunks: &[Chunk],
    space: Space,
    limit: u64,
    index_off: u64,
    end: &mut u64,
) -> Result<(), IndexError> {
    let mut runs: Vec<Run> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if c.offset < *end || c.offset.checked_add(c.len).is_none_or(|e| e > index_off) {
            return Err(IndexError::ChunkBounds {
                space,
                i,
                offset: c.offset,
                len: c.len,
            });
        }
        *end = c.offset + c.len;
        let n: u64 = c
            .pages
            .iter()
            .try_fold(0u64, |a, r| a.checked_add(r.count))
            .unwrap_or(u64::MAX);
        if n == 0 || n > MAX_CHUNK_PAGES {
            return Err(IndexError::ChunkSize { space, i, n });
        }
        for r in &c.pages {
            if r.first.checked_add(r.count).is_none_or(|e| e > limit) {
                return Err(IndexError::ChunkRange {
                    space,
                    i,
                    first: r.first,
                    count: r.count,
                });
            }
            runs.push(*r);
        }
    }
    runs.sort_by_key(|r| r.first);
    if runs
        .windows(2)
        .any(|w| w[0].first + w[0].count > w[1].first)
    {
        return Err(IndexError::ChunkOverlap(space));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::fixtures::{index, stats_of};

    /// An index whose statistics lie is refused (readers may size work by them).
    #[test]
    fn lying_statistics_are_refused() {
        let mut ix = index(16, vec![Run { first: 2, count: 3 }]);
        ix.stats = stats_of(&ix);
        ix.check(200).unwrap();
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
                bad.check(200)
                    .unwrap_err()
                    .to_string()
                    .contains("statistics"),
                "{:?}",
                bad.stats
            );
        }
    }

    #[test]
    fn indexes_pointing_outside_memory_are_refused() {
        let err = |ix: &Index, off| ix.check(off).unwrap_err().to_string();
        let mut ix = index(
            16,
            vec![Run {
                first: 15,
                count: 2,
            }],
        );
        assert!(err(&ix, 100).contains("outside"));
        ix.zero.clear();
        ix.base_copies.push(PageCopy { dst: 3, src: 16 });
        assert!(ix.check(100).is_err());
        ix.base_copies.clear();
        let chunk = |offset, first| Chunk {
            offset,
            len: 10,
            xxh3: 0,
            pages: vec![Run { first, count: 2 }],
        };
        let h = HEADER_LEN as u64;
        ix.chunks = vec![chunk(h, 0), chunk(h + 10, 1)];
        assert!(err(&ix, 200).contains("same page"), "{}", err(&ix, 200));
        ix.chunks = vec![chunk(h, 0), chunk(h + 5, 4)];
        assert!(err(&ix, 200).contains("overlaps"));
        ix.chunks = vec![chunk(h, 0), chunk(195, 4)];
        assert!(err(&ix, 200).contains("leaves"));
        ix.chunks = vec![chunk(h, u64::MAX - 1)];
        assert!(ix.check(200).is_err());
        ix.chunks = vec![chunk(h, 0), chunk(h + 10, 4)];
        ix.stats = stats_of(&ix);
        ix.check(200).unwrap();
        // Disk chunks: after the RAM chunks, inside the disk, not overlapping each other.
        let after = h + 20;
        ix.disk_chunks = vec![chunk(after, 0)];
        assert!(err(&ix, 200).contains("disk size"));
        ix.disk_bytes = 4 * PAGE_SIZE as u64;
        ix.stats = stats_of(&ix);
        ix.check(200).unwrap();
        ix.disk_chunks = vec![chunk(after, 3)];
        assert!(err(&ix, 200).contains("outside the 4-block disk"));
        ix.disk_chunks = vec![chunk(after, 0), chunk(after + 10, 1)];
        assert!(err(&ix, 200).contains("same block"));
        ix.disk_chunks = vec![chunk(h + 15, 0)];
        assert!(err(&ix, 200).contains("overlaps"));
        ix.disk_bytes = 100;
        ix.disk_chunks.clear();
        assert!(err(&ix, 200).contains("disk size"));
    }
}
