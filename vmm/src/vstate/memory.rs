//! Guest RAM laid out by [`crate::arch::layout`]: anonymous, lazily populated mappings for a
//! fresh boot, or a memory image (a snapshot's or a base's) mapped `MAP_PRIVATE` for a restore
//! or a synthesis.

use std::fs::File;
use std::path::{Path, PathBuf};

use format::overlay::Run;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, MmapRegion};

use crate::arch::layout;

/// Guest RAM with a dirty bit per page for every write the VMM makes through vm-memory
/// (virtio devices, the used rings): KVM's dirty log does not see those, and a handoff must
/// send them (see the handoff's `dirty` module). Marking costs one atomic OR per page written.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Smallest guest we accept: the kernel is loaded at 1 MiB and needs room above it.
pub const MIN_MEM_MIB: u64 = 2;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below the minimum.
    #[error("guest memory of {0} MiB is too small: at least {MIN_MEM_MIB} MiB is needed")]
    TooSmall(u64),
    /// The requested size exceeds the host.
    #[error("guest memory of {requested} MiB exceeds this host's {host} MiB of RAM: choose a smaller --mem")]
    TooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// mmap failed.
    #[error("failed to map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// The memory image cannot be opened or inspected.
    #[error("failed to {0} the memory image '{1}'")]
    Image(&'static str, PathBuf, #[source] std::io::Error),
    /// The memory image's size is not the guest's.
    #[error("memory image '{path}' is {bytes} bytes, the state says {mem_mib} MiB")]
    ImageSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// Guest RAM the state describes.
        mem_mib: u64,
    },
    /// Mapping the memory image failed.
    #[error("failed to map the memory image '{0}'")]
    MapImage(PathBuf, #[source] vm_memory::mmap::MmapRegionError),
    /// The mapped regions do not form guest memory.
    #[error("the memory image '{0}' does not fit the RAM layout")]
    Layout(
        PathBuf,
        #[source] Option<vm_memory::GuestRegionCollectionError>,
    ),
}

/// Host RAM in MiB (from `sysinfo`), or `None` if it cannot be read.
pub fn host_ram_mib() -> Option<u64> {
    // SAFETY: `sysinfo` only writes into the zeroed struct we pass; all-zero is a valid value.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `sysinfo` struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some((info.totalram as u64 * u64::from(info.mem_unit)) >> 20)
}

/// Checks a requested guest size against the minimum and the host's RAM.
pub fn validate_size(mem_mib: u64) -> Result<(), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if let Some(host) = host_ram_mib() {
        if mem_mib > host {
            return Err(MemoryError::TooLarge {
                requested: mem_mib,
                host,
            });
        }
    }
    Ok(())
}

/// Creates anonymous guest memory of `mem_mib` MiB (pages are populated on first touch).
pub fn create_guest_memory(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    validate_size(mem_mib)?;
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(mem_mib, e))
}

/// Replaces `[host, host + len)` of guest RAM by fresh, zeroed anonymous private memory
/// (synthesis does so where an overlay rewrites the base's pages).
pub fn remap_anonymous(host: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: callers pass a page-aligned range of guest RAM this VMM mapped and owns, with no
    // vCPU running on it yet; MAP_FIXED replaces exactly those pages and keeps the range valid.
    let r = unsafe {
        libc::mmap(
            host as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Maps the memory image `image` (regions back to back) `MAP_PRIVATE` (copy-on-write over
/// the page cache) with the layout of `mem_mib` MiB: VMs restored from one image share its
/// clean pages, and the image is never written.
pub fn map_image(image: &Path, mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let file = File::open(image).map_err(|e| MemoryError::Image("open", image.to_owned(), e))?;
    let len = file
        .metadata()
        .map_err(|e| MemoryError::Image("inspect", image.to_owned(), e))?
        .len();
    if len != mem_mib << 20 {
        return Err(MemoryError::ImageSize {
            path: image.to_owned(),
            bytes: len,
            mem_mib,
        });
    }
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::new();
    let mut off = 0u64;
    for (start, size) in layout::ram_ranges(mem_mib << 20) {
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), off)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::MapImage(image.to_owned(), e))?;
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| MemoryError::Layout(image.to_owned(), None))?,
        );
        off += size;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MemoryError::Layout(image.to_owned(), Some(e)))
}

