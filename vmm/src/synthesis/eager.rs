//! Eager synthesis: the whole overlay applied into guest memory before the VM is built
//! (chunks decompressed on all cores, each checked by its CRC first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use format::mapped::Mapped;
use format::overlay::{OverlayError, PageSink, SinkError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::check::Checked;
use crate::arch::layout;
use crate::vstate::memory::{self, MemoryError};

const PAGE: u64 = format::PAGE_SIZE as u64;

/// Errors while applying an overlay up front.
#[derive(Debug, thiserror::Error)]
pub enum EagerError {
    /// Mapping the base RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The base memory image cannot be mapped for reading.
    #[error("cannot map the base memory '{0}'")]
    Map(PathBuf, #[source] std::io::Error),
    /// A chunk is damaged, or its pages do not fit.
    #[error(transparent)]
    Apply(#[from] OverlayError),
}

/// Eagerly synthesised guest memory, and where the time went.
pub struct Materialised {
    /// Guest memory holding the customised guest's RAM.
    pub memory: GuestMemoryMmap,
    /// Mapping base RAM.
    pub map: Duration,
    /// Applying the overlay.
    pub apply: Duration,
}

use layout::image_offset_to_gpa as locate;

/// Guest memory as an overlay sink, with the base image for base-page copies.
struct GuestSink<'a> {
    mem: &'a GuestMemoryMmap,
    mem_bytes: u64,
    base: &'a [u8],
}

/// Where [`write_image`] failed: image offset `off` lies outside guest RAM, or writing the
/// piece at `off` (guest address `gpa`) failed.
pub(crate) enum WriteFault {
    /// No guest RAM at this image offset.
    Outside(u64),
    /// The guest memory write failed.
    Access {
        /// Image offset of the piece.
        off: u64,
        /// Its guest address.
        gpa: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes `data` at image offset `off` of guest memory `mem` (`mem_bytes` of RAM), split
/// where the RAM layout jumps over the gap; each piece of at least `populate_from` bytes is
/// first faulted in for writing in one call: one `MADV_POPULATE_WRITE` instead of a
/// copy-on-write fault per page (best effort).
pub(crate) fn write_image(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    off: u64,
    data: &[u8],
    populate_from: usize,
) -> Result<(), WriteFault> {
    let mut done = 0usize;
    while done < data.len() {
        let o = off + done as u64;
        let (gpa, in_range) = locate(mem_bytes, o).ok_or(WriteFault::Outside(o))?;
        let n = (in_range as usize).min(data.len() - done);
        if n >= populate_from {
            if let Ok(host) = mem.get_host_address(GuestAddress(gpa)) {
                // SAFETY: `host..host+n` lies in one live guest RAM mapping (the range was split
                // at region ends); populating pages changes no contents.
                unsafe { libc::madvise(host.cast(), n, libc::MADV_POPULATE_WRITE) };
            }
        }
        mem.write_slice(&data[done..done + n], GuestAddress(gpa))
            .map_err(|source| WriteFault::Access {
                off: o,
                gpa,
                source,
            })?;
        done += n;
    }
    Ok(())
}

impl GuestSink<'_> {
    /// Writes `data` at image offset `off`, split where the RAM layout jumps over the gap.
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), SinkError> {
        write_image(self.mem, self.mem_bytes, off, data, 0).map_err(|f| match f {
            WriteFault::Outside(o) => SinkError::OutsideMemory(o),
            WriteFault::Access { gpa, source, .. } => SinkError::Access {
                gpa,
                source: source.into(),
            },
        })
    }

    fn read_page(&self, page: u64) -> Result<Vec<u8>, SinkError> {
        let mut buf = vec![0u8; PAGE as usize];
        let (gpa, _) =
            locate(self.mem_bytes, page * PAGE).ok_or(SinkError::OutsideMemory(page * PAGE))?;
        self.mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| SinkError::Access {
                gpa,
                source: e.into(),
            })?;
        Ok(buf)
    }
}

impl PageSink for GuestSink<'_> {
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), SinkError> {
        self.write_at(first * PAGE, data)
    }

    fn zero_pages(&self, first: u64, count: u64) -> Result<(), SinkError> {
        let zeros = vec![0u8; PAGE as usize];
        for p in first..first + count {
            self.write_at(p * PAGE, &zeros)?;
        }
        Ok(())
    }

    fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        let s = (src * PAGE) as usize;
        let page = self
            .base
            .get(s..s + PAGE as usize)
            .ok_or(SinkError::OutsideBase(src))?;
        self.write_at(dst * PAGE, page)
    }

    fn copy_page(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        let page = self.read_page(src)?;
        self.write_at(dst * PAGE, &page)
    }

    /// Replaces the private file mapping by fresh anonymous memory there: writing into it then
    /// costs no page-cache read and no copy-on-write copy, and zeros need no writing.
    fn fresh_pages(&self, first: u64, count: u64) -> bool {
        let mut off = first * PAGE;
        let end = (first + count) * PAGE;
        while off < end {
            let Some((gpa, in_range)) = locate(self.mem_bytes, off) else {
                return false;
            };
            let n = in_range.min(end - off) as usize;
            let Ok(host) = self.mem.get_host_address(GuestAddress(gpa)) else {
                return false;
            };
            if memory::remap_anonymous(host as usize, n).is_err() {
                return false;
            }
            off += n as u64;
        }
        true
    }
}

/// Maps the base RAM privately and applies the overlay into it (on `threads` threads).
pub fn materialise(
    base: &Path,
    checked: &Checked,
    threads: usize,
) -> Result<Materialised, EagerError> {
    let t0 = Instant::now();
    let image = base.join(format::base::MEMORY);
    let mem = memory::map_image(&image, checked.manifest.mem_mib)?;
    memory::prefault_image(&image, &mem, &[]);
    let base_ro = Mapped::open(&image).map_err(|e| EagerError::Map(image, e))?;
    let map = t0.elapsed();
    let t1 = Instant::now();
    let sink = GuestSink {
        mem: &mem,
        mem_bytes: checked.manifest.mem_mib << 20,
        base: base_ro.bytes(),
    };
    checked.overlay.apply(&sink, threads)?;
    Ok(Materialised {
        memory: mem,
        map,
        apply: t1.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_offsets_skip_the_mmio_gap() {
        let four_gib = 4u64 << 30;
        assert_eq!(
            locate(256 << 20, 0x1234),
            Some((0x1234, (256 << 20) - 0x1234))
        );
        assert_eq!(
            locate(four_gib, layout::MMIO_GAP_START - 1),
            Some((layout::MMIO_GAP_START - 1, 1))
        );
        assert_eq!(
            locate(four_gib, layout::MMIO_GAP_START),
            Some((layout::MMIO_GAP_END, four_gib - layout::MMIO_GAP_START))
        );
        assert_eq!(locate(256 << 20, 256 << 20), None);
    }
}
