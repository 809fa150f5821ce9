//! The target of a handoff (`vmm receive`): one connection accepted on a listening socket,
//! its stream ([`format::handoff`]) checked and applied into guest memory, and what a restore
//! needs handed to `builder::build_from_handoff`.
//!
//! ```text
//! Receiver::bind     base manifest read, port bound (the caller reports Listening)
//! Receiver::receive  one connection accepted before the deadline; the listener closed
//!                    preamble: session token (constant time), then base id ─▶ Refuse
//!                    Start: RAM and disk size equal the base's, vCPUs fit    ─▶ Refuse
//!                    KVM opened, the base's RAM mapped MAP_PRIVATE, the VM
//!                    created over it (off the critical path of the pause)    ─▶ Accept
//!                    Pages → guest memory, Disk → δ blocks (later ones win),
//!                    State → MachineState (once), until Complete, whose totals
//!                    must match what arrived                                 ─▶ Failed on
//!                                                                               any error
//! Received           Incoming (for the builder) + Link (Resumed, or Failed)
//! Link::resumed      Resumed sent once the VM runs; then the source's end of the stream
//!                    is its release of the VM: end of file = the VM lives here; Abandon,
//!                    a reset or the timeout = the source kept it, the caller stops it here
//! ```
//!
//! The commit rule: the source stops its VM only on `Resumed`, and the target keeps its VM
//! only once the source closed the connection after `Resumed` (a source that did not get
//! `Resumed` in time sends `Abandon` if it can before closing). A link cut after `Resumed` was
//! written but before it arrived thus ends with the VM on the source alone. The one window
//! left: a source that times out waiting for `Resumed` and closes without sending `Abandon`
//! while the target's `Resumed` is in flight would leave the VM running on both sides.
//!
//! Every read has an idle timeout, so a stalled source does not hold the target. Nothing here
//! runs a vCPU: the builder restores only once `Complete` arrived and every check passed, and
//! memory of an unfinished stream is dropped with the error (the base is mapped privately and
//! never written).
//!
//! `Copy(src)` runs are applied page by page in order, from guest memory as the stream left
//! it so far; `Base` and `BaseAt` read the base's memory file, whatever the stream wrote over
//! those pages before.

use std::collections::BTreeMap;
use std::io::{BufReader, ErrorKind};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use format::base::{self, Manifest};
use format::handoff::{
    Codec, Fill, FrameReader, FrameWriter, HandoffError, Message, Pages, Refusal, RefuseKind,
    Resumed, Start, DISK_BLOCK,
};
use format::mapped::Mapped;
use format::state::{self, StateError};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::image_offset_to_gpa as locate;
use crate::snapshot::state::MachineState;
use crate::synthesis::eager::{write_image, WriteFault};
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory;
use crate::vstate::vm::Vm;

const PAGE: u64 = format::PAGE_SIZE as u64;

