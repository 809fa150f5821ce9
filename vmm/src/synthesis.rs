//! VM synthesis: base image + application overlay → a running service VM.
//!
//! Order: base manifest and overlay checked (header, index, page numbers, chunk bounds, base
//! id, machine state) → base RAM mapped `MAP_PRIVATE` → overlay applied straight into guest
//! memory (chunks decompressed on all cores, each checked by its CRC first) → VM, vCPUs and
//! devices restored from the overlay's machine state → vCPUs started. Any failure happens
//! before a vCPU exists, and the base files are never written (private mapping).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use format::base::Manifest;
use format::mapped::Mapped;
use format::overlay::{ChunkChecks, Overlay, PageSink, SinkError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::layout;
use crate::lazy::{Filler, LazyError, LazyFill, Region};
use crate::snapshot::MachineState;
use crate::uffd::Uffd;
use format::sources::PageSources;
use format::state::{self as persist, Kind};

/// Errors while synthesising.
#[derive(Debug, thiserror::Error)]
pub enum SynthesisError {
    /// The base is unusable.
    #[error(transparent)]
    Base(#[from] format::base::BaseError),
    /// The overlay is unusable.
    #[error(transparent)]
    Overlay(#[from] format::overlay::OverlayError),
    /// The overlay's machine state is unusable.
    #[error("the overlay's machine state is unusable")]
    State(#[source] persist::StateError),
    /// Base and overlay disagree.
    #[error("overlay '{0}' does not fit base '{1}': {2}")]
    Mismatch(PathBuf, PathBuf, String),
    /// Lazy filling could not be set up.
    #[error("lazy synthesis failed: {0}")]
    Lazy(String),
    /// The base memory image cannot be mapped.
    #[error("cannot map the base memory '{0}'")]
    Map(PathBuf, #[source] std::io::Error),
}

/// Where each phase's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Reading and checking manifest, overlay header and index, and state.
    pub check: Duration,
    /// Mapping base RAM.
    pub map: Duration,
    /// Applying the overlay (decompression included); with lazy synthesis, only preparing
    /// guest memory and starting the fill.
    pub apply: Duration,
    /// Verifying every chunk's checksum (lazy synthesis; eager application checks each chunk
    /// as it applies it).
    pub verify: Duration,
    /// The overlay is applied lazily.
    pub lazy: bool,
    /// A full checksum pass over this unchanged overlay file was recorded before, so none
    /// was made up front.
    pub verified_before: bool,
    /// Chunks applied.
    pub chunks: usize,
    /// Data bytes decompressed.
    pub data_bytes: u64,
}

/// A checked base + overlay, with the decoded machine state.
pub struct Checked {
    /// The base manifest.
    pub manifest: Manifest,
    /// The overlay.
    pub overlay: Arc<Overlay>,
    /// Machine state of the customised VM.
    pub state: MachineState,
}

/// Checks `base` and `overlay` against each other without touching any VM.
pub fn check(base: &Path, overlay: &Path) -> Result<Checked, SynthesisError> {
    let manifest = Manifest::load(base)?;
    let ov = Overlay::open(overlay)?;
    ov.check_base(&manifest.id_bytes())?;
    let mismatch = |why: String| SynthesisError::Mismatch(overlay.to_owned(), base.to_owned(), why);
    let pages = manifest.mem_mib << 8;
    if ov.index().mem_pages != pages {
        return Err(mismatch(format!(
            "it describes {} pages, the base has {pages}",
            ov.index().mem_pages
        )));
    }
    if ov.index().disk_bytes != manifest.disk_bytes.unwrap_or(0) {
        return Err(mismatch(format!(
            "its disk δ is for a {}-byte disk, the base's disk has {} bytes",
            ov.index().disk_bytes,
            manifest.disk_bytes.unwrap_or(0)
        )));
    }
    let state: MachineState =
        persist::decode(Kind::Machine, &ov.index().state).map_err(SynthesisError::State)?;
    if state.mem_mib != manifest.mem_mib {
        return Err(mismatch(format!(
            "its VM state has {} MiB of RAM, the base {}",
            state.mem_mib, manifest.mem_mib
        )));
    }
    Ok(Checked {
        manifest,
        overlay: Arc::new(ov),
        state,
    })
}

use layout::image_offset_to_gpa as locate;

/// Guest memory as an overlay sink, with the base image for base-page copies.
struct GuestSink<'a> {
    mem: &'a GuestMemoryMmap,
    mem_bytes: u64,
    base: &'a [u8],
}

const PAGE: u64 = format::PAGE_SIZE as u64;

impl GuestSink<'_> {
    /// Writes `data` at image offset `off`, split where the RAM layout jumps over the gap.
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), SinkError> {
        let mut done = 0usize;
        while done < data.len() {
            let o = off + done as u64;
            let (gpa, in_range) = locate(self.mem_bytes, o).ok_or(SinkError::OutsideMemory(o))?;
            let n = (in_range as usize).min(data.len() - done);
            self.populate(gpa, n);
            self.mem
                .write_slice(&data[done..done + n], GuestAddress(gpa))
                .map_err(|e| SinkError::Access {
                    gpa,
                    source: e.into(),
                })?;
            done += n;
        }
        Ok(())
    }

    /// Faults in `len` bytes of guest memory at `gpa` for writing in one call: one
    /// `MADV_POPULATE_WRITE` instead of a copy-on-write fault per page. Best effort.
    fn populate(&self, gpa: u64, len: usize) {
        if let Ok(host) = self.mem.get_host_address(GuestAddress(gpa)) {
            // SAFETY: `host..host+len` lies in one live guest RAM mapping (the caller split the
            // range at region ends); populating pages changes no contents.
            unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
        }
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
            if crate::vstate::memory::remap_anonymous(host as usize, n).is_err() {
                return false;
            }
            off += n as u64;
        }
        true
    }
}

