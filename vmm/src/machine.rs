//! A running VM: its vCPU threads, devices and the event loop that serves them.
//!
//! The event loop (epoll) waits for:
//! - the exit eventfd (a vCPU or device decided the VM stops),
//! - standard input (bytes for the guest: its virtio console when it has one, else COM1),
//! - the "input drained" eventfd (room for more input: COM1's receive FIFO emptied, or the
//!   console delivered input it had refused),
//! - a signalfd for SIGINT/SIGTERM/SIGHUP (stop cleanly),
//! - the control socket's eventfd (requests read by its threads, answered here; see
//!   [`crate::control`]).
//!
//! Call-order contract: the vCPU threads are stopped and joined before guest memory and the
//! VM fd are released (field order of [`Machine`]).

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::Control;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::slot::{Slot, SlotKind};
use crate::devices::virtio::worker::DeviceWorker;
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::snapshot::{self, MachineState, SnapshotError, SnapshotInfo};
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Errors of machine-level operations.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A vCPU request failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A VM request failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Guest memory is still being filled from an overlay and could not be completed.
    #[error("guest memory is incomplete: {0}")]
    Lazy(String),
}

/// How often the event loop replays coalesced guest writes no vCPU exit has drained and
/// writes out serial output no register read or line end has (for guests that print without
/// either).
pub const OUTPUT_FLUSH_MS: i32 = 20;

/// Most input for the guest buffered in the VMM (beyond what its serial port or console holds)
/// before it stops reading stdin.
const PENDING_INPUT_MAX: usize = 64 * 1024;

const TOKEN_EXIT: u64 = 0;
const TOKEN_STDIN: u64 = 1;
const TOKEN_DRAINED: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_API: u64 = 4;

/// SIGINT, SIGTERM and SIGHUP, blocked and read through a signalfd.
#[derive(Debug)]
pub struct StopSignals {
    fd: OwnedFd,
}

impl StopSignals {
    /// Blocks the stop signals in the calling thread (threads spawned later inherit that) and
    /// opens a signalfd for them.
    pub fn block() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; these calls only modify it or the thread's mask.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new signalfd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(StopSignals { fd })
    }

    /// Reads one pending signal number, if any.
    fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: we read at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

