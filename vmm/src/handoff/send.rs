//! The source side of a handoff: `ApiRequest::Handoff` on the control socket (or `vmm
//! handoff`) streams the running VM to a `vmm receive` (stream: [`format::handoff`]).
//!
//! ```text
//!  event loop (owns the Machine)              handoff thread                encoder → sender
//!  ─ Handoff request: Source taken            connect, preamble, Start,     threads (frames
//!    (memory, VM fd, devices, base)             ◀ Accept                      compressed apart
//!                                              dirty log on, fill waited      from the writes)
//!                                              round 0: δ vs base ───────▶ Pages, Disk
//!                                              rounds 1..n: dirty pages ─▶ Pages, Disk
//!  ◀─ Pause: devices held, vCPUs paused,      (bytes left / bandwidth ≤ budget)
//!     machine state saved ─▶                   last pages, disk tail, State, Complete
//!                                              ◀ Resumed: answer HandedOff
//!  ◀─ Release: the VM stops here (exit 0)
//!  ◀─ Resume (any failure before Resumed): vCPUs and devices go on, dirty logging off
//! ```
//!
//! The event loop keeps serving the console and the control socket throughout: the thread
//! asks it for the few things only it may do (pause and save, resume, release, progress
//! reports) with [`MachineOp`]s on a channel and an eventfd.
//!
//! Failure: whatever fails before `Resumed` (no connection, `Refuse`, `Failed`, a cut, a
//! bad frame, a timeout: [`PEER_TIMEOUT`] per read or write while the VM runs,
//! [`PAUSE_TIMEOUT`] once it is paused) resumes the VM first, then sends `Abandon` when the
//! connection still takes it, turns dirty logging off, and answers the request with the
//! error: the VM goes on here with all its state (nothing was released).
//!
//! # Convergence (see [`decide`])
//!
//! After each round the source measures the link's bandwidth (bytes the peer acknowledged,
//! i.e. written minus the socket's unsent queue `SIOCOUTQ`, over time) and estimates the
//! pause: bytes still queued plus the pages and blocks dirtied during the round, over the
//! bandwidth. It pauses when that fits the downtime budget (default 20 ms). A guest that
//! dirties faster than the link drains never fits: after [`MAX_ROUNDS`] rounds, or once a
//! round's dirty set has stopped shrinking for [`STALL_ROUNDS`] rounds, the source pauses
//! anyway. The guarantee: the handoff ends after at most `MAX_ROUNDS` rounds, and the pause
//! then lasts about (the dirty set of one round) / bandwidth — bounded by guest RAM /
//! bandwidth — and is reported as measured (`HandoffStats::downtime_us`), never hidden.
//!
//! # Compression (see [`choose_codec`])
//!
//! zstd runs on the encoder thread while the sender thread writes: per batch, raw when the
//! link is at least half as fast as measured zstd-1 throughput (compression would hold the
//! link back), zstd level 3 when the link is 16× slower than zstd (fewer bytes matter more),
//! else level 1. Before any measurement: level 1.
//!
//! # Pages
//!
//! Round 0 sends the δ against the base ([`super::dirty::base_delta`]): zero pages as
//! `Fill::Zero`, pages equal to a page sent earlier as `Fill::Copy` (128-bit content hash,
//! forgotten when that page is sent again), pages equal to a non-zero page of the base
//! elsewhere as `Fill::BaseAt` (a [`super::dirty::BaseIndex`] by the same hash, built from
//! the base's memory file before round 0 while the VM runs; a hit is compared byte by byte),
//! the rest as data; pages equal to the base are not sent. The checks go cheapest first:
//! zero, the base at the same place, a copy, the base elsewhere, data. Later rounds send
//! dirtied pages the same way, a page back at its base content as `Fill::Base`. A lazily synthesised VM's fill is waited for first (its `UFFDIO_COPY`
//! writes are in neither dirty record); pages are never named by overlay chunk (not done).

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use format::control::{self as wire, ApiResponse, HandoffPhase, HandoffProgress, HandoffStats};
use format::handoff::{
    self as stream, Codec, Complete, Fill, FrameReader, FrameWriter, HandoffError, Message,
    PageRun, Pages, Preamble, Start,
};
use vmm_sys_util::eventfd::EventFd;
use xxhash_rust::xxh3::xxh3_128;

use super::dirty::{self, DirtyError, DirtyLog, PageClass, PAGE};
use super::link::{HandoffBase, MachineOp};
use crate::devices::virtio::slot::Slot;
use crate::machine::Machine;
use crate::synthesis::lazy::{FillWaiter, LazyError};
use crate::vstate::memory::GuestMemoryMmap;