/// How long the target waits for the source to connect, and for each read of its stream,
/// unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the answer to the source (Refuse, Failed) may take to write.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a handoff was not received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The base directory is unusable.
    #[error("cannot use the base '{0}'")]
    Base(PathBuf, #[source] base::BaseError),
    /// The listening socket could not be set up.
    #[error("cannot listen for a handoff on {0}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// Nobody connected in time.
    #[error("no source connected within {0} ms")]
    NoSource(u128),
    /// Accepting the connection failed.
    #[error("cannot accept the source's connection")]
    Accept(#[source] std::io::Error),
    /// The source sent nothing for too long.
    #[error("the source sent nothing for {0} ms")]
    Stalled(u128),
    /// The stream broke: link cut, bad frame, checksum or sequence error.
    #[error("the handoff stream failed")]
    Stream(#[source] HandoffError),
    /// This target refused the handoff (the source was told why).
    #[error("refused the handoff: {reason}")]
    Refused {
        /// Its class, as sent to the source.
        kind: RefuseKind,
        /// Why.
        reason: String,
    },
    /// The source called the handoff off.
    #[error("the source abandoned the handoff: {0}")]
    Abandoned(String),
    /// A frame that does not belong where it arrived, or totals that disagree.
    #[error("the handoff stream is inconsistent: {0}")]
    Inconsistent(String),
    /// Guest memory could not be written.
    #[error("cannot write guest memory at image offset {0:#x}")]
    Write(u64),
    /// The received machine state does not decode.
    #[error("the handoff's machine state is unusable")]
    State(#[source] StateError),
    /// The source neither released the VM nor abandoned the handoff after `Resumed`.
    #[error("the source did not release the VM within {0} ms of Resumed")]
    Unreleased(u128),
    /// Sending to the source failed.
    #[error("cannot answer the source")]
    Answer(#[source] HandoffError),
}

/// What to receive, and where.
#[derive(Clone, Debug)]
pub struct ReceiveConfig {
    /// The base directory the handed-off VM was made from.
    pub base: PathBuf,
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// The session token the source must present.
    pub token: [u8; 32],
    /// How long to wait for the connection, and for each read of the stream.
    pub timeout: Duration,
    /// The KVM device node.
    pub kvm_path: PathBuf,
}

/// A bound listener for one handoff, with its base read.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiveConfig,
    manifest: Manifest,
    listener: TcpListener,
    addr: SocketAddr,
}

/// What a handoff delivered, ready for `builder::build_from_handoff`.
pub struct Incoming {
    /// The KVM handle the VM was created with.
    pub kvm: KvmContext,
    /// The VM, created over `memory` before the pages arrived (no vCPU yet).
    pub vm: Vm,
    /// Guest memory: the base's RAM mapped privately with every received page applied.
    pub memory: GuestMemoryMmap,
    /// The machine state, checked against `Start` and the base.
    pub state: MachineState,
    /// The disk δ's blocks, by block number.
    pub disk_blocks: Vec<(u64, Vec<u8>)>,
    /// The base's disk, when it has one: the δ goes on top of it.
    pub base_disk: Option<PathBuf>,
    /// The base the VM runs on: a handoff onwards sends its δ against it.
    pub base: crate::handoff::link::HandoffBase,
    /// When `Complete` arrived (the restore time runs from here).
    pub completed: Instant,
}

/// The connection to the source once the stream is complete: the target's last answer.
#[derive(Debug)]
pub struct Link {
    input: FrameReader<BufReader<TcpStream>>,
    out: FrameWriter<TcpStream>,
    timeout: Duration,
}

/// What a received handoff cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReceiveStats {
    /// Bytes read, preamble and frame headers included.
    pub bytes: u64,
    /// `Pages` frames.
    pub page_batches: u64,
    /// Guest pages applied (data, zero, base and copies).
    pub pages: u64,
    /// Disk δ records received (a block sent twice counts twice).
    pub disk_blocks: u64,
    /// From the connection to `Complete`.
    pub elapsed: Duration,
}

/// A complete, checked handoff.
pub struct Received {
    /// What the builder restores.
    pub incoming: Incoming,
    /// Where `Resumed` (or `Failed`) goes.
    pub link: Link,
    /// What it cost.
    pub stats: ReceiveStats,
}

impl Receiver {
    /// Reads the base's manifest and binds `cfg.listen`.
    pub fn bind(cfg: ReceiveConfig) -> Result<Receiver, ReceiveError> {
        let manifest =
            Manifest::load(&cfg.base).map_err(|e| ReceiveError::Base(cfg.base.clone(), e))?;
        let listener =
            TcpListener::bind(cfg.listen).map_err(|e| ReceiveError::Listen(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ReceiveError::Listen(cfg.listen, e))?;
        Ok(Receiver {
            cfg,
            manifest,
            listener,
            addr,
        })
    }

    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts one connection (the listener is closed then: a second one is refused) and
    /// receives the handoff on it. On an error the source has been told (when the connection
    /// still works) and nothing received is kept.
    pub fn receive(self) -> Result<Received, ReceiveError> {
        let Receiver {
            cfg,
            manifest,
            listener,
            ..
        } = self;
        let conn = accept_one(listener, cfg.timeout)?;
        let t0 = Instant::now();
        let input = conn.try_clone().map_err(ReceiveError::Accept)?;
        let mut session = Session {
            cfg: &cfg,
            manifest: &manifest,
            input: FrameReader::new(BufReader::with_capacity(256 << 10, input)),
            out: FrameWriter::new(conn),
        };
        let (incoming, mut stats) = session.run()?;
        stats.bytes = session.input.bytes;
        stats.elapsed = t0.elapsed();
        Ok(Received {
            incoming,
            link: Link {
                input: session.input,
                out: session.out,
                timeout: cfg.timeout,
            },
            stats,
        })
    }
}

/// Waits up to `timeout` for one connection, then closes `listener`.
fn accept_one(listener: TcpListener, timeout: Duration) -> Result<TcpStream, ReceiveError> {
    listener
        .set_nonblocking(true)
        .map_err(ReceiveError::Accept)?;
    let deadline = Instant::now() + timeout;
    let conn = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReceiveError::NoSource(timeout.as_millis()));
        }
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: polls one valid pollfd for at most `ms` milliseconds.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(ReceiveError::Accept(e));
        }
        match listener.accept() {
            Ok((conn, peer)) => {
                tracing::debug!(%peer, "handoff connection accepted");
                break conn;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(ReceiveError::Accept(e)),
        }
    };
    drop(listener);
    let setup = |c: &TcpStream| -> std::io::Result<()> {
        c.set_nonblocking(false)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        c.set_nodelay(true)
    };
    setup(&conn).map_err(ReceiveError::Accept)?;
    Ok(conn)
}

