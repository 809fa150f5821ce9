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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use format::mapped::Mapped;
use format::overlay::Overlay;
use format::overlay::Run;
use format::sources::{PageSources, Source};
use format::PAGE_SIZE;

use crate::exit::{ExitNotifier, ExitReason};
use crate::uffd::{Fill, Uffd};

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
    failed: Mutex<Option<String>>,
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

/// Why lazy filling could not start.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// userfaultfd is missing or not permitted.
    #[error(
        "userfaultfd is unavailable ({0}); synthesis falls back to applying the overlay up front"
    )]
    Unavailable(#[source] std::io::Error),
    /// Preparing guest memory failed.
    #[error("cannot prepare guest memory for lazy filling: {0}")]
    Memory(String),
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
    fn fill_copy(&self, dst: usize, src: *const u8, pages: usize) -> Result<(), String> {
        self.fill_pages(dst, pages, "copy", |off, len| {
            // SAFETY: `src` points into a decompressed chunk buffer or the base mapping, both
            // covering `pages` pages (callers slice them so); `off + len` stays inside.
            unsafe { self.uffd.copy(dst + off, src.add(off), len) }
        })
    }

    fn fill_zero(&self, dst: usize, pages: usize) -> Result<(), String> {
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
        what: &str,
        fill: impl Fn(usize, usize) -> std::io::Result<Fill>,
    ) -> Result<(), String> {
        let mut done = 0;
        while done < pages {
            let off = done * PAGE_SIZE;
            match fill(off, (pages - done) * PAGE_SIZE)
                .map_err(|e| format!("userfaultfd {what} at {:#x}: {e}", dst + off))?
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
    fn fill_other(&self, page: u64, src: Source) -> Result<(), String> {
        let dst = self
            .host_of(page)
            .ok_or_else(|| format!("page {page} is outside guest RAM"))?;
        match src {
            Source::Zero => self.fill_zero(dst, 1),
            Source::Base(b) => {
                let off = b as usize * PAGE_SIZE;
                let base = self.base.bytes();
                if off + PAGE_SIZE > base.len() {
                    return Err(format!("base page {b} is beyond the base image"));
                }
                self.fill_copy(dst, base[off..].as_ptr(), 1)
            }
            Source::Chunk { .. } => Err("chunk pages are filled per chunk".into()),
        }
    }

    /// Decompresses chunk `c` into `buf` and fills every page taken from it.
    fn fill_chunk(&self, c: usize, buf: &mut Vec<u8>) -> Result<(), String> {
        if self.chunk_state[c].load(Ordering::Acquire) == CHUNK_FILLED {
            return Ok(());
        }
        self.overlay.read_chunk(c, buf).map_err(|e| e.to_string())?;
        self.fill_decoded(c, buf)
    }

    /// Fills every page taken from chunk `c`, decompressed in `buf`.
    fn fill_decoded(&self, c: usize, buf: &[u8]) -> Result<(), String> {
        let pages = self.sources.chunk_pages(c);
        let mut i = 0;
        while i < pages.len() {
            // A run: guest pages and chunk pages both consecutive, in one host region.
            let (p0, k0) = pages[i];
            let dst = self
                .host_of(p0)
                .ok_or_else(|| format!("page {p0} is outside guest RAM"))?;
            let mut n = 1;
            while i + n < pages.len()
                && pages[i + n] == (p0 + n as u64, k0 + n as u32)
                && self.host_of(p0 + n as u64) == Some(dst + n * PAGE_SIZE)
            {
                n += 1;
            }
            let src = k0 as usize * PAGE_SIZE;
            if src + n * PAGE_SIZE > buf.len() {
                return Err(format!("chunk {c} is shorter than its index says"));
            }
            self.fill_copy(dst, buf[src..].as_ptr(), n)?;
            i += n;
        }
        self.chunk_state[c].store(CHUNK_FILLED, Ordering::Release);
        Ok(())
    }

    /// Serves the fault at host address `addr`.
    fn serve(&self, addr: usize, buf: &mut Vec<u8>) -> Result<(), String> {
        let page_addr = addr & !(PAGE_SIZE - 1);
        let page = self
            .page_of(page_addr)
            .ok_or_else(|| format!("fault at {addr:#x} outside guest RAM"))?;
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
            .map_err(|e| format!("userfaultfd wake: {e}"))
    }

    fn fail(&self, why: String) {
        tracing::error!("lazy synthesis failed: {why}");
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why.clone());
        }
        if let Some(exit) = self.exit.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            exit.notify(ExitReason::Error(format!(
                "the overlay could not be applied: {why}"
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
fn prefetch(s: &Shared, delay: Duration) -> Result<(), String> {
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
            s.fail(format!("reading userfaultfd events: {e}"));
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
                .ok_or_else(|| LazyError::Memory(format!("page {p} is outside guest RAM")))?;
            let n = (end.min(reg.first_page + reg.pages) - p) as usize;
            let host = reg.host + (p - reg.first_page) as usize * PAGE_SIZE;
            crate::vstate::memory::remap_anonymous(host, n * PAGE_SIZE)
                .map_err(|e| LazyError::Memory(format!("anonymous remap at {host:#x}: {e}")))?;
            uffd.register(host, n * PAGE_SIZE)
                .map_err(LazyError::Unavailable)?;
            p += n as u64;
        }
    }
    Ok(())
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
                shared.fill_decoded(*c, data).map_err(LazyError::Memory)?;
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
            .spawn(move || match prefetch(&s, delay) {
                Ok(()) if s.stop.load(Ordering::Relaxed) => {}
                Ok(()) => s.finish(),
                Err(e) => s.fail(e),
            })
            .map_err(|e| LazyError::Memory(format!("cannot start the prefetcher: {e}")))?;
        self.threads.push(t);
        Ok(())
    }

    /// Where a fatal fill error is reported (stopping the VM).
    pub fn set_exit(&self, exit: Arc<ExitNotifier>) {
        *self.shared.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit.clone());
        if let Some(why) = self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            exit.notify(ExitReason::Error(format!(
                "the overlay could not be applied: {why}"
            )));
        }
    }

    /// Waits until every rewritten page is present (or the fill failed); returns the error.
    pub fn wait(&self, timeout: Duration) -> Result<(), String> {
        let (m, cv) = &self.shared.done;
        let deadline = Instant::now() + timeout;
        let mut done = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            if let Some(f) = self.failure() {
                return Err(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("guest memory not filled within {timeout:?}"));
            }
            done = cv
                .wait_timeout(done, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// The fill error, if any.
    pub fn failure(&self) -> Option<String> {
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