/// A running VM.
pub struct Machine {
    // Field order is drop order: vCPU threads end before the VM and its memory go away.
    vcpus: Vec<VcpuHandle>,
    /// Lazy synthesis still filling guest memory (its threads end before the memory goes).
    lazy: Option<crate::lazy::LazyFill>,
    vm: Vm,
    mem: GuestMemoryMmap,
    serial: Arc<Mutex<SerialDevice>>,
    input_drained: EventFd,
    exit: Arc<ExitNotifier>,
    signals: StopSignals,
    /// Input from stdin for the guest's console or serial port (none with `--no-stdin`).
    input: Option<SerialInput>,
    paused: std::sync::atomic::AtomicBool,
    /// Coalesced guest writes, with the buses they go to, drained here when no vCPU exits.
    coalesced: Option<(Arc<CoalescedRing>, Bus, Bus)>,
    /// virtio devices, run by their own thread.
    virtio: Arc<Vec<Slot>>,
    devices: Option<DeviceWorker>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Assembles a machine from its built parts (see [`crate::builder`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Vm,
        mem: GuestMemoryMmap,
        vcpus: Vec<VcpuHandle>,
        serial: Arc<Mutex<SerialDevice>>,
        input_drained: EventFd,
        exit: Arc<ExitNotifier>,
        signals: StopSignals,
        input: Option<SerialInput>,
    ) -> Self {
        Machine {
            vcpus,
            lazy: None,
            vm,
            mem,
            serial,
            input_drained,
            exit,
            signals,
            input,
            paused: std::sync::atomic::AtomicBool::new(false),
            coalesced: None,
            virtio: Arc::new(Vec::new()),
            devices: None,
        }
    }

    /// Hands the machine the lazy fill of its memory: fill errors stop the VM, and a
    /// snapshot waits for the fill to complete.
    pub fn set_lazy(&mut self, lazy: crate::lazy::LazyFill) {
        lazy.set_exit(self.exit.clone());
        self.lazy = Some(lazy);
    }

    /// Starts the background fill of guest memory not yet touched (see
    /// [`crate::lazy::LazyFill::start_prefetch`]).
    pub fn start_prefetch(
        &mut self,
        delay: std::time::Duration,
    ) -> Result<(), crate::lazy::LazyError> {
        match self.lazy.as_mut() {
            Some(l) => l.start_prefetch(delay),
            None => Ok(()),
        }
    }

    /// The lazy fill of guest memory, while the machine has one.
    pub fn lazy(&self) -> Option<&crate::lazy::LazyFill> {
        self.lazy.as_ref()
    }

    /// Gives the event loop the coalesced-write ring to drain every
    /// [`OUTPUT_FLUSH_MS`] ms, for guests that write without ever causing an exit.
    pub fn set_coalesced(&mut self, ring: Arc<CoalescedRing>, io_bus: Bus, mmio_bus: Bus) {
        self.coalesced = Some((ring, io_bus, mmio_bus));
    }

    /// The virtio devices the event loop drives and snapshots save.
    pub fn set_virtio(&mut self, slots: Arc<Vec<Slot>>, worker: DeviceWorker) {
        self.virtio = slots;
        self.devices = Some(worker);
    }

    /// Marks the machine as started paused.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Asks the event loop to stop the VM ([`ExitReason::Stopped`]).
    pub fn request_stop(&self) {
        self.exit.notify(ExitReason::Stopped);
    }

    /// The port forwards of the machine's NICs, with the host addresses actually bound.
    pub fn forwards(&self) -> Vec<netback::Forward> {
        self.virtio
            .iter()
            .filter(|s| s.kind == SlotKind::Net)
            .flat_map(|s| s.lock().net().map(|n| n.forwards()).unwrap_or_default())
            .collect()
    }

    /// Closes the NICs' host sockets (port forwards, relayed connections): for a stopped VM.
    fn close_host_network(&self) {
        for s in self.virtio.iter().filter(|s| s.kind == SlotKind::Net) {
            if let Some(n) = s.lock().net_mut() {
                n.close_backend();
            }
        }
    }

    /// Guest RAM in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum::<u64>() >> 20
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Pauses every vCPU (Running → Paused) and waits until all have left `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request_all(VcpuEvent::Pause)?;
        self.paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Resumes every vCPU (Paused → Running).
    pub fn resume(&self) -> Result<(), VcpuError> {
        self.request_all(VcpuEvent::Resume)?;
        self.paused.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn request_all(&self, ev: VcpuEvent) -> Result<(), VcpuError> {
        for v in &self.vcpus {
            v.send(ev)?;
        }
        for v in &self.vcpus {
            v.wait_for(ev)?;
        }
        Ok(())
    }

    /// Writes a snapshot of the machine into `dir` (created if needed). The vCPUs are paused
    /// for it and left paused: call [`Machine::resume`] to go on, or drop the machine.
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<SnapshotInfo, MachineError> {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Io("create", dir.to_owned(), e))?;
        // No device request completes from here until the state is saved: one completing
        // after the vCPUs' and controllers' state was read would raise an interrupt the
        // snapshot misses (its status is saved with the device, and raised again on restore).
        let _still = self.devices.as_ref().map(|d| d.hold());
        self.pause()?;
        // Pages not yet filled would read as missing (and mincore would skip them).
        if let Some(lazy) = &self.lazy {
            lazy.wait(std::time::Duration::from_secs(60))
                .map_err(MachineError::Lazy)?;
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state()?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .save_state();
        let mut virtio = Vec::with_capacity(self.virtio.len());
        for slot in self.virtio.iter() {
            let t = slot.lock();
            let disk = match (t.block(), &slot.disk) {
                (Some(b), Some(info)) => {
                    let d = b.disk();
                    let blocks = d
                        .delta()
                        .delta_blocks()
                        .map(|r| r.map(|(n, data)| (n, data.into_owned())))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| {
                            SnapshotError::Disk(dir.join(snapshot::DISK_DELTA_FILE), e.to_string())
                        })?;
                    snapshot::write_disk_delta(dir, d.size(), blocks)?;
                    Some(info.clone())
                }
                _ => None,
            };
            virtio.push(snapshot::VirtioSlotState {
                index: slot.index,
                kind: slot.kind,
                mmio: t.save_state(),
                disk,
            });
        }
        let memory_bytes_written =
            snapshot::write_memory(&self.mem, &dir.join(snapshot::MEMORY_FILE))?;
        let state = MachineState {
            mem_mib: self.mem_mib(),
            vcpus,
            vm,
            serial,
            virtio,
        };
        let state_bytes = snapshot::write_state(&state, dir)?;
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes_written,
            memory_bytes: state.mem_mib << 20,
        })
    }

    /// Feeds `bytes` to the guest's input: its virtio console when it has one (delivered from
    /// this thread into posted receive buffers, the rest held in the device up to its bound),
    /// else COM1's receive FIFO (as much as it takes now). Returns how many were taken; offer
    /// the rest again later.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let console = self.console();
        // Into a console: not while a snapshot saves the devices, nor while the device thread
        // runs them.
        let _still = console.and(self.devices.as_ref()).map(|d| d.hold());
        deliver_input(&self.serial, console, bytes)
    }

    /// The virtio console, if the machine has one.
    fn console(&self) -> Option<&Slot> {
        self.virtio.iter().find(|s| s.kind == SlotKind::Console)
    }

    /// The exit reason, once the VM has stopped on its own.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Runs the event loop until the VM stops, serving `control`'s socket, then stops the
    /// vCPU threads, reports the exit on `control`'s report channel and returns why.
    pub fn run(mut self, control: &mut Control) -> std::io::Result<ExitReason> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.exit.eventfd().as_raw_fd(), TOKEN_EXIT)?;
        add(self.input_drained.as_raw_fd(), TOKEN_DRAINED)?;
        add(self.signals.fd.as_raw_fd(), TOKEN_SIGNAL)?;
        if let Some(socket) = &control.socket {
            add(socket.event_fd(), TOKEN_API)?;
        }
        let mut input = self.input.take();
        let deliver = |b: &[u8]| self.serial_input(b);
        if let Some(input) = &mut input {
            if !input.eof {
                input.attach_stdin(&epoll)?;
            }
            input.feed(&epoll, &deliver)?;
        }
        let mut events = vec![EpollEvent::default(); 8];
        let reason = 'outer: loop {
            if let Some((ring, io, mmio)) = &self.coalesced {
                if ring.pending() {
                    ring.drain(io, mmio);
                }
            }
            self.serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .flush_output();
            let n = match epoll.wait(OUTPUT_FLUSH_MS, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_EXIT => {
                        let _ = self.exit.eventfd().read();
                        if let Some(r) = self.exit.reason() {
                            break 'outer r;
                        }
                    }
                    TOKEN_STDIN => {
                        if let Some(input) = &mut input {
                            input.read_stdin(&epoll, &deliver)?;
                        }
                    }
                    TOKEN_DRAINED => {
                        let _ = self.input_drained.read();
                        if let Some(input) = &mut input {
                            input.feed(&epoll, &deliver)?;
                        }
                    }
                    TOKEN_API => {
                        if let Some(socket) = &control.socket {
                            socket.serve(&self);
                        }
                    }
                    TOKEN_SIGNAL => {
                        if let Some(sig) = self.signals.read() {
                            tracing::info!(signal = sig, "stopping the VM on signal");
                            self.exit.notify(ExitReason::Signalled(sig));
                        }
                    }
                    _ => {}
                }
            }
        };
        // The supervisor learns of the stop once the guest no longer runs and its ports are
        // closed: before the rest of the shutdown (the lazy fill's fault server may wait
        // up to 50 ms for its next poll) and the release of the VM and its memory (~15 ms in
        // the kernel for a 256 MiB guest).
        if let Some(report) = &mut control.report {
            for v in &mut self.vcpus {
                v.stop();
            }
            self.close_host_network();
            report.exited(reason.exit_code());
        }
        self.shutdown();
        Ok(reason)
    }

    /// Stops and joins every vCPU thread, then flushes serial output.
    pub fn shutdown(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        // The lazy fill next: its userfaultfd closed, a device thread waiting on a page that
        // will never be filled (the fill failed) goes on, reading zeros for a guest that no
        // longer runs, instead of hanging the join below.
        self.lazy = None;
        // Then the device thread (which may hold the last work for a stopped guest).
        self.devices = None;
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush_output();
    }
}

/// Gives `bytes` to the guest: to `console` when there is one, else to COM1's receive FIFO;
/// returns how many were taken.
pub(crate) fn deliver_input(
    serial: &Mutex<SerialDevice>,
    console: Option<&Slot>,
    bytes: &[u8],
) -> usize {
    match console {
        Some(slot) => slot.lock().host_input(bytes),
        None => serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes),
    }
}

/// Input from stdin for the guest (its console, or its serial port), buffered in the VMM while
/// the device cannot take it: COM1's 64-byte FIFO is full, or the console holds as much
/// pending input as it may. The device writes the "input drained" eventfd when it has room
/// again, and the event loop offers the rest then.
#[derive(Debug, Default)]
pub struct SerialInput {
    pending: VecDeque<u8>,
    /// stdin is in the epoll set.
    polling: bool,
    /// stdin reached end of file (or cannot be read).
    eof: bool,
}

impl SerialInput {
    fn stdin_fd() -> RawFd {
        std::io::stdin().as_raw_fd()
    }

    /// Input from stdin, with what stdin already holds given to `deliver` now (the guest's
    /// serial port or console; it returns how many bytes it took). Called before the vCPUs
    /// start: a request written while the VM was being built (a restore or synthesis takes
    /// milliseconds) is there, interrupt raised, when the guest first runs, instead of waiting
    /// for the event loop to start.
    pub fn primed(deliver: &dyn Fn(&[u8]) -> usize) -> Self {
        let mut input = SerialInput::default();
        let mut pfd = libc::pollfd {
            fd: Self::stdin_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without waiting.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) } == 1 && pfd.revents & libc::POLLIN != 0;
        if ready {
            if input.read_once() {
                input.push_to(deliver);
            } else {
                input.eof = true;
            }
        }
        input
    }

    /// Reads what stdin has (one `read`) into `pending`; false at end of input or on error.
    fn read_once(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reads at most `buf.len()` bytes into `buf` from stdin, which poll or epoll
        // reported readable; std's Stdin would add its own buffering, which we do not want.
        let n = unsafe { libc::read(Self::stdin_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        }
        self.pending.extend(&buf[..n as usize]);
        true
    }

    /// Gives `deliver` as much of `pending` as it takes.
    fn push_to(&mut self, deliver: &dyn Fn(&[u8]) -> usize) {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let len = front.len();
            let took = deliver(front).min(len);
            self.pending.drain(..took);
            if took < len {
                break;
            }
        }
    }

    fn attach_stdin(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
        match epoll.ctl(ControlOperation::Add, Self::stdin_fd(), ev) {
            Ok(()) => {
                self.polling = true;
                Ok(())
            }
            // A regular file (or /dev/null) cannot be polled: it is always readable, so read
            // it up to the buffer bound now.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(PENDING_INPUT_MAX as u64)
                    .read_to_end(&mut buf)?;
                self.pending.extend(buf);
                self.eof = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn set_polling(&mut self, epoll: &Epoll, on: bool) -> std::io::Result<()> {
        if on == self.polling || self.eof {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        epoll.ctl(
            op,
            Self::stdin_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STDIN),
        )?;
        self.polling = on;
        Ok(())
    }

    fn read_stdin(
        &mut self,
        epoll: &Epoll,
        deliver: &dyn Fn(&[u8]) -> usize,
    ) -> std::io::Result<()> {
        if !self.read_once() {
            self.set_polling(epoll, false)?;
            self.eof = true;
            return Ok(());
        }
        self.feed(epoll, deliver)
    }

    fn feed(&mut self, epoll: &Epoll, deliver: &dyn Fn(&[u8]) -> usize) -> std::io::Result<()> {
        self.push_to(deliver);
        self.set_polling(epoll, self.pending.len() < PENDING_INPUT_MAX)
    }
}