/// Maps the base RAM privately and applies the overlay into it.
pub fn materialise(
    base: &Path,
    checked: &Checked,
    threads: usize,
    timings: &mut Timings,
) -> Result<GuestMemoryMmap, crate::builder::BuildError> {
    let t0 = Instant::now();
    let mem = crate::snapshot::map_memory(base, checked.manifest.mem_mib)?;
    crate::snapshot::prefault_data(base, &mem, &[]);
    let base_path = base.join("memory");
    let base_ro = Mapped::open(&base_path).map_err(|e| SynthesisError::Map(base_path, e))?;
    timings.map = t0.elapsed();
    let t1 = Instant::now();
    let sink = GuestSink {
        mem: &mem,
        mem_bytes: checked.manifest.mem_mib << 20,
        base: base_ro.bytes(),
    };
    checked
        .overlay
        .apply(&sink, threads)
        .map_err(SynthesisError::from)?;
    timings.apply = t1.elapsed();
    timings.chunks = checked.overlay.index().chunks.len();
    timings.data_bytes = checked.overlay.index().stats.data * PAGE;
    Ok(mem)
}

/// Lazy synthesis in the making. The rewritten pages are already anonymous and registered
/// with userfaultfd; a helper thread checks chunks, builds the page plan, fills the first
/// chunk, and then stays on as the fault server. [`LazyPlan::start`] waits for it just
/// before the vCPUs start.
pub struct LazyPlan {
    overlay: Arc<Overlay>,
    checks: Arc<ChunkChecks>,
    /// The helper's fill, ready to serve, and its running time until then.
    ready: std::sync::mpsc::Receiver<Result<(Filler, Duration), LazyError>>,
    /// `None` once [`LazyPlan::start`] took it.
    helper: Option<std::thread::JoinHandle<()>>,
    /// Set when the helper may fill ahead (the VM exists).
    warming: Arc<AtomicBool>,
}

/// What the helper prepares: the page plan and the chunks decompressed ahead.
type Prepared = (PageSources, Vec<(usize, Vec<u8>)>);

/// Chunks decompressed ahead, while the VM is built: the guest's first touches after a
/// restore are its own kernel-side pages (stack, data), which sit at the lowest page numbers
/// and so in the first chunk; without this the first fault decompresses it (~0.4 ms) on the
/// critical path.
const WARM_CHUNKS: usize = 1;