/// Equal contents, in time independent of where they differ.
fn same_token(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The first 12 hex digits of an id.
fn short(id: &[u8; 32]) -> String {
    let mut s = base::hex(id);
    s.truncate(12);
    s
}

/// One handoff on one connection.
struct Session<'a> {
    cfg: &'a ReceiveConfig,
    manifest: &'a Manifest,
    input: FrameReader<BufReader<TcpStream>>,
    out: FrameWriter<TcpStream>,
}

/// What arrived after `Accept`.
#[derive(Default)]
struct Arrived {
    disk: BTreeMap<u64, Vec<u8>>,
    state: Option<MachineState>,
    stats: ReceiveStats,
}

impl Session<'_> {
    fn run(&mut self) -> Result<(Incoming, ReceiveStats), ReceiveError> {
        let (start, kvm, vm, memory) = self.handshake()?;
        match self.transfer(&start, &memory) {
            Ok((arrived, completed)) => {
                let Arrived { disk, state, stats } = arrived;
                let base_disk = self
                    .manifest
                    .disk_bytes
                    .map(|_| self.cfg.base.join(base::DISK));
                let incoming = Incoming {
                    kvm,
                    vm,
                    memory,
                    state: state.expect("transfer ends with a state"),
                    disk_blocks: disk.into_iter().collect(),
                    base_disk,
                    base: crate::handoff::link::HandoffBase {
                        memory: self.cfg.base.join(base::MEMORY),
                        id: self.manifest.id_bytes(),
                        image: None,
                    },
                    completed,
                };
                Ok((incoming, stats))
            }
            Err(e) => {
                if !matches!(e, ReceiveError::Abandoned(_)) {
                    self.answer(&Message::Failed(Refusal {
                        kind: RefuseKind::Other,
                        reason: crate::error::message(&e),
                    }));
                }
                Err(e)
            }
        }
    }

    /// Sends `msg` to the source, best effort (the link may be what failed).
    fn answer(&mut self, msg: &Message) {
        let _ = self.out.get_ref().set_write_timeout(Some(ANSWER_TIMEOUT));
        if let Err(e) = self.out.write(msg, Codec::Raw) {
            tracing::debug!("cannot answer the source: {e}");
        }
    }

    /// Refuses the handoff with `kind` and `reason`.
    fn refuse(&mut self, kind: RefuseKind, reason: String) -> ReceiveError {
        self.answer(&Message::Refuse(Refusal {
            kind,
            reason: reason.clone(),
        }));
        ReceiveError::Refused { kind, reason }
    }

    /// A read error: the link (cut or stalled), or a bad frame.
    fn stream_error(&self, e: HandoffError) -> ReceiveError {
        match &e {
            HandoffError::Io(io)
                if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                ReceiveError::Stalled(self.cfg.timeout.as_millis())
            }
            _ => ReceiveError::Stream(e),
        }
    }

    /// Preamble and `Start` checked, KVM opened, base RAM mapped, the VM created, `Accept`
    /// sent.
    fn handshake(&mut self) -> Result<(Start, KvmContext, Vm, GuestMemoryMmap), ReceiveError> {
        let preamble = match self.input.read_preamble() {
            Ok(p) => p,
            Err(e @ HandoffError::Io(_)) => return Err(self.stream_error(e)),
            Err(e) => return Err(self.refuse(RefuseKind::Other, crate::error::message(&e))),
        };
        // The token first: a peer without it learns nothing about this appliance's bases.
        if !same_token(&preamble.token, &self.cfg.token) {
            return Err(self.refuse(
                RefuseKind::Token,
                "the session token is not the one this target issued for the handoff".into(),
            ));
        }
        let id = self.manifest.id_bytes();
        if preamble.base_id != id {
            let why = format!(
                "the handoff's base {}… is not the base at {} ({}…)",
                short(&preamble.base_id),
                self.cfg.base.display(),
                short(&id)
            );
            return Err(self.refuse(RefuseKind::ForeignBase, why));
        }
        let start = match self.input.read() {
            Ok(Message::Start(s)) => s,
            Ok(m) => {
                let why = format!("the stream begins with {:?}, not Start", m.kind());
                return Err(self.refuse(RefuseKind::Other, why));
            }
            Err(e @ HandoffError::Io(_)) => return Err(self.stream_error(e)),
            Err(e) => return Err(self.refuse(RefuseKind::Other, crate::error::message(&e))),
        };
        let m = self.manifest;
        let base_disk = m.disk_bytes.unwrap_or(0);
        let shape = if start.mem_mib != m.mem_mib {
            Some(format!(
                "the VM has {} MiB of RAM, the base at {} {} MiB",
                start.mem_mib,
                self.cfg.base.display(),
                m.mem_mib
            ))
        } else if start.disk_bytes != base_disk {
            Some(format!(
                "the VM's disk has {} bytes, the base's at {} {}",
                start.disk_bytes,
                self.cfg.base.display(),
                base_disk
            ))
        } else if start.vcpus == 0 || start.vcpus > u32::from(crate::config::MAX_VCPUS) {
            Some(format!("the VM has {} vCPUs", start.vcpus))
        } else {
            None
        };
        if let Some(why) = shape {
            return Err(self.refuse(RefuseKind::Shape, why));
        }
        let kvm = match KvmContext::open(&self.cfg.kvm_path) {
            Ok(k) => k,
            Err(e) => return Err(self.refuse(RefuseKind::Other, crate::error::message(&e))),
        };
        if start.vcpus as usize > kvm.max_vcpus {
            let why = format!(
                "the VM has {} vCPUs, KVM allows {} here",
                start.vcpus, kvm.max_vcpus
            );
            return Err(self.refuse(RefuseKind::Shape, why));
        }
        let image = self.cfg.base.join(base::MEMORY);
        let memory = match memory::map_image(&image, m.mem_mib) {
            Ok(mem) => mem,
            Err(e) => return Err(self.refuse(RefuseKind::Other, crate::error::message(&e))),
        };
        // Its memory slots are the mapping the pages are written into: the guest sees them.
        let vm = match Vm::new(&kvm, &memory) {
            Ok(vm) => vm,
            Err(e) => return Err(self.refuse(RefuseKind::Other, crate::error::message(&e))),
        };
        self.out
            .write(&Message::Accept, Codec::Raw)
            .map_err(ReceiveError::Answer)?;
        // While the first pages travel: the base's pages mapped up front, as a synthesis does,
        // so the resumed guest's first touches of pages it did not change cost no host fault.
        memory::prefault_image(&image, &memory, &[]);
        Ok((start, kvm, vm, memory))
    }

    /// Frames until `Complete`: pages applied, disk blocks and the state kept.
    fn transfer(
        &mut self,
        start: &Start,
        mem: &GuestMemoryMmap,
    ) -> Result<(Arrived, Instant), ReceiveError> {
        let image = self.cfg.base.join(base::MEMORY);
        let base_ro = Mapped::open(&image).map_err(|e| {
            ReceiveError::Base(
                self.cfg.base.clone(),
                base::BaseError::Missing(self.cfg.base.clone(), base::MEMORY, e),
            )
        })?;
        let guest = Guest {
            mem,
            mem_bytes: self.manifest.mem_mib << 20,
            base: base_ro.bytes(),
        };
        let mem_pages = self.manifest.mem_mib << 8;
        let disk_blocks = start.disk_bytes / DISK_BLOCK as u64;
        let mut a = Arrived::default();
        loop {
            let msg = self.input.read().map_err(|e| self.stream_error(e))?;
            match msg {
                Message::Pages(p) => {
                    p.check(mem_pages).map_err(ReceiveError::Stream)?;
                    a.stats.pages += guest.apply(&p)?;
                    a.stats.page_batches += 1;
                }
                Message::Disk(blocks) => {
                    for (n, data) in blocks {
                        if n >= disk_blocks {
                            return Err(ReceiveError::Inconsistent(format!(
                                "disk block {n} lies beyond the VM's {}-byte disk",
                                start.disk_bytes
                            )));
                        }
                        a.disk.insert(n, data);
                        a.stats.disk_blocks += 1;
                    }
                }
                Message::State(bytes) => {
                    if a.state.is_some() {
                        return Err(ReceiveError::Inconsistent("a second machine state".into()));
                    }
                    let st: MachineState =
                        state::decode(state::Kind::Machine, &bytes).map_err(ReceiveError::State)?;
                    check_state(&st, start, self.manifest)?;
                    a.state = Some(st);
                }
                Message::Complete(c) => {
                    let completed = Instant::now();
                    if a.state.is_none() {
                        return Err(ReceiveError::Inconsistent(
                            "Complete arrived before the machine state".into(),
                        ));
                    }
                    if c.page_batches != a.stats.page_batches
                        || c.disk_blocks != a.stats.disk_blocks
                    {
                        return Err(ReceiveError::Inconsistent(format!(
                            "the source sent {} page batches and {} disk blocks, {} and {} arrived",
                            c.page_batches,
                            c.disk_blocks,
                            a.stats.page_batches,
                            a.stats.disk_blocks
                        )));
                    }
                    return Ok((a, completed));
                }
                Message::Abandon(why) => return Err(ReceiveError::Abandoned(why)),
                Message::Start(_) => {
                    return Err(ReceiveError::Inconsistent("a second Start".into()))
                }
                m @ (Message::Accept
                | Message::Refuse(_)
                | Message::Resumed(_)
                | Message::Failed(_)) => {
                    return Err(ReceiveError::Inconsistent(format!(
                        "the source sent a target's {:?} frame",
                        m.kind()
                    )))
                }
            }
        }
    }
}