/// Rounds after round 0 before the source pauses whatever the estimate.
pub const MAX_ROUNDS: u32 = 30;
/// Rounds whose dirty set did not shrink before the source pauses anyway.
pub const STALL_ROUNDS: u32 = 4;
/// Pages per `Pages` frame.
pub const BATCH_PAGES: usize = 256;
/// Blocks per `Disk` frame.
pub const BATCH_BLOCKS: usize = 256;
/// How long to wait for the target to connect, accept, and answer `Complete`.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// While the VM is paused: how long a write may stall, and how long the target may take to
/// answer `Complete`, before the source gives up and resumes the VM.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lazy fill may take to complete before a handoff gives up.
pub const FILL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a handoff failed (the VM goes on here).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The VM was not synthesised from a base: nothing to send a δ against.
    #[error("this VM was not synthesised from a base (vmm run/restore): it cannot be handed off")]
    NoBase,
    /// Another handoff is running.
    #[error("a handoff of this VM is already in progress")]
    Busy,
    /// The target's address does not resolve.
    #[error("bad handoff target address '{0}'")]
    Address(String, #[source] std::io::Error),
    /// Connecting failed.
    #[error("cannot connect to the handoff target {0}")]
    Connect(SocketAddr, #[source] std::io::Error),
    /// The target closed the connection (it stopped, or the link was cut).
    #[error("the target closed the connection")]
    Closed(#[source] std::io::Error),
    /// The stream failed (link cut, timeout, bad frame).
    #[error("the handoff stream failed")]
    Stream(#[source] HandoffError),
    /// The target refused the handoff.
    #[error("the target refused the handoff ({kind:?}): {reason}")]
    Refused {
        /// Its class.
        kind: stream::RefuseKind,
        /// Its reason.
        reason: String,
    },
    /// The target failed after accepting.
    #[error("the target failed ({kind:?}): {reason}")]
    TargetFailed {
        /// Its class.
        kind: stream::RefuseKind,
        /// Its reason.
        reason: String,
    },
    /// The target sent something out of place.
    #[error("the target answered {0:?} where {1} was due")]
    Unexpected(stream::Kind, &'static str),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The lazy fill did not complete.
    #[error("guest memory is incomplete")]
    Lazy(#[from] LazyError),
    /// Reading the base's memory or the disk failed.
    #[error("failed to read {0}")]
    Read(&'static str, #[source] std::io::Error),
    /// The event loop could not pause, save or resume the machine.
    #[error("the machine could not be {0}: {1}")]
    Machine(&'static str, String),
    /// A thread of the handoff could not start.
    #[error("cannot start the handoff's threads")]
    Thread(#[source] std::io::Error),
}

impl From<HandoffError> for SendError {
    fn from(e: HandoffError) -> Self {
        use std::io::ErrorKind as K;
        match e {
            HandoffError::Io(io)
                if matches!(
                    io.kind(),
                    K::UnexpectedEof | K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted
                ) =>
            {
                SendError::Closed(io)
            }
            e => SendError::Stream(e),
        }
    }
}

/// What the handoff thread takes from the machine.
struct Source {
    mem: GuestMemoryMmap,
    vm: OwnedFd,
    virtio: Arc<Vec<Slot>>,
    fill: Option<FillWaiter>,
    base: HandoffBase,
    start: Start,
    ops: Ops,
}

#[derive(Clone)]
struct Ops {
    tx: Sender<MachineOp>,
    wake: Arc<EventFd>,
}

impl Ops {
    fn send(&self, op: MachineOp) -> bool {
        let ok = self.tx.send(op).is_ok();
        let _ = self.wake.write(1);
        ok
    }

    fn call<T>(
        &self,
        what: &'static str,
        op: impl FnOnce(Sender<Result<T, String>>) -> MachineOp,
    ) -> Result<T, SendError> {
        let (tx, rx) = mpsc::channel();
        if !self.send(op(tx)) {
            return Err(SendError::Machine(what, "the event loop has ended".into()));
        }
        rx.recv()
            .map_err(|_| SendError::Machine(what, "the event loop has ended".into()))?
            .map_err(|e| SendError::Machine(what, e))
    }

    fn progress(&self, phase: HandoffPhase, round: u32, bytes: u64, dirty: u64, bw: f64) {
        self.send(MachineOp::Progress(HandoffProgress {
            phase,
            round,
            bytes,
            dirty_pages: dirty,
            bandwidth_bps: bw as u64,
        }));
    }
}

/// A handoff request, as the control socket received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The target's address.
    pub to: String,
    /// The session token.
    pub token: [u8; 32],
    /// The pause aimed for.
    pub downtime: Duration,
}

/// Starts a handoff of `machine` on its own thread; its answer goes to `conn` when it ends.
/// Refused at once (answered here) for a VM without a base or while another runs.
pub fn start(machine: &Machine, req: Request, mut conn: UnixStream) {
    let answer = |conn: &mut UnixStream, r: ApiResponse| {
        if let Err(e) = wire::write_frame(conn, &r) {
            tracing::warn!("failed to answer a handoff request: {e}");
        }
    };
    let refuse = |conn: &mut UnixStream, e: SendError| {
        answer(conn, ApiResponse::Error(crate::error::message(&e)))
    };
    let Some(base) = machine.handoff.base.clone() else {
        return refuse(&mut conn, SendError::NoBase);
    };
    if machine.handoff.active.swap(true, Ordering::AcqRel) {
        return refuse(&mut conn, SendError::Busy);
    }
    let vm = match dirty::dup_fd(machine.vm().fd()) {
        Ok(fd) => fd,
        Err(e) => {
            machine.handoff.active.store(false, Ordering::Release);
            return refuse(&mut conn, SendError::Thread(e));
        }
    };
    let disk_bytes = machine
        .virtio
        .iter()
        .find_map(|s| s.lock().block().map(|b| b.disk().size()))
        .unwrap_or(0);
    let ops = Ops {
        tx: machine.handoff.tx.clone(),
        wake: machine.handoff.wake.clone(),
    };
    let source = Source {
        mem: machine.memory().clone(),
        vm,
        virtio: machine.virtio.clone(),
        fill: machine.lazy().map(|l| l.waiter()),
        base,
        start: Start {
            mem_mib: machine.mem_mib(),
            vcpus: machine.vcpu_count() as u32,
            disk_bytes,
        },
        ops: ops.clone(),
    };
    let spawned = std::thread::Builder::new()
        .name("handoff".into())
        .spawn(move || {
            // Its encoder and sender threads inherit this filter.
            crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Handoff);
            let result = run(source, &req);
            let response = match result {
                Ok(stats) => ApiResponse::HandedOff(stats),
                Err(e) => {
                    tracing::warn!(
                        "handoff to {} failed: {}",
                        req.to,
                        crate::error::message(&e)
                    );
                    ApiResponse::Error(crate::error::message(&e))
                }
            };
            let done = matches!(response, ApiResponse::HandedOff(_));
            answer(&mut conn, response);
            drop(conn);
            if done {
                ops.send(MachineOp::Release);
            }
            ops.send(MachineOp::Ended);
        });
    if let Err(e) = spawned {
        machine.handoff.active.store(false, Ordering::Release);
        tracing::warn!("cannot start the handoff thread: {e}");
    }
}

/// Runs one handoff; on any failure before `Resumed`, undoes what it did (Abandon sent if
/// possible, logging off, the machine resumed) and returns why.
fn run(src: Source, req: &Request) -> Result<HandoffStats, SendError> {
    let mut session = Session::new(&src);
    let r = session.run(&src, req);
    if r.is_err() {
        session.undo(&src);
    }
    r
}

/// One handoff's state, so a failure at any point can be undone.
struct Session {
    t0: Instant,
    log: Option<DirtyLog>,
    tracking_disk: bool,
    paused: bool,
    pipe: Option<Pipeline>,
    /// The connection's writing end once everything was sent: a failure while waiting for
    /// `Resumed` sends `Abandon` on it before the connection closes (the target takes a bare
    /// close after its `Resumed` for the release of the VM).
    tail: Option<FrameWriter<TcpStream>>,
    reader_bytes: u64,
}

impl Session {
    fn new(_src: &Source) -> Self {
        Session {
            t0: Instant::now(),
            log: None,
            tracking_disk: false,
            paused: false,
            pipe: None,
            tail: None,
            reader_bytes: 0,
        }
    }

    fn undo(&mut self, src: &Source) {
        // The VM first: a sending thread stuck on a stalled link may take until its write
        // timeout to give up.
        if std::mem::take(&mut self.paused) {
            if let Err(e) = src.ops.call("resumed", MachineOp::Resume) {
                tracing::error!("after a failed handoff: {e}");
            }
        }
        if let Some(pipe) = self.pipe.take() {
            pipe.abandon("the source gave up");
        }
        if let Some(mut w) = self.tail.take() {
            let _ = w.write(&Message::Abandon("the source gave up".into()), Codec::Raw);
            let _ = w.get_ref().shutdown(std::net::Shutdown::Both);
        }
        if let Some(log) = self.log.take() {
            if let Err(e) = log.stop() {
                tracing::warn!("{e}");
            }
        }
        if std::mem::take(&mut self.tracking_disk) {
            for_disk(src, |d| d.track_writes(false));
        }
        src.ops.progress(HandoffPhase::Failed, 0, 0, 0, 0.0);
    }

    fn run(&mut self, src: &Source, req: &Request) -> Result<HandoffStats, SendError> {
        let ops = &src.ops;
        ops.progress(HandoffPhase::Connecting, 0, 0, 0, 0.0);
        let addr = req
            .to
            .to_socket_addrs()
            .map_err(|e| SendError::Address(req.to.clone(), e))?
            .next()
            .ok_or_else(|| {
                SendError::Address(req.to.clone(), std::io::ErrorKind::NotFound.into())
            })?;
        let conn = TcpStream::connect_timeout(&addr, PEER_TIMEOUT)
            .map_err(|e| SendError::Connect(addr, e))?;
        let io = |e| SendError::Stream(HandoffError::Io(e));
        conn.set_nodelay(true).map_err(io)?;
        conn.set_read_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
        conn.set_write_timeout(Some(PEER_TIMEOUT)).map_err(io)?;
        let mut writer = FrameWriter::new(conn.try_clone().map_err(io)?);
        let mut reader = FrameReader::new(conn.try_clone().map_err(io)?);
        writer.write_preamble(&Preamble {
            base_id: src.base.id,
            token: req.token,
        })?;
        writer.write(&Message::Start(src.start.clone()), Codec::Raw)?;
        match reader.read()? {
            Message::Accept => {}
            Message::Refuse(r) => {
                return Err(SendError::Refused {
                    kind: r.kind,
                    reason: r.reason,
                })
            }
            Message::Failed(r) => {
                return Err(SendError::TargetFailed {
                    kind: r.kind,
                    reason: r.reason,
                })
            }
            m => return Err(SendError::Unexpected(m.kind(), "Accept or Refuse")),
        }
        self.pipe = Some(Pipeline::start(writer, conn).map_err(SendError::Thread)?);
        let r = self.stream(src, req, &mut reader);
        match r {
            // A target that fails says why before it closes: a failed write or a cut
            // answer may hide a `Failed` waiting to be read.
            Err(SendError::Closed(_) | SendError::Stream(HandoffError::Io(_))) => {
                let _ = reader
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_secs(1)));
                match reader.read() {
                    Ok(Message::Failed(f) | Message::Refuse(f)) => Err(SendError::TargetFailed {
                        kind: f.kind,
                        reason: f.reason,
                    }),
                    _ => r,
                }
            }
            r => r,
        }
    }

    /// Everything after `Accept`: the δ, the rounds, the pause, the target's answer.
    fn stream(
        &mut self,
        src: &Source,
        req: &Request,
        reader: &mut FrameReader<TcpStream>,
    ) -> Result<HandoffStats, SendError> {
        let ops = &src.ops;
        // The base's pages by content, while the VM runs at full speed (before logging).
        let base = File::open(&src.base.memory).map_err(|e| SendError::Read("the base", e))?;
        let t = Instant::now();
        let base_index = dirty::BaseIndex::build(&base, dirty::mem_pages(&src.mem))
            .map_err(|e| SendError::Read("the base", e))?;
        tracing::info!(
            pages = base_index.len(),
            ms = t.elapsed().as_secs_f64() * 1e3,
            "indexed the base's pages"
        );
        // From here every write is recorded: what round 0 reads, or what it missed.
        self.log = Some(DirtyLog::start(
            dirty::dup_fd(&src.vm).map_err(|e| SendError::Read("the VM", e))?,
            &src.mem,
        )?);
        for_disk(src, |d| d.track_writes(true));
        self.tracking_disk = true;
        if let Some(fill) = &src.fill {
            fill.wait(FILL_TIMEOUT)?;
        }

        // Round 0: the δ against the base, and the disk δ.
        ops.progress(HandoffPhase::Delta, 0, self.bytes(), 0, 0.0);
        let image = match &src.base.image {
            Some(p) => Some(File::open(p).map_err(|e| SendError::Read("the RAM image", e))?),
            None => None,
        };
        let delta = dirty::base_delta(&src.mem, &base, image.as_ref())?;
        let mut pages = PageSender::new(dirty::mem_pages(&src.mem), base_index);
        let pipe = self.pipe.as_mut().expect("started above");
        pages.send_classified(&src.mem, delta, pipe)?;
        let blocks = for_disk(src, |d| d.block_numbers().collect::<Vec<_>>()).unwrap_or_default();
        let mut disk_blocks = send_blocks(src, &blocks, pipe)?;
        pipe.flush()?;

        // Rounds: what was dirtied meanwhile, until the rest fits the budget.
        let mut round = 0u32;
        let mut history: Vec<u64> = Vec::new();
        let (dirty, disk_dirty) = loop {
            let dirty = self.log.as_mut().expect("on").take()?;
            let disk_dirty = for_disk(src, |d| d.take_written()).unwrap_or_default();
            let pipe = self.pipe.as_mut().expect("started above");
            let bw = pipe.meter.bandwidth();
            let dirty_bytes = dirty.len() * PAGE as u64 + disk_dirty.len() as u64 * 4096;
            history.push(dirty_bytes);
            let decision = decide(round, &history, pipe.meter.backlog(), bw, req.downtime);
            ops.progress(
                HandoffPhase::Rounds,
                round,
                self.bytes(),
                dirty.len(),
                bw.unwrap_or(0.0),
            );
            if decision != Decision::Continue {
                if decision == Decision::PauseAnyway {
                    tracing::info!(
                        round,
                        dirty_bytes,
                        "handoff does not converge: pausing anyway"
                    );
                }
                break (dirty, disk_dirty);
            }
            round += 1;
            let pipe = self.pipe.as_mut().expect("started above");
            pages.send_pages(&src.mem, &base, dirty.iter(), pipe)?;
            disk_blocks += send_blocks(src, &disk_dirty, pipe)?;
            pipe.flush()?;
            // The socket's queue drains to half the budget before the next round: else the
            // rounds spin on a tiny dirty set, the stall rule fires and the pause pays for
            // the whole queue.
            let t = Instant::now();
            while bw.is_some_and(|bw| {
                pipe.meter.backlog() as f64 / bw > req.downtime.as_secs_f64() / 2.0
            }) && t.elapsed() < PAUSE_TIMEOUT
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        };

        // The pause: devices still, vCPUs paused, state saved; then the rest.
        let t_pause = Instant::now();
        ops.progress(HandoffPhase::Paused, round, self.bytes(), dirty.len(), 0.0);
        self.paused = true;
        // While the VM is paused, a stalled link or a silent target is given up on sooner.
        if let Some(p) = &self.pipe {
            let _ = p.meter.conn.set_write_timeout(Some(PAUSE_TIMEOUT));
            let _ = p.meter.conn.set_read_timeout(Some(PAUSE_TIMEOUT));
        }
        let state = ops.call("paused", MachineOp::Pause)?;
        let mut last = dirty;
        let more = self.log.as_mut().expect("on").take()?;
        for p in more.iter() {
            last.insert(p);
        }
        let mut disk_last = disk_dirty;
        disk_last.extend(for_disk(src, |d| d.take_written()).unwrap_or_default());
        disk_last.sort_unstable();
        disk_last.dedup();
        let pipe = self.pipe.as_mut().expect("started above");
        pages.send_pages(&src.mem, &base, last.iter(), pipe)?;
        disk_blocks += send_blocks(src, &disk_last, pipe)?;
        pipe.send(Message::State(state), Some(Codec::Raw))?;
        pipe.send(
            Message::Complete(Complete {
                page_batches: pages.batches,
                disk_blocks,
            }),
            Some(Codec::Raw),
        )?;
        let pipe = self.pipe.take().expect("started above");
        let tail = pipe.finish()?;
        let wire_bytes = tail.bytes;
        self.tail = Some(tail);
        let answer = reader.read();
        self.reader_bytes = reader.bytes;
        let resumed = match answer? {
            Message::Resumed(r) => r,
            Message::Failed(r) | Message::Refuse(r) => {
                return Err(SendError::TargetFailed {
                    kind: r.kind,
                    reason: r.reason,
                })
            }
            m => return Err(SendError::Unexpected(m.kind(), "Resumed")),
        };
        let downtime = t_pause.elapsed();
        // Done: the VM lives on the target. Logging off is moot (this VM stops).
        self.log = None;
        let stats = HandoffStats {
            rounds: round + 1,
            bytes: wire_bytes + self.reader_bytes,
            pages: pages.pages,
            disk_blocks,
            downtime_us: downtime.as_micros() as u64,
            total_us: self.t0.elapsed().as_micros() as u64,
            target_restore_us: resumed.restore_us,
        };
        ops.progress(HandoffPhase::Done, round, stats.bytes, 0, 0.0);
        Ok(stats)
    }

    fn bytes(&self) -> u64 {
        self.pipe
            .as_ref()
            .map_or(0, |p| p.meter.written.load(Ordering::Relaxed))
    }
}

/// Runs `f` on the VM's disk δ, if it has a disk.
fn for_disk<T>(
    src: &Source,
    f: impl FnOnce(&mut crate::devices::virtio::disk::Delta) -> T,
) -> Option<T> {
    for slot in src.virtio.iter() {
        let mut t = slot.lock();
        if let Some(b) = t.block_mut() {
            return Some(f(b.disk_mut().delta_mut()));
        }
    }
    None
}

/// Sends disk blocks `blocks` (their current content), in batches; returns how many.
fn send_blocks(src: &Source, blocks: &[u64], pipe: &mut Pipeline) -> Result<u64, SendError> {
    for chunk in blocks.chunks(BATCH_BLOCKS) {
        let mut out = Vec::with_capacity(chunk.len());
        for &n in chunk {
            let mut data = vec![0u8; stream::DISK_BLOCK];
            let read = src.virtio.iter().find_map(|slot| {
                slot.lock()
                    .block()
                    .map(|b| b.disk().read_at(n * stream::DISK_BLOCK as u64, &mut data))
            });
            if let Some(Err(e)) = read {
                return Err(SendError::Read("the disk", std::io::Error::other(e)));
            }
            out.push((n, data));
        }
        pipe.send(Message::Disk(out), None)?;
    }
    Ok(blocks.len() as u64)
}

/// Builds page batches: zero pages, base pages, dedup within the stream and against the
/// base's other pages, data.
struct PageSender {
    /// Content hash → a page the target holds with that content.
    by_hash: HashMap<u128, u64>,
    /// Page → the hash it was sent with.
    sent: HashMap<u64, u128>,
    /// The base's non-zero pages by content.
    base: dirty::BaseIndex,
    mem_pages: u64,
    batches: u64,
    pages: u64,
}

/// A page to put in a batch.
enum Item {
    Zero,
    Base,
    Copy(u64),
    BaseAt(u64),
    Data(Vec<u8>),
}

impl PageSender {
    fn new(mem_pages: u64, base: dirty::BaseIndex) -> Self {
        PageSender {
            by_hash: HashMap::new(),
            sent: HashMap::new(),
            base,
            mem_pages,
            batches: 0,
            pages: 0,
        }
    }

    /// Sends round 0's classified pages.
    fn send_classified(
        &mut self,
        mem: &GuestMemoryMmap,
        delta: Vec<(u64, PageClass)>,
        pipe: &mut Pipeline,
    ) -> Result<(), SendError> {
        let mut batch = Vec::new();
        for (p, class) in delta {
            let item = match class {
                PageClass::Zero => Item::Zero,
                PageClass::Base => Item::Base,
                PageClass::Data => {
                    let mut buf = vec![0u8; PAGE];
                    if !dirty::read_page(mem, p, &mut buf) {
                        continue;
                    }
                    self.item_for(buf)
                }
            };
            batch.push((p, item));
            if batch.len() == BATCH_PAGES {
                self.flush_batch(&mut batch, pipe)?;
            }
        }
        self.flush_batch(&mut batch, pipe)
    }

    /// Sends the current content of `pages` (dirtied ones): zero, base, copy, base
    /// elsewhere or data.
    fn send_pages(
        &mut self,
        mem: &GuestMemoryMmap,
        base: &File,
        pages: impl Iterator<Item = u64>,
        pipe: &mut Pipeline,
    ) -> Result<(), SendError> {
        let mut batch = Vec::new();
        let mut theirs = vec![0u8; PAGE];
        for p in pages {
            if p >= self.mem_pages {
                continue;
            }
            let mut buf = vec![0u8; PAGE];
            if !dirty::read_page(mem, p, &mut buf) {
                continue;
            }
            theirs.fill(0);
            let _ = base.read_at(&mut theirs, p * PAGE as u64);
            let item = match dirty::classify(&buf, &theirs) {
                PageClass::Base => Item::Base,
                PageClass::Zero => Item::Zero,
                PageClass::Data => self.item_for(buf),
            };
            batch.push((p, item));
            if batch.len() == BATCH_PAGES {
                self.flush_batch(&mut batch, pipe)?;
            }
        }
        self.flush_batch(&mut batch, pipe)
    }

    /// A non-zero page unlike the base's at its place: a copy of a page the target holds,
    /// else the base's page elsewhere (bytes compared), else data.
    fn item_for(&self, buf: Vec<u8>) -> Item {
        let hash = xxh3_128(&buf);
        if let Some(&s) = self.by_hash.get(&hash) {
            return Item::Copy(s);
        }
        match self.base.find(hash, &buf) {
            Some(s) => Item::BaseAt(s),
            None => Item::Data(buf),
        }
    }

    /// Emits `batch` as one `Pages` frame, then records what the target now holds.
    fn flush_batch(
        &mut self,
        batch: &mut Vec<(u64, Item)>,
        pipe: &mut Pipeline,
    ) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut runs: Vec<PageRun> = Vec::new();
        let mut data = Vec::new();
        let mut hashes = Vec::with_capacity(batch.len());
        for (p, item) in batch.iter() {
            let p = *p;
            let (fill, hash) = match item {
                Item::Zero => (Fill::Zero, None),
                Item::Base => (Fill::Base, None),
                Item::Copy(s) => (Fill::Copy(*s), self.sent.get(s).copied()),
                // The base index names this content for good: no need to remember it.
                Item::BaseAt(s) => (Fill::BaseAt(*s), None),
                Item::Data(b) => {
                    data.extend_from_slice(b);
                    (Fill::Data, Some(xxh3_128(b)))
                }
            };
            hashes.push((p, hash));
            match runs.last_mut() {
                Some(r) if r.first + u64::from(r.count) == p && extends(r, fill) => r.count += 1,
                _ => runs.push(PageRun {
                    first: p,
                    count: 1,
                    fill,
                }),
            }
        }
        // The target's content of these pages changes: forget the hashes they were sources
        // for, then record the new ones.
        for (p, hash) in hashes {
            if let Some(old) = self.sent.remove(&p) {
                if self.by_hash.get(&old) == Some(&p) {
                    self.by_hash.remove(&old);
                }
            }
            if let Some(h) = hash {
                self.sent.insert(p, h);
                // The latest holder: the one least likely to change before it is used.
                self.by_hash.insert(h, p);
            }
        }
        self.pages += batch.len() as u64;
        self.batches += 1;
        batch.clear();
        pipe.send(Message::Pages(Pages { runs, data }), None)
    }
}

/// Whether a page with `fill` continues run `r`.
fn extends(r: &PageRun, fill: Fill) -> bool {
    match (r.fill, fill) {
        (Fill::Data, Fill::Data) | (Fill::Zero, Fill::Zero) | (Fill::Base, Fill::Base) => true,
        (Fill::Copy(a), Fill::Copy(b)) | (Fill::BaseAt(a), Fill::BaseAt(b)) => {
            a + u64::from(r.count) == b
        }
        _ => false,
    }
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Another round.
    Continue,
    /// The rest fits the budget: pause.
    Pause,
    /// It will not fit: pause anyway (bounded rounds), accepting a longer pause.
    PauseAnyway,
}

/// After `round` (0: the δ), with `history` the bytes dirtied in each round so far (the last
/// is what is left to send), `backlog` bytes still queued, the link's `bandwidth` (bytes per
/// second, `None` until measured) and the `budget`: pause, or go on.
pub fn decide(
    round: u32,
    history: &[u64],
    backlog: u64,
    bandwidth: Option<f64>,
    budget: Duration,
) -> Decision {
    let left = history.last().copied().unwrap_or(0) + backlog;
    if let Some(bw) = bandwidth.filter(|b| *b > 0.0) {
        if left as f64 / bw <= budget.as_secs_f64() {
            return Decision::Pause;
        }
    } else if left == 0 {
        return Decision::Pause;
    }
    if round >= MAX_ROUNDS {
        return Decision::PauseAnyway;
    }
    // Not shrinking: the smallest dirty set is older than STALL_ROUNDS rounds.
    let n = history.len();
    if n > STALL_ROUNDS as usize {
        let recent = history[n - STALL_ROUNDS as usize..].iter().min();
        let before = history[..n - STALL_ROUNDS as usize].iter().min();
        if let (Some(r), Some(b)) = (recent, before) {
            if r >= b {
                return Decision::PauseAnyway;
            }
        }
    }
    Decision::Continue
}

/// The codec for the next batch, from the link's `bandwidth` and zstd-1's measured
/// throughput `zstd_bps` (bytes per second in; `None` until measured).
pub fn choose_codec(bandwidth: Option<f64>, zstd_bps: Option<f64>) -> Codec {
    match (bandwidth, zstd_bps) {
        (Some(bw), Some(z)) if bw * 2.0 >= z => Codec::Raw,
        (Some(bw), Some(z)) if bw * 16.0 < z => Codec::Zstd(3),
        _ => Codec::Zstd(1),
    }
}

/// Bytes written and acknowledged on the connection, over time.
struct Meter {
    written: AtomicU64,
    conn: TcpStream,
    /// When the first frame was written (the link idles before: connecting, the δ scan).
    started: std::sync::OnceLock<Instant>,
    /// zstd-1 input bytes and the nanoseconds they took.
    zstd_in: AtomicU64,
    zstd_ns: AtomicU64,
}

impl Meter {
    /// Bytes not yet sent from the socket's queue (`SIOCOUTQ`).
    fn unsent(&self) -> u64 {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int into `n`; the fd is a live socket.
        let r = unsafe { libc::ioctl(self.conn.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        if r < 0 {
            0
        } else {
            n.max(0) as u64
        }
    }

    /// Bytes the peer has acknowledged.
    fn acked(&self) -> u64 {
        self.written
            .load(Ordering::Relaxed)
            .saturating_sub(self.unsent())
    }

    /// Bytes still queued on this side.
    fn backlog(&self) -> u64 {
        self.unsent()
    }

    /// Acknowledged bytes per second since the stream started (`None` under 64 KiB).
    fn bandwidth(&self) -> Option<f64> {
        let acked = self.acked();
        let t = self.started.get()?.elapsed().as_secs_f64();
        (acked >= 64 << 10 && t > 0.0).then(|| acked as f64 / t)
    }

    fn zstd_speed(&self) -> Option<f64> {
        let (b, ns) = (
            self.zstd_in.load(Ordering::Relaxed),
            self.zstd_ns.load(Ordering::Relaxed),
        );
        (b > 0 && ns > 0).then(|| b as f64 / (ns as f64 / 1e9))
    }
}

enum Job {
    Frame(Message, Option<Codec>),
    Flush(SyncSender<()>),
}

enum Encoded {
    Frame(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Encoder thread (compression) and sender thread (writes), in order.
struct Pipeline {
    jobs: Option<SyncSender<Job>>,
    encoder: Option<JoinHandle<Result<(), HandoffError>>>,
    sender: Option<JoinHandle<Result<FrameWriter<TcpStream>, HandoffError>>>,
    meter: Arc<Meter>,
    /// Everything was written: the connection stays open for the target's answer.
    finished: bool,
}

impl Pipeline {
    fn start(writer: FrameWriter<TcpStream>, conn: TcpStream) -> std::io::Result<Self> {
        let meter = Arc::new(Meter {
            written: AtomicU64::new(0),
            conn,
            started: std::sync::OnceLock::new(),
            zstd_in: AtomicU64::new(0),
            zstd_ns: AtomicU64::new(0),
        });
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(4);
        let (enc_tx, enc_rx) = mpsc::sync_channel::<Encoded>(4);
        let first_seq = writer.next_seq();
        let m = meter.clone();
        let encoder = std::thread::Builder::new()
            .name("handoff-zstd".into())
            .spawn(move || {
                let mut seq = first_seq;
                for job in job_rx {
                    let out = match job {
                        Job::Frame(msg, codec) => {
                            let codec = codec
                                .unwrap_or_else(|| choose_codec(m.bandwidth(), m.zstd_speed()));
                            let raw = match &msg {
                                Message::Pages(p) => p.data.len(),
                                Message::Disk(d) => d.len() * stream::DISK_RECORD,
                                _ => 0,
                            };
                            let t = Instant::now();
                            let frame = stream::encode_frame(seq, &msg, codec)?;
                            if codec == Codec::Zstd(1) {
                                m.zstd_in.fetch_add(raw as u64, Ordering::Relaxed);
                                m.zstd_ns
                                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            }
                            seq = seq.wrapping_add(1);
                            Encoded::Frame(frame)
                        }
                        Job::Flush(done) => Encoded::Flush(done),
                    };
                    if enc_tx.send(out).is_err() {
                        break;
                    }
                }
                Ok(())
            })?;
        let m = meter.clone();
        let mut writer = writer;
        let sender = std::thread::Builder::new()
            .name("handoff-send".into())
            .spawn(move || {
                for e in enc_rx {
                    match e {
                        Encoded::Frame(f) => {
                            m.started.get_or_init(Instant::now);
                            writer.write_encoded(&f)?;
                            m.written.fetch_add(f.len() as u64, Ordering::Relaxed);
                        }
                        Encoded::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                Ok(writer)
            })?;
        Ok(Pipeline {
            jobs: Some(jobs),
            encoder: Some(encoder),
            sender: Some(sender),
            meter,
            finished: false,
        })
    }

    /// Queues `msg` (compressed as `codec` says, or as the link suggests).
    fn send(&mut self, msg: Message, codec: Option<Codec>) -> Result<(), SendError> {
        let ok = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Job::Frame(msg, codec)).is_ok());
        if ok {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// Waits until everything queued so far is written to the socket.
    fn flush(&mut self) -> Result<(), SendError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let ok = self
            .jobs
            .as_ref()
            .is_some_and(|j| j.send(Job::Flush(tx)).is_ok());
        if ok && rx.recv().is_ok() {
            Ok(())
        } else {
            Err(self.failure())
        }
    }

    /// Why a thread stopped.
    fn failure(&mut self) -> SendError {
        self.jobs = None;
        let enc = self.encoder.take().map(|h| h.join());
        let snd = self.sender.take().map(|h| h.join());
        if let Some(Ok(Err(e))) = snd {
            return e.into();
        }
        if let Some(Ok(Err(e))) = enc {
            return e.into();
        }
        SendError::Stream(HandoffError::Io(std::io::Error::other(
            "the handoff's sending threads stopped",
        )))
    }

    /// Writes the rest; returns the writer (its `bytes`: written in all).
    fn finish(mut self) -> Result<FrameWriter<TcpStream>, SendError> {
        self.jobs = None;
        self.finished = true;
        let enc = self.encoder.take().map(|h| h.join());
        let snd = self.sender.take().map(|h| h.join());
        if let Some(Ok(Err(e))) = enc {
            return Err(e.into());
        }
        match snd {
            Some(Ok(Ok(w))) => Ok(w),
            Some(Ok(Err(e))) => Err(e.into()),
            _ => Err(SendError::Stream(HandoffError::Io(std::io::Error::other(
                "the handoff's sending thread panicked",
            )))),
        }
    }

    /// Stops the threads and sends `Abandon` when the connection still takes it.
    fn abandon(mut self, why: &str) {
        self.jobs = None;
        let _ = self.encoder.take().map(|h| h.join());
        if let Some(Ok(Ok(mut w))) = self.sender.take().map(|h| h.join()) {
            let _ = w.write(&Message::Abandon(why.into()), Codec::Raw);
        }
        let _ = self.meter.conn.shutdown(std::net::Shutdown::Both);
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        if !self.finished {
            // A sending thread blocked on a stalled peer returns at once.
            let _ = self.meter.conn.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.encoder.take() {
            let _ = h.join();
        }
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS20: Duration = Duration::from_millis(20);

    #[test]
    fn pauses_when_the_rest_fits_the_budget() {
        // 100 Mbit/s = 12.5 MB/s: 20 ms carry 250 kB.
        let bw = Some(12.5e6);
        assert_eq!(decide(1, &[1 << 20, 200_000], 0, bw, MS20), Decision::Pause);
        assert_eq!(
            decide(1, &[1 << 20, 200_000], 100_000, bw, MS20),
            Decision::Continue
        );
        assert_eq!(
            decide(1, &[1 << 20, 400_000], 0, bw, MS20),
            Decision::Continue
        );
        // A longer budget lets it pause earlier.
        assert_eq!(
            decide(1, &[1 << 20, 400_000], 0, bw, Duration::from_millis(50)),
            Decision::Pause
        );
        // Nothing measured yet: pause only when nothing is left.
        assert_eq!(decide(0, &[0], 0, None, MS20), Decision::Pause);
        assert_eq!(decide(0, &[4096], 0, None, MS20), Decision::Continue);
    }

    #[test]
    fn a_dirty_rate_that_never_converges_is_bounded() {
        let bw = Some(1e6);
        // Shrinking: go on.
        let shrinking: Vec<u64> = (0..8).map(|i| 10_000_000 - i * 1_000_000).collect();
        assert_eq!(decide(7, &shrinking, 0, bw, MS20), Decision::Continue);
        // Flat for STALL_ROUNDS rounds: pause anyway.
        let flat = vec![5_000_000; STALL_ROUNDS as usize + 2];
        assert_eq!(decide(5, &flat, 0, bw, MS20), Decision::PauseAnyway);
        // Never more than MAX_ROUNDS.
        let mut long: Vec<u64> = (0..=MAX_ROUNDS as u64).map(|i| 1 << (40 - i)).collect();
        long.push(1 << 20);
        assert_eq!(
            decide(MAX_ROUNDS, &long, 0, bw, MS20),
            Decision::PauseAnyway
        );
    }

    #[test]
    fn codec_follows_the_link() {
        let z = Some(300e6);
        assert_eq!(choose_codec(None, z), Codec::Zstd(1));
        assert_eq!(choose_codec(Some(1e9), z), Codec::Raw, "loopback / 10 GbE");
        assert_eq!(choose_codec(Some(125e6), z), Codec::Zstd(1), "1 Gbit/s");
        assert_eq!(choose_codec(Some(3e6), z), Codec::Zstd(3), "25 Mbit/s");
        assert_eq!(choose_codec(Some(3e6), None), Codec::Zstd(1));
    }

    /// The next `n` frames from `peer`, each a page batch within a 4 MiB guest.
    fn read_batches(peer: TcpStream, n: usize) -> Vec<Pages> {
        let mut r = FrameReader::new(peer);
        (0..n)
            .map(|_| {
                let Message::Pages(p) = r.read().unwrap() else {
                    panic!("pages expected")
                };
                p.check(1024).unwrap();
                p
            })
            .collect()
    }

    /// A pipeline writing to a local TCP connection, and the connection's other end.
    fn local_pipeline() -> (Pipeline, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        let pipe = Pipeline::start(FrameWriter::new(conn.try_clone().unwrap()), conn).unwrap();
        (pipe, peer)
    }

    /// Pages sent through a real pipeline to a local reader: zero pages, data, a copy of an
    /// earlier page, and no copy of a page whose content the target no longer holds.
    #[test]
    fn pages_dedup_only_against_what_the_target_holds() {
        use vm_memory::{Bytes, GuestAddress};
        let (mut pipe, peer) = local_pipeline();
        let mem = crate::vstate::memory::create_guest_memory(4).unwrap();
        let at = |p: u64| GuestAddress(p * PAGE as u64);
        mem.write_slice(&[7u8; PAGE], at(1)).unwrap();
        mem.write_slice(&[7u8; PAGE], at(2)).unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-send-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("base"), vec![0u8; 4 << 20]).unwrap();
        let base = File::open(dir.join("base")).unwrap();
        let index = dirty::BaseIndex::build(&base, 1024).unwrap();
        let mut ps = PageSender::new(dirty::mem_pages(&mem), index);
        // Batch 1: pages 1 (data) and 3 (zero, while the base is zero too: Base).
        ps.send_pages(&mem, &base, [1, 3].into_iter(), &mut pipe)
            .unwrap();
        // Batch 2: page 2 has page 1's content.
        ps.send_pages(&mem, &base, [2].into_iter(), &mut pipe)
            .unwrap();
        // Page 1 changes and is sent again; page 5 gets its old content: page 2 is the
        // source now (the target still holds it), never page 1.
        mem.write_slice(&[8u8; PAGE], at(1)).unwrap();
        mem.write_slice(&[7u8; PAGE], at(5)).unwrap();
        ps.send_pages(&mem, &base, [1].into_iter(), &mut pipe)
            .unwrap();
        ps.send_pages(&mem, &base, [5].into_iter(), &mut pipe)
            .unwrap();
        pipe.finish().unwrap();
        let runs: Vec<Vec<_>> = read_batches(peer, 4)
            .iter()
            .map(|p| p.runs.iter().map(|r| (r.first, r.fill)).collect())
            .collect();
        assert_eq!(
            runs,
            [
                vec![(1, Fill::Data), (3, Fill::Base)],
                vec![(2, Fill::Copy(1))],
                vec![(1, Fill::Data)],
                vec![(5, Fill::Copy(2))],
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pages equal to the base's pages elsewhere go out as `BaseAt` (a run of them as one)
    /// and rebuild the right bytes; a hash hit on different bytes (a collision stand-in) is
    /// sent as data; a page already sent is a `Copy` before it is a `BaseAt`.
    #[test]
    fn pages_dedup_against_the_base_elsewhere() {
        use vm_memory::{Bytes, GuestAddress};
        let (mut pipe, peer) = local_pipeline();
        let mem = crate::vstate::memory::create_guest_memory(4).unwrap();
        let at = |p: u64| GuestAddress(p * PAGE as u64);
        let page = |b: u8| vec![b; PAGE];
        // The base: pages 10 and 11 hold 9s and 10s, page 12 holds 5s; the rest is a hole.
        let dir = std::env::temp_dir().join(format!("vmm-send-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base_file = File::create(dir.join("base")).unwrap();
        base_file.set_len(4 << 20).unwrap();
        for (p, b) in [(10u64, 9u8), (11, 10), (12, 5)] {
            base_file.write_all_at(&page(b), p * PAGE as u64).unwrap();
        }
        let base = File::open(dir.join("base")).unwrap();
        let index = dirty::BaseIndex::build(&base, 1024).unwrap();
        assert_eq!(index.len(), 3, "the hole and zero pages are not indexed");
        // A collision stand-in: 6s hash to the base's page 12 (which holds 5s).
        let index = index.with_entry(xxh3_128(&page(6)), 12);
        let mut ps = PageSender::new(dirty::mem_pages(&mem), index);
        mem.write_slice(&page(9), at(1)).unwrap();
        mem.write_slice(&page(10), at(2)).unwrap();
        mem.write_slice(&page(6), at(3)).unwrap();
        ps.send_pages(&mem, &base, [1, 2, 3].into_iter(), &mut pipe)
            .unwrap();
        // Page 4 gets page 3's content: a copy of what the target holds.
        mem.write_slice(&page(6), at(4)).unwrap();
        ps.send_pages(&mem, &base, [4].into_iter(), &mut pipe)
            .unwrap();
        pipe.finish().unwrap();

        let base_bytes = std::fs::read(dir.join("base")).unwrap();
        let mut image = base_bytes.clone();
        let mut runs = Vec::new();
        for p in read_batches(peer, 2) {
            let mut data = p.data.chunks_exact(PAGE);
            for run in &p.runs {
                for i in 0..u64::from(run.count) {
                    let to = ((run.first + i) as usize) * PAGE;
                    let from = |s: u64| ((s + i) as usize) * PAGE;
                    let bytes = match run.fill {
                        Fill::Data => data.next().unwrap().to_vec(),
                        Fill::Zero => page(0),
                        Fill::Base => base_bytes[to..to + PAGE].to_vec(),
                        Fill::BaseAt(s) => base_bytes[from(s)..from(s) + PAGE].to_vec(),
                        Fill::Copy(s) => image[from(s)..from(s) + PAGE].to_vec(),
                    };
                    image[to..to + PAGE].copy_from_slice(&bytes);
                }
            }
            runs.push(
                p.runs
                    .iter()
                    .map(|r| (r.first, r.count, r.fill))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            runs,
            [
                vec![(1, 2, Fill::BaseAt(10)), (3, 1, Fill::Data)],
                vec![(4, 1, Fill::Copy(3))],
            ]
        );
        for p in 1..=4u64 {
            let mut want = page(0);
            dirty::read_page(&mem, p, &mut want);
            let s = p as usize * PAGE;
            assert!(image[s..s + PAGE] == want[..], "page {p} rebuilt wrong");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_merge_like_pages_only() {
        let r = PageRun {
            first: 4,
            count: 2,
            fill: Fill::Copy(10),
        };
        assert!(extends(&r, Fill::Copy(12)));
        assert!(!extends(&r, Fill::Copy(13)));
        assert!(!extends(&r, Fill::Data));
    }
}