/// The parts of byte range `start..end` outside the page runs `skip` (sorted, not
/// overlapping). `cursor` is the first run that may still matter; calls must come in
/// ascending order of `start`.
fn outside_runs(start: u64, end: u64, skip: &[Run], cursor: &mut usize) -> Vec<(u64, u64)> {
    let page = format::PAGE_SIZE as u64;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        while skip
            .get(*cursor)
            .is_some_and(|r| (r.first + r.count) * page <= at)
        {
            *cursor += 1;
        }
        match skip.get(*cursor) {
            Some(r) if r.first * page <= at => at = ((r.first + r.count) * page).min(end),
            next => {
                let stop = next.map_or(end, |r| (r.first * page).min(end));
                out.push((at, stop));
                at = stop;
            }
        }
    }
    out
}

/// Most bytes of a memory image's data [`prefault_image`] maps up front.
const PREFAULT_MAX: u64 = 16 << 20;

/// Maps the memory image's data extents (not its holes) into the private mapping `mem` of it
/// up front, read-only and shared with the page cache, in one `MADV_POPULATE_READ` per extent:
/// the guest's first touches then skip the host page fault (measured on PVM hosts: ~10 µs per
/// first touch of an unpopulated page, ~2.4 µs of a populated one). Best effort, at most
/// `PREFAULT_MAX` (16 MiB) bytes. `skip` (sorted image-page runs) are left alone: lazy
/// synthesis has replaced them by memory its fault server fills, and populating those would
/// wait for it.
pub fn prefault_image(image: &Path, mem: &GuestMemoryMmap, skip: &[Run]) {
    use std::os::fd::AsRawFd;
    let Ok(file) = File::open(image) else {
        return;
    };
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return;
    };
    let fd = file.as_raw_fd();
    let populate = |at: u64, n: u64| {
        let Some((gpa, in_range)) = layout::image_offset_to_gpa(len, at) else {
            return;
        };
        if let Ok(host) = mem.get_host_address(GuestAddress(gpa)) {
            // SAFETY: `host..host+n` lies in one guest RAM mapping we own (`n` is within
            // the RAM range at `gpa`); populating read-only changes no contents.
            unsafe {
                libc::madvise(
                    host.cast(),
                    in_range.min(n) as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
        }
    };
    let (mut off, mut budget) = (0i64, PREFAULT_MAX);
    let mut cursor = 0;
    while (off as u64) < len && budget > 0 {
        // SAFETY: lseek on a file we own; results are checked.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole <= data {
            return;
        }
        let end = (hole as u64).min(len).min(data as u64 + budget);
        for (mut at, stop) in outside_runs(data as u64, end, skip, &mut cursor) {
            // Piecewise where the RAM layout jumps over the MMIO gap.
            while at < stop {
                let Some((_, in_range)) = layout::image_offset_to_gpa(len, at) else {
                    return;
                };
                let n = in_range.min(stop - at);
                populate(at, n);
                at += n;
            }
        }
        budget = budget.saturating_sub(end - data as u64);
        off = hole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefault_skips_the_runs_lazy_synthesis_fills() {
        let p = format::PAGE_SIZE as u64;
        let skip = [
            Run { first: 2, count: 2 },
            Run {
                first: 10,
                count: 1,
            },
        ];
        let mut cursor = 0;
        // An extent covering pages 0..6: pages 2 and 3 are left out.
        assert_eq!(
            outside_runs(0, 6 * p, &skip, &mut cursor),
            [(0, 2 * p), (4 * p, 6 * p)]
        );
        // A later extent starting inside a run, and one past every run.
        assert_eq!(
            outside_runs(10 * p + 100, 12 * p, &skip, &mut cursor),
            [(11 * p, 12 * p)]
        );
        assert_eq!(
            outside_runs(20 * p, 21 * p, &skip, &mut cursor),
            [(20 * p, 21 * p)]
        );
        // Nothing to skip: the whole extent.
        assert_eq!(outside_runs(0, 3 * p, &[], &mut 0), [(0, 3 * p)]);
    }

    #[test]
    fn rejects_tiny_and_absurd_sizes() {
        assert!(matches!(validate_size(1), Err(MemoryError::TooSmall(1))));
        assert!(matches!(
            validate_size(1 << 40),
            Err(MemoryError::TooLarge { .. })
        ));
        validate_size(64).unwrap();
    }

    #[test]
    fn creates_memory_of_the_requested_size() {
        let m = create_guest_memory(64).unwrap();
        assert_eq!(m.num_regions(), 1);
        assert_eq!(m.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