/// The received state against `Start` and the base.
fn check_state(st: &MachineState, start: &Start, m: &Manifest) -> Result<(), ReceiveError> {
    let bad = |why: String| {
        Err(ReceiveError::Inconsistent(format!(
            "the machine state: {why}"
        )))
    };
    if st.mem_mib != m.mem_mib {
        return bad(format!(
            "{} MiB of RAM, the base has {}",
            st.mem_mib, m.mem_mib
        ));
    }
    if st.vcpus.len() as u64 != u64::from(start.vcpus) {
        return bad(format!(
            "{} vCPUs, Start announced {}",
            st.vcpus.len(),
            start.vcpus
        ));
    }
    if st.serial.in_buffer.len() > 64 {
        return bad("the serial FIFO holds more than 64 bytes".into());
    }
    let disk = st
        .virtio
        .iter()
        .find_map(|s| s.disk.as_ref())
        .map_or(0, |d| d.size);
    if disk != start.disk_bytes {
        return bad(format!(
            "a {disk}-byte disk, Start announced {}",
            start.disk_bytes
        ));
    }
    Ok(())
}

/// Guest memory the stream is applied to, with the base's memory file for base pages.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    mem_bytes: u64,
    base: &'a [u8],
}

impl Guest<'_> {
    /// Applies a checked batch; returns the pages it covers.
    fn apply(&self, p: &Pages) -> Result<u64, ReceiveError> {
        let mut data = p.data.as_slice();
        let mut pages = 0;
        for r in &p.runs {
            let count = u64::from(r.count);
            let len = (count * PAGE) as usize;
            let at = r.first * PAGE;
            match r.fill {
                Fill::Data => {
                    let (d, rest) = data.split_at_checked(len).ok_or(ReceiveError::Write(at))?;
                    self.write_at(at, d)?;
                    data = rest;
                }
                Fill::Zero => {
                    let zeros = vec![0u8; len.min(1 << 20)];
                    let mut done = 0;
                    while done < len {
                        let n = zeros.len().min(len - done);
                        self.write_at(at + done as u64, &zeros[..n])?;
                        done += n;
                    }
                }
                Fill::Base => self.write_at(at, self.base_pages(r.first, count)?)?,
                Fill::BaseAt(src) => self.write_at(at, self.base_pages(src, count)?)?,
                Fill::Copy(src) => {
                    let mut page = vec![0u8; PAGE as usize];
                    for i in 0..count {
                        self.read_at((src + i) * PAGE, &mut page)?;
                        self.write_at(at + i * PAGE, &page)?;
                    }
                }
            }
            pages += count;
        }
        Ok(pages)
    }

    /// `count` pages of the base's memory from page `first`.
    fn base_pages(&self, first: u64, count: u64) -> Result<&[u8], ReceiveError> {
        let s = (first * PAGE) as usize;
        self.base
            .get(s..s + (count * PAGE) as usize)
            .ok_or(ReceiveError::Write(first * PAGE))
    }

    /// Writes `data` at image offset `off`, split where the RAM layout jumps over the gap;
    /// pieces of two pages or more are faulted in for writing in one call first.
    fn write_at(&self, off: u64, data: &[u8]) -> Result<(), ReceiveError> {
        write_image(self.mem, self.mem_bytes, off, data, 2 * PAGE as usize).map_err(|f| match f {
            WriteFault::Outside(o) | WriteFault::Access { off: o, .. } => ReceiveError::Write(o),
        })
    }

    /// Reads one page at image offset `off` (pages never straddle the gap).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), ReceiveError> {
        let (gpa, _) = locate(self.mem_bytes, off).ok_or(ReceiveError::Write(off))?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| ReceiveError::Write(off))
    }
}

