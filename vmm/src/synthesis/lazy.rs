//! Lazy synthesis: the guest runs before the overlay is applied.
//!
//! The pages an overlay rewrites are replaced by fresh anonymous memory registered with
//! userfaultfd; every other page stays the base's private file mapping (shared clean pages).
//! Two threads then fill the rewritten pages, each exactly once, from their final source
//! ([`PageSources`]): a *fault server* answers the pages the guest (or KVM, or a device)
//! touches first — decompressing the whole chunk a page lies in and filling all of it — and a
//! *prefetcher* fills everything else in file order. When every page is present the
//! userfaultfd is closed and the memory is ordinary memory again.
//!
//! Every chunk's checksum is verified before any vCPU runs, so a damaged overlay is refused
//! up front as with eager application. A chunk that passes its checksum but still fails to
//! decompress (a crafted file) stops the VM with an error before the page is ever filled:
//! the guest never runs on bytes that are not the overlay's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use format::mapped::Mapped;
use format::overlay::{ChunkChecks, Overlay, OverlayError, Run};
use format::sources::{PageSources, Source};
use format::PAGE_SIZE;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::check::Checked;
use super::uffd::{Fill, Uffd};
use crate::arch::layout;
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::memory::{self, MemoryError};

/// One guest RAM region in image-page space.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// First image page.
    pub first_page: u64,
    /// Pages in the region.
    pub pages: u64,
    /// Host address of its first page.
    pub host: usize,
}

/// Counters of a lazy fill, for `--verbose` and benchmarks.
#[derive(Debug, Default)]
pub struct LazyStats {
    /// Faults served.
    pub faults: AtomicU64,
    /// Chunks decompressed by the fault server.
    pub fault_chunks: AtomicU64,
    /// Total time spent serving faults, µs.
    pub fault_us: AtomicU64,
    /// Chunks decompressed by the prefetcher.
    pub prefetch_chunks: AtomicU64,
    /// Time from start until every page was present, µs (0 until then).
    pub complete_us: AtomicU64,
}

const CHUNK_PENDING: u8 = 0;
const CHUNK_FILLED: u8 = 2;

struct Shared {
    uffd: Uffd,
    overlay: Arc<Overlay>,
    base: Arc<Mapped>,
    sources: PageSources,
    regions: Vec<Region>,
    chunk_state: Vec<AtomicU8>,
    complete: AtomicBool,
    /// The VM is gone: stop prefetching.
    stop: AtomicBool,
    failed: Mutex<Option<Arc<FillError>>>,
    done: (Mutex<bool>, Condvar),
    exit: Mutex<Option<Arc<ExitNotifier>>>,
    stats: Arc<LazyStats>,
    started: Instant,
}

