//! Where each page an overlay rewrites gets its final bytes from: the plan for applying an
//! overlay lazily, page by page and in any order, with the same result as
//! [`Overlay::apply`](crate::overlay::Overlay::apply).
//!
//! `apply` works in passes (zero runs → base copies → chunks → overlay copies) where a later
//! pass overwrites an earlier one. A lazy applier fills each page exactly once (e.g. with
//! userfaultfd, where the first fill wins), so it needs each page's *final* source; this
//! module resolves the passes into that. Overlay copies resolve to their source page's final
//! source, so filling a chunk also fills the pages that copy from it.

use std::collections::HashMap;

use crate::overlay::{Index, Run};

/// The final source of one rewritten page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// All zeros.
    Zero,
    /// A copy of this page of the base image.
    Base(u64),
    /// Page `index` of the decompressed chunk `chunk`.
    Chunk {
        /// Chunk number.
        chunk: u32,
        /// Page number within the chunk's decompressed bytes.
        index: u32,
    },
}

/// The final source of every page an overlay rewrites; pages not listed keep the base's
/// content at the same place.
#[derive(Clone, Debug, Default)]
pub struct PageSources {
    map: HashMap<u64, Source>,
    /// Rewritten pages as sorted, merged runs.
    runs: Vec<Run>,
    /// Per chunk, the pages filled from it: (guest page, page in chunk), sorted by guest page.
    by_chunk: Vec<Vec<(u64, u32)>>,
    /// Pages filled from the base or with zeros, sorted.
    other: Vec<(u64, Source)>,
}

impl PageSources {
    /// Resolves `index` (already validated by [`Overlay::open`](crate::overlay::Overlay::open)).
    pub fn new(index: &Index) -> Self {
        let mut map: HashMap<u64, Source> = HashMap::with_capacity(
            (index.stats.zero + index.stats.base_dedup + index.stats.data + index.stats.self_dedup)
                as usize,
        );
        for r in &index.zero {
            for p in r.first..r.first + r.count {
                map.insert(p, Source::Zero);
            }
        }
        for c in &index.base_copies {
            map.insert(c.dst, Source::Base(c.src));
        }
        for (ci, c) in index.chunks.iter().enumerate() {
            let mut k = 0u32;
            for r in &c.pages {
                for p in r.first..r.first + r.count {
                    map.insert(
                        p,
                        Source::Chunk {
                            chunk: ci as u32,
                            index: k,
                        },
                    );
                    k += 1;
                }
            }
        }
        for c in &index.self_copies {
            // The source page as it is at this point of `apply`: rewritten, or the base's.
            let src = map.get(&c.src).copied().unwrap_or(Source::Base(c.src));
            map.insert(c.dst, src);
        }
        let mut pages: Vec<u64> = map.keys().copied().collect();
        pages.sort_unstable();
        let mut runs: Vec<Run> = Vec::new();
        let mut by_chunk = vec![Vec::new(); index.chunks.len()];
        let mut other = Vec::new();
        for &p in &pages {
            match runs.last_mut() {
                Some(r) if r.first + r.count == p => r.count += 1,
                _ => runs.push(Run { first: p, count: 1 }),
            }
            match map[&p] {
                Source::Chunk { chunk, index } => by_chunk[chunk as usize].push((p, index)),
                s => other.push((p, s)),
            }
        }
        PageSources {
            map,
            runs,
            by_chunk,
            other,
        }
    }

    /// The final source of guest page `page`; `None` when the overlay leaves it as the base's.
    pub fn get(&self, page: u64) -> Option<Source> {
        self.map.get(&page).copied()
    }

    /// Every rewritten page, as sorted non-adjacent runs.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The pages filled from chunk `chunk`: (guest page, page within the chunk), sorted.
    pub fn chunk_pages(&self, chunk: usize) -> &[(u64, u32)] {
        self.by_chunk.get(chunk).map_or(&[], |v| v.as_slice())
    }

    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.by_chunk.len()
    }

    /// The pages filled with zeros or from the base, sorted by guest page.
    pub fn other_pages(&self) -> &[(u64, Source)] {
        &self.other
    }

    /// Number of rewritten pages.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the overlay rewrites no page.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