impl Link {
    /// Tells the source the VM runs here (`restore_us`: from `Complete` to running vCPUs),
    /// then waits for the source to let go of it: the source closes the connection once it
    /// has read `Resumed` and released its copy. `Abandon` instead (the source did not get
    /// `Resumed` in time and kept its VM), a reset, or no end within the timeout: an error,
    /// and the caller must stop the VM here — the source keeps it.
    pub fn resumed(mut self, restore_us: u64) -> Result<(), ReceiveError> {
        self.out
            .write(&Message::Resumed(Resumed { restore_us }), Codec::Raw)
            .map_err(ReceiveError::Answer)?;
        let _ = self.out.get_ref().shutdown(Shutdown::Write);
        match self.input.read() {
            Err(HandoffError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof => Ok(()),
            Err(HandoffError::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                Err(ReceiveError::Unreleased(self.timeout.as_millis()))
            }
            Err(e) => Err(ReceiveError::Stream(e)),
            Ok(Message::Abandon(why)) => Err(ReceiveError::Abandoned(why)),
            Ok(m) => Err(ReceiveError::Inconsistent(format!(
                "the source sent {:?} after Resumed",
                m.kind()
            ))),
        }
    }

    /// Tells the source the handoff failed here after all (best effort).
    pub fn failed(mut self, e: &(dyn std::error::Error + 'static)) {
        let _ = self.out.get_ref().set_write_timeout(Some(ANSWER_TIMEOUT));
        let msg = Message::Failed(Refusal {
            kind: RefuseKind::Other,
            reason: crate::error::message(e),
        });
        if let Err(e) = self.out.write(&msg, Codec::Raw) {
            tracing::debug!("cannot tell the source the handoff failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::handoff::PageRun;

    #[test]
    fn tokens_compare_whole() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(same_token(&a, &b));
        b[31] ^= 1;
        assert!(!same_token(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!same_token(&a, &b));
    }

    #[test]
    fn pages_land_where_the_image_offsets_say() {
        let mem = memory::create_guest_memory(4).unwrap();
        let mut base = vec![0u8; 4 << 20];
        base[3 * PAGE as usize] = 0x33;
        base[5 * PAGE as usize] = 0x55;
        let g = Guest {
            mem: &mem,
            mem_bytes: 4 << 20,
            base: &base,
        };
        let mut data = vec![0u8; 2 * PAGE as usize];
        data[0] = 1;
        data[PAGE as usize] = 2;
        let p = Pages {
            runs: vec![
                PageRun::new(10, 2, Fill::Data),
                PageRun::new(20, 2, Fill::Copy(10)),
                PageRun::new(30, 1, Fill::BaseAt(5)),
                PageRun::new(3, 1, Fill::Base),
                PageRun::new(11, 1, Fill::Zero),
            ],
            data,
        };
        p.check(1024).unwrap();
        assert_eq!(g.apply(&p).unwrap(), 7);
        let at = |page: u64| {
            let mut b = [0u8; 1];
            mem.read_slice(&mut b, GuestAddress(page * PAGE)).unwrap();
            b[0]
        };
        assert_eq!(
            [at(10), at(11), at(20), at(21), at(30), at(3)],
            [1, 0, 1, 2, 0x55, 0x33]
        );
    }
}