/// A running lazy fill. Dropping it stops the prefetcher and joins both threads.
pub struct LazyFill {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyFill")
            .field("pages", &self.shared.sources.len())
            .field("complete", &self.shared.complete.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why lazy filling could not start, or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// userfaultfd is missing or not permitted.
    #[error("userfaultfd is unavailable; synthesis falls back to applying the overlay up front")]
    Unavailable(#[source] std::io::Error),
    /// Mapping the base RAM failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The base memory image cannot be mapped for reading.
    #[error("cannot map the base memory '{0}'")]
    Map(PathBuf, #[source] std::io::Error),
    /// Guest RAM has no host address here.
    #[error("guest RAM at {0:#x} has no host mapping")]
    Host(u64, #[source] vm_memory::GuestMemoryError),
    /// A rewritten page lies outside guest RAM.
    #[error("page {0} is outside guest RAM")]
    OutsideRam(u64),
    /// Replacing rewritten pages by anonymous memory failed.
    #[error("anonymous remap at {0:#x} failed")]
    Remap(usize, #[source] std::io::Error),
    /// A helper thread could not be started.
    #[error("cannot start the {0}")]
    Thread(&'static str, #[source] std::io::Error),
    /// The chunk checker panicked.
    #[error("the chunk checker panicked")]
    CheckerPanicked,
    /// A chunk failed its check.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// Filling guest memory failed.
    #[error("guest memory could not be filled")]
    Fill(#[source] Arc<FillError>),
    /// Guest memory was not filled in time.
    #[error("guest memory not filled within {0:?}")]
    Timeout(Duration),
}

/// Why a page could not be filled (the VM is stopped with it).
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    /// A userfaultfd fill failed.
    #[error("userfaultfd {0} at {1:#x}")]
    Uffd(&'static str, usize, #[source] std::io::Error),
    /// A page lies outside guest RAM.
    #[error("page {0} is outside guest RAM")]
    OutsideRam(u64),
    /// A fault lies outside guest RAM.
    #[error("fault at {0:#x} outside guest RAM")]
    FaultOutsideRam(usize),
    /// A base page lies beyond the base image.
    #[error("base page {0} is beyond the base image")]
    BeyondBase(u64),
    /// A chunk page was asked for alone.
    #[error("chunk pages are filled per chunk")]
    ChunkPage,
    /// A chunk could not be read.
    #[error(transparent)]
    Chunk(#[from] OverlayError),
    /// A chunk holds fewer pages than the index says.
    #[error("chunk {0} is shorter than its index says")]
    ShortChunk(usize),
    /// Waking a faulting thread failed.
    #[error("userfaultfd wake")]
    Wake(#[source] std::io::Error),
    /// Reading fault events failed.
    #[error("reading userfaultfd events")]
    Events(#[source] std::io::Error),
}

impl Shared {
    fn host_of(&self, page: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|r| page >= r.first_page && page < r.first_page + r.pages)
            .map(|r| r.host + ((page - r.first_page) as usize) * PAGE_SIZE)
    }

    fn page_of(&self, host: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let end = r.host + r.pages as usize * PAGE_SIZE;
            (host >= r.host && host < end)
                .then(|| r.first_page + ((host - r.host) / PAGE_SIZE) as u64)
        })
    }

    /// Fills `pages` host-contiguous pages at `dst` from `src`, skipping pages already there.
    fn fill_copy(&self, dst: usize, src: *const u8, pages: usize) -> Result<(), FillError> {
        self.fill_pages(dst, pages, "copy", |off, len| {
            // SAFETY: `src` points into a decompressed chunk buffer or the base mapping, both
            // covering `pages` pages (callers slice them so); `off + len` stays inside.
            unsafe { self.uffd.copy(dst + off, src.add(off), len) }
        })
    }

    fn fill_zero(&self, dst: usize, pages: usize) -> Result<(), FillError> {
        self.fill_pages(dst, pages, "zero page", |off, len| {
            self.uffd.zero(dst + off, len)
        })
    }

    /// Fills `pages` pages from `dst` with `fill(byte offset, byte length)`, going on past
    /// pages someone else filled meanwhile.
    fn fill_pages(
        &self,
        dst: usize,
        pages: usize,
        what: &'static str,
        fill: impl Fn(usize, usize) -> std::io::Result<Fill>,
    ) -> Result<(), FillError> {
        let mut done = 0;
        while done < pages {
            let off = done * PAGE_SIZE;
            match fill(off, (pages - done) * PAGE_SIZE)
                .map_err(|e| FillError::Uffd(what, dst + off, e))?
            {
                Fill::Done => return Ok(()),
                Fill::Partial(n) => done += (n as usize).div_ceil(PAGE_SIZE),
                // Someone else filled this page: skip it.
                Fill::Exists => done += 1,
            }
        }
        Ok(())
    }

    /// Fills one page from the base or with zeros.
    fn fill_other(&self, page: u64, src: Source) -> Result<(), FillError> {
        let dst = self.host_of(page).ok_or(FillError::OutsideRam(page))?;
        match src {
            Source::Zero => self.fill_zero(dst, 1),
            Source::Base(b) => {
                let off = b as usize * PAGE_SIZE;
                let base = self.base.bytes();
                if off + PAGE_SIZE > base.len() {
                    return Err(FillError::BeyondBase(b));
                }
                self.fill_copy(dst, base[off..].as_ptr(), 1)
            }
            Source::Chunk { .. } => Err(FillError::ChunkPage),
        }
    }

    /// Decompresses chunk `c` into `buf` and fills every page taken from it.
    fn fill_chunk(&self, c: usize, buf: &mut Vec<u8>) -> Result<(), FillError> {
        if self.chunk_state[c].load(Ordering::Acquire) == CHUNK_FILLED {
            return Ok(());
        }
        self.overlay.read_chunk(c, buf)?;
        self.fill_decoded(c, buf)
    }

    /// Fills every page taken from chunk `c`, decompressed in `buf`.
    fn fill_decoded(&self, c: usize, buf: &[u8]) -> Result<(), FillError> {
        let pages = self.sources.chunk_pages(c);
        let mut i = 0;
        while i < pages.len() {
            // A run: guest pages and chunk pages both consecutive, in one host region.
            let (p0, k0) = pages[i];
            let dst = self.host_of(p0).ok_or(FillError::OutsideRam(p0))?;
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n] == (p0 + n as u64, k0 + n as u32)
                && self.host_of(p0 + n as u64) == Some(dst + n * PAGE_SIZE)
            {
                n += 1;
            }
            let src = k0 as usize * PAGE_SIZE;
            if src + n * PAGE_SIZE > buf.len() {
                return Err(FillError::ShortChunk(c));
            }
            self.fill_copy(dst, buf[src..].as_ptr(), n)?;
            i += n;
        }
        self.chunk_state[c].store(CHUNK_FILLED, Ordering::Release);
        Ok(())
    }

    /// Serves the fault at host address `addr`.
    fn serve(&self, addr: usize, buf: &mut Vec<u8>) -> Result<(), FillError> {
        let page_addr = addr & !(PAGE_SIZE - 1);
        let page = self
            .page_of(page_addr)
            .ok_or(FillError::FaultOutsideRam(addr))?;
        match self.sources.get(page) {
            Some(Source::Chunk { chunk, .. }) => {
                tracing::debug!(chunk, page, "fault served from a chunk");
                self.stats.fault_chunks.fetch_add(1, Ordering::Relaxed);
                self.fill_chunk(chunk as usize, buf)?;
            }
            Some(s) => self.fill_other(page, s)?,
            None => {}
        }
        // Whoever filled it woke the waiters; wake again in case the fill raced the fault.
        self.uffd
            .wake(page_addr, PAGE_SIZE)
            .map_err(FillError::Wake)
    }

    fn fail(&self, why: FillError) {
        let text = crate::error::message(&why);
        tracing::error!("lazy synthesis failed: {text}");
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(Arc::new(why));
        }
        if let Some(exit) = self.exit.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            exit.notify(ExitReason::Error(format!(
                "the overlay could not be applied: {text}"
            )));
        }
    }

    fn finish(&self) {
        self.stats
            .complete_us
            .store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.complete.store(true, Ordering::Release);
        let (m, cv) = &self.done;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// Fills every page not filled yet, after `delay` (a test knob: it leaves the guest's first
/// touches to the fault server). Returns early, incomplete, when the VM goes away.
fn prefetch(s: &Shared, delay: Duration) -> Result<(), FillError> {
    // Background work only: SCHED_IDLE lets the vCPU (and the event loop that feeds it)
    // take the core the moment they wake. Measured: at normal priority the prefetcher kept a
    // woken vCPU off its core for 4-6 ms, so the first reply of a 16 MiB synthesis came
    // after ~7.5 ms instead of ~4.5 ms.
    //
    // The thread starts at normal priority, and becoming SCHED_IDLE does not by itself give
    // up the core: without the yield it kept it until the next scheduler tick (up to 4 ms),
    // with the VMM's main thread runnable behind it (measured: 1 start in 10 lost ~3.5 ms).
    //
    // Its buffer is mapped before that: at idle priority a thread holding the memory-map
    // lock (mmap while growing a buffer, or just a fill) can be kept off both cores while a
    // vCPU's fault needs the same lock.
    let mut buf = chunk_buffer(s);
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only this thread's scheduling policy; the argument is a valid struct.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
    std::thread::yield_now();
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5)),
        );
    }
    for &(page, src) in s.sources.other_pages() {
        s.fill_other(page, src)?;
    }
    for c in 0..s.sources.chunks() {
        if s.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if s.chunk_state[c].load(Ordering::Acquire) != CHUNK_FILLED {
            s.stats.prefetch_chunks.fetch_add(1, Ordering::Relaxed);
            s.fill_chunk(c, &mut buf)?;
        }
    }
    Ok(())
}

/// A buffer as large as the overlay's largest chunk, its pages already mapped: a fresh buffer
/// would take a page fault per page while a faulting vCPU waits.
fn chunk_buffer(s: &Shared) -> Vec<u8> {
    let largest = s
        .overlay
        .index()
        .chunks
        .iter()
        .map(|c| c.page_count() as usize * PAGE_SIZE)
        .max()
        .unwrap_or(0);
    populated_buffer(largest)
}

fn fault_server(s: &Shared, mut buf: Vec<u8>) {
    let mut faults = Vec::new();
    loop {
        let complete = s.complete.load(Ordering::Acquire);
        faults.clear();
        if let Err(e) = s
            .uffd
            .read_faults(if complete { 0 } else { 50 }, &mut faults)
        {
            s.fail(FillError::Events(e));
            return;
        }
        for &a in &faults {
            let t = Instant::now();
            if let Err(e) = s.serve(a, &mut buf) {
                s.fail(e);
                return;
            }
            s.stats.faults.fetch_add(1, Ordering::Relaxed);
            s.stats
                .fault_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        if (complete || s.stop.load(Ordering::Relaxed)) && faults.is_empty() {
            return;
        }
        if s.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
            return;
        }
    }
}

/// Replaces the pages in `runs` (the pages an overlay rewrites) by fresh anonymous memory
/// registered with `uffd`: until filled, a touch of one of them waits for the fault server.
pub fn prepare_memory(uffd: &Uffd, regions: &[Region], runs: &[Run]) -> Result<(), LazyError> {
    for r in runs {
        let mut p = r.first;
        let end = r.first + r.count;
        while p < end {
            let reg = regions
                .iter()
                .find(|g| p >= g.first_page && p < g.first_page + g.pages)
                .ok_or(LazyError::OutsideRam(p))?;
            let n = (end.min(reg.first_page + reg.pages) - p) as usize;
            let host = reg.host + (p - reg.first_page) as usize * PAGE_SIZE;
            memory::remap_anonymous(host, n * PAGE_SIZE).map_err(|e| LazyError::Remap(host, e))?;
            uffd.register(host, n * PAGE_SIZE)
                .map_err(LazyError::Unavailable)?;
            p += n as u64;
        }
    }
    Ok(())
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
    /// A full checksum pass over this unchanged overlay file was recorded before.
    verified_before: bool,
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
    /// source on another thread; returns the guest memory, the plan and the time the mapping
    /// took. `Ok(None)` when userfaultfd is unavailable: the caller then applies the overlay
    /// up front.
    #[allow(clippy::type_complexity)]
    pub fn new(
        base: &Path,
        checked: &Checked,
    ) -> Result<Option<(GuestMemoryMmap, LazyPlan, Duration)>, LazyError> {
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
        let t1 = Instant::now();
        let image = base.join(format::base::MEMORY);
        let mem = memory::map_image(&image, checked.manifest.mem_mib)?;
        let base_ro = Arc::new(Mapped::open(&image).map_err(|e| LazyError::Map(image.clone(), e))?);
        let mut regions = Vec::new();
        let mut first_page = 0;
        for (start, size) in layout::ram_ranges(checked.manifest.mem_mib << 20) {
            let host = mem
                .get_host_address(GuestAddress(start))
                .map_err(|e| LazyError::Host(start, e))?;
            regions.push(Region {
                first_page,
                pages: size / PAGE_SIZE as u64,
                host: host as usize,
            });
            first_page += size / PAGE_SIZE as u64;
        }
        let map = t1.elapsed();
        // The rewritten pages become fresh memory the fault server fills, before the VM
        // exists (KVM then sees the final mappings).
        let runs = format::sources::rewritten_runs(checked.overlay.index());
        prepare_memory(&uffd, &regions, &runs)?;
        // The helper: the page plan, the first chunk's decompression and its share of the
        // chunk checks, beside the VM's construction; then it serves faults. Started after
        // the mapping (which populates the base's pages) and before the VM: measured both
        // ways on the 2-core PVM hosts, this order reached the first reply ~0.1 ms sooner at
        // the median. Serving faults from the same thread saves starting another.
        let (helper, overlay) = (checks.clone(), checked.overlay.clone());
        let (tx, ready) = std::sync::mpsc::sync_channel(1);
        let guest = mem.clone();
        let warming = Arc::new(AtomicBool::new(false));
        let main_ready = warming.clone();
        let helper = std::thread::Builder::new()
            .name("overlay-check".into())
            .spawn(move || {
                crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Lazy);
                let t = Instant::now();
                // The base's own pages, off the main thread (the rewritten ones are the
                // fault server's: this thread's, later).
                memory::prefault_image(&image, &guest, &runs);
                drop(guest);
                let (sources, warm) = plan_pages(&overlay, &helper);
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
            .map_err(|e| LazyError::Thread("chunk checker", e))?;
        Ok(Some((
            mem,
            LazyPlan {
                overlay: checked.overlay.clone(),
                checks,
                ready,
                helper: Some(helper),
                warming,
                verified_before: trusted,
            },
            map,
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

    /// A full checksum pass over this unchanged overlay file was recorded before, so none is
    /// made up front.
    pub fn verified_before(&self) -> bool {
        self.verified_before
    }

    /// Finishes the chunk checks (helping the helper thread; a damaged chunk fails here,
    /// before any vCPU runs) and starts serving faults on the rewritten pages. Returns the
    /// fill and the helper's running time until it was ready (its chunk checks).
    pub fn start(mut self) -> Result<(LazyFill, Duration), LazyError> {
        // (Already allowed once the VM exists; this covers a caller that never said so.)
        self.allow_warming();
        self.checks.work(&self.overlay);
        let helper = self.helper.take().expect("start runs once");
        let (filler, verify) = match self.ready.recv() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                let _ = helper.join();
                return Err(e);
            }
            Err(_) => {
                let _ = helper.join();
                return Err(LazyError::CheckerPanicked);
            }
        };
        // From here dropping `fill` stops the fault server and joins it.
        let fill = LazyFill::new(filler, helper);
        self.checks.result()?;
        if !self.verified_before {
            self.overlay.record_verified();
        }
        Ok((fill, verify))
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
fn plan_pages(overlay: &Overlay, checks: &ChunkChecks) -> Prepared {
    let sources = PageSources::new(overlay.index());
    let ram_chunks = overlay.index().chunks.len();
    let warm = (0..WARM_CHUNKS.min(ram_chunks))
        .filter_map(|c| {
            let pages = overlay.index().chunks[c].page_count();
            let mut buf = populated_buffer(pages as usize * PAGE_SIZE);
            overlay.read_chunk(c, &mut buf).ok().map(|()| (c, buf))
        })
        .collect();
    checks.work(overlay);
    (sources, warm)
}

/// Most pages [`Filler::warm_then_serve_faults`] fills ahead: the guest's first touches
/// after a restore are in its lowest pages (its own kernel-side pages, then the start of the
/// application's data); filling much beyond them only competes with the main thread for the
/// memory-map lock and delays the first fault that does come.
pub const WARM_AHEAD_PAGES: u64 = 128;

/// The fill made ready (warm chunks in place) by the thread that then serves its faults
/// ([`Filler::warm_then_serve_faults`]); [`LazyFill::new`] hands it to the machine.
pub struct Filler(Arc<Shared>);

impl Filler {
    /// The fill of memory prepared by [`prepare_memory`], with the chunks in `warm` (already
    /// decompressed) filled now.
    pub fn new(
        uffd: Uffd,
        overlay: Arc<Overlay>,
        sources: PageSources,
        base: Arc<Mapped>,
        regions: Vec<Region>,
        warm: Vec<(usize, Vec<u8>)>,
    ) -> Result<Filler, LazyError> {
        let started = Instant::now();
        let chunks = sources.chunks();
        let shared = Arc::new(Shared {
            uffd,
            overlay,
            base,
            sources,
            regions,
            chunk_state: (0..chunks).map(|_| AtomicU8::new(CHUNK_PENDING)).collect(),
            complete: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            done: (Mutex::new(false), Condvar::new()),
            exit: Mutex::new(None),
            stats: Arc::default(),
            started,
        });
        for (c, data) in &warm {
            if *c < chunks {
                shared
                    .fill_decoded(*c, data)
                    .map_err(|e| LazyError::Fill(Arc::new(e)))?;
            }
        }
        Ok(Filler(shared))
    }

    /// Another handle on the same fill (one for the machine, one for the serving thread).
    pub fn handle(&self) -> Filler {
        Filler(self.0.clone())
    }

    /// Once `go` is set (whoever sets it unparks this thread), fills whole chunks in file
    /// order (the lowest guest pages first) up to [`WARM_AHEAD_PAGES`]; then serves faults
    /// until every page is present, the fill fails or the VM goes away.
    ///
    /// `go` comes when the VM exists: the filling then overlaps the main thread's work on
    /// devices and vCPU state, and what it fills is not decompressed later on a faulting
    /// vCPU's behalf. Not before: filling guest memory while KVM creates the VM and
    /// registers its memory slot slowed those by milliseconds (both take the memory-map lock
    /// that filling takes). A vCPU that faults meanwhile waits for at most the chunk being
    /// filled.
    pub fn warm_then_serve_faults(&self, go: &AtomicBool) {
        let s = &self.0;
        let mut buf = chunk_buffer(s);
        while !go.load(Ordering::Acquire) && !s.stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let mut pages = 0u64;
        for c in 0..s.sources.chunks() {
            if s.stop.load(Ordering::Relaxed) || pages >= WARM_AHEAD_PAGES {
                break;
            }
            pages += s.sources.chunk_pages(c).len() as u64;
            if let Err(e) = s.fill_chunk(c, &mut buf) {
                s.fail(e);
                return;
            }
        }
        fault_server(s, buf);
    }
}

impl LazyFill {
    /// The running fill of `filler`, whose faults `server` serves.
    pub fn new(filler: Filler, server: JoinHandle<()>) -> LazyFill {
        LazyFill {
            shared: filler.0,
            threads: vec![server],
        }
    }

    /// Starts filling the pages nobody touched yet in the background. Called once the VM
    /// exists: on these hosts, creating a VM while another thread fills guest memory took
    /// 7–10 ms instead of 0.4 (measured).
    ///
    /// `delay` postpones it (tests use it to exercise the fault path).
    pub fn start_prefetch(&mut self, delay: Duration) -> Result<(), LazyError> {
        let s = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("uffd-prefetch".into())
            .spawn(move || {
                crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Lazy);
                match prefetch(&s, delay) {
                    Ok(()) if s.stop.load(Ordering::Relaxed) => {}
                    Ok(()) => s.finish(),
                    Err(e) => s.fail(e),
                }
            })
            .map_err(|e| LazyError::Thread("prefetcher", e))?;
        self.threads.push(t);
        Ok(())
    }

    /// Where a fatal fill error is reported (stopping the VM).
    pub fn set_exit(&self, exit: Arc<ExitNotifier>) {
        *self.shared.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit.clone());
        if let Some(why) = self.failure() {
            exit.notify(ExitReason::Error(format!(
                "the overlay could not be applied: {}",
                crate::error::message(&*why)
            )));
        }
    }

    /// Waits until every rewritten page is present (or the fill failed); returns the error.
    pub fn wait(&self, timeout: Duration) -> Result<(), LazyError> {
        self.waiter().wait(timeout)
    }

    /// A handle that waits for this fill from another thread (a handoff's).
    pub fn waiter(&self) -> FillWaiter {
        FillWaiter(self.shared.clone())
    }

    /// The fill error, if any.
    pub fn failure(&self) -> Option<Arc<FillError>> {
        self.shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters (they outlive the fill).
    pub fn stats(&self) -> Arc<LazyStats> {
        self.shared.stats.clone()
    }

    /// Pages being filled lazily.
    pub fn pages(&self) -> usize {
        self.shared.sources.len()
    }
}

/// Waits for a [`LazyFill`] from another thread (see [`LazyFill::waiter`]).
pub struct FillWaiter(Arc<Shared>);

impl std::fmt::Debug for FillWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillWaiter").finish_non_exhaustive()
    }
}

impl FillWaiter {
    /// Waits until every rewritten page is present (or the fill failed); returns the error.
    pub fn wait(&self, timeout: Duration) -> Result<(), LazyError> {
        let failure = || {
            self.0
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        let (m, cv) = &self.0.done;
        let deadline = Instant::now() + timeout;
        let mut done = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            if let Some(f) = failure() {
                return Err(LazyError::Fill(f));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LazyError::Timeout(timeout));
            }
            done = cv
                .wait_timeout(done, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An empty buffer with `capacity` bytes whose pages are already mapped
/// (`MADV_POPULATE_WRITE`): filling it costs no page fault per page (~3–10 µs each on PVM
/// hosts), which matters on the way to a synthesised VM's first instruction or reply.
pub fn populated_buffer(capacity: usize) -> Vec<u8> {
    let mut v: Vec<u8> = Vec::with_capacity(capacity);
    let start = (v.as_mut_ptr() as usize).next_multiple_of(PAGE_SIZE);
    let end = (v.as_mut_ptr() as usize + capacity) & !(PAGE_SIZE - 1);
    if end > start {
        // SAFETY: the range lies inside the vector's own allocation; populating changes no
        // contents (and the vector's are uninitialised anyway).
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }
    v
}