impl LazyPlan {
    /// Maps the base RAM privately and starts checking every chunk and planning each page's
    /// source on another thread. `Ok(None)` when userfaultfd is unavailable: the caller then
    /// applies the overlay up front.
    pub fn new(
        base: &Path,
        checked: &Checked,
        timings: &mut Timings,
    ) -> Result<Option<(GuestMemoryMmap, LazyPlan)>, crate::builder::BuildError> {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                tracing::info!("{}", LazyError::Unavailable(e));
                return Ok(None);
            }
        };
        // A full checksum pass over this unchanged file was recorded before: skip it (each
        // chunk is still checked when it is decompressed).
        let trusted = checked.overlay.verified_before();
        let checks = Arc::new(if trusted {
            ChunkChecks::finished()
        } else {
            ChunkChecks::new()
        });
        timings.verified_before = trusted;
        let t1 = Instant::now();
        let mem = crate::snapshot::map_memory(base, checked.manifest.mem_mib)?;
        let base_path = base.join("memory");
        let base_ro =
            Arc::new(Mapped::open(&base_path).map_err(|e| SynthesisError::Map(base_path, e))?);
        let mut regions = Vec::new();
        let mut first_page = 0;
        for (start, size) in layout::ram_ranges(checked.manifest.mem_mib << 20) {
            let host = mem
                .get_host_address(GuestAddress(start))
                .map_err(|e| SynthesisError::Lazy(format!("guest RAM at {start:#x}: {e}")))?;
            regions.push(Region {
                first_page,
                pages: size / PAGE,
                host: host as usize,
            });
            first_page += size / PAGE;
        }
        timings.map = t1.elapsed();
        timings.lazy = true;
        timings.chunks = checked.overlay.index().chunks.len();
        timings.data_bytes = checked.overlay.index().stats.data * PAGE;
        // The rewritten pages become fresh memory the fault server fills, before the VM
        // exists (KVM then sees the final mappings).
        let runs = format::sources::rewritten_runs(checked.overlay.index());
        crate::lazy::prepare_memory(&uffd, &regions, &runs)
            .map_err(|e| SynthesisError::Lazy(e.to_string()))?;
        // The helper: the page plan, the first chunk's decompression and its share of the
        // chunk checks, beside the VM's construction; then it serves faults. Started after
        // the mapping (which populates the base's pages) and before the VM: measured both
        // ways on the 2-core PVM hosts, this order reached the first reply ~0.1 ms sooner at
        // the median. Serving faults from the same thread saves starting another.
        let (helper, overlay) = (checks.clone(), checked.overlay.clone());
        let (tx, ready) = std::sync::mpsc::sync_channel(1);
        let (base_dir, guest) = (base.to_owned(), mem.clone());
        let warming = Arc::new(AtomicBool::new(false));
        let main_ready = warming.clone();
        let helper = std::thread::Builder::new()
            .name("overlay-check".into())
            .spawn(move || {
                let t = Instant::now();
                // The base's own pages, off the main thread (the rewritten ones are the
                // fault server's: this thread's, later).
                crate::snapshot::prefault_data(&base_dir, &guest, &runs);
                drop(guest);
                let (sources, warm) = prepare(&overlay, &helper);
                match Filler::new(uffd, overlay, sources, base_ro, regions, warm) {
                    Ok(filler) => {
                        let serving = filler.handle();
                        if tx.send(Ok((filler, t.elapsed()))).is_ok() {
                            serving.warm_then_serve_faults(&main_ready);
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| SynthesisError::Lazy(format!("cannot start the chunk checker: {e}")))?;
        Ok(Some((
            mem,
            LazyPlan {
                overlay: checked.overlay.clone(),
                checks,
                ready,
                helper: Some(helper),
                warming,
            },
        )))
    }

    /// The VM and its memory slot exist: the helper may fill chunks ahead (see
    /// [`Filler::warm_then_serve_faults`]).
    pub fn vm_created(&self) {
        self.allow_warming();
    }

    fn allow_warming(&self) {
        self.warming.store(true, Ordering::Release);
        if let Some(h) = &self.helper {
            h.thread().unpark();
        }
    }

    /// Finishes the chunk checks (helping the helper thread; a damaged chunk fails here,
    /// before any vCPU runs) and starts serving faults on the rewritten pages.
    pub fn start(mut self, timings: &mut Timings) -> Result<LazyFill, SynthesisError> {
        let t = Instant::now();
        // (Already allowed once the VM exists; this covers a caller that never said so.)
        self.allow_warming();
        self.checks.work(&self.overlay);
        let helper = self.helper.take().expect("start runs once");
        let (filler, verify) = match self.ready.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let _ = helper.join();
                return Err(SynthesisError::Lazy(e.to_string()));
            }
            Err(_) => {
                let _ = helper.join();
                return Err(SynthesisError::Lazy("the chunk checker panicked".into()));
            }
        };
        // From here dropping `fill` stops the fault server and joins it.
        let fill = LazyFill::new(filler, helper);
        self.checks.result()?;
        if !timings.verified_before {
            self.overlay.record_verified();
        }
        timings.verify = verify;
        timings.apply = t.elapsed();
        Ok(fill)
    }
}

impl Drop for LazyPlan {
    /// A plan dropped before [`LazyPlan::start`] (the VM's construction failed): the helper is
    /// stopped and joined, not left serving faults for memory nobody uses.
    fn drop(&mut self) {
        self.allow_warming();
        let Some(helper) = self.helper.take() else {
            return;
        };
        match self.ready.recv() {
            // Dropping the fill stops its fault server (this thread) and joins it.
            Ok(Ok((filler, _))) => drop(LazyFill::new(filler, helper)),
            _ => {
                let _ = helper.join();
            }
        }
    }
}

/// The helper's work: the page plan, the warm chunks, its share of the chunk checks.
fn prepare(overlay: &Overlay, checks: &ChunkChecks) -> Prepared {
    let sources = PageSources::new(overlay.index());
    let ram_chunks = overlay.index().chunks.len();
    let warm = (0..WARM_CHUNKS.min(ram_chunks))
        .filter_map(|c| {
            let pages = overlay.index().chunks[c].page_count();
            let mut buf = crate::lazy::populated_buffer(pages as usize * PAGE as usize);
            overlay.read_chunk(c, &mut buf).ok().map(|()| (c, buf))
        })
        .collect();
    checks.work(overlay);
    (sources, warm)
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
