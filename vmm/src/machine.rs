//! A running VM: its vCPU threads, devices and the event loop that serves them.
//!
//! The event loop (epoll) waits for:
//! - the exit eventfd (a vCPU or device decided the VM stops),
//! - standard input (bytes for the guest: its virtio console when it has one, else COM1),
//! - the "input drained" eventfd (room for more input: COM1's receive FIFO emptied, or the
//!   console delivered input it had refused),
//! - a signalfd for SIGINT/SIGTERM/SIGHUP (stop cleanly),
//! - the control socket's eventfd (requests read by its threads, answered here; see
//!   the `control` module).
//!
//! Call-order contract: the vCPU threads are stopped and joined before guest memory and the
//! VM fd are released (field order of [`Machine`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialDevice;
use crate::devices::virtio::slot::{Slot, SlotKind};
use crate::devices::virtio::worker::DeviceWorker;
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::handoff::link::{HandoffBase, HandoffLink, MachineOp};
use crate::serial_input::{deliver_input, SerialInput, TOKEN_STDIN};
use crate::synthesis::lazy::{LazyError, LazyFill};
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::vcpu::{VcpuError, VcpuEvent, VcpuHandle};
use crate::vstate::vm::Vm;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Errors of machine-level operations.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The vCPUs could not be let run.
    #[error("failed to let the vCPUs run")]
    Vcpu(#[from] VcpuError),
    /// Filling guest memory from an overlay could not go on.
    #[error("guest memory is incomplete")]
    Lazy(#[from] LazyError),
    /// The handoff channel could not be set up.
    #[error("failed to set up the handoff channel")]
    Handoff(#[source] std::io::Error),
}

/// How often the event loop replays coalesced guest writes no vCPU exit has drained and
/// writes out serial output no register read or line end has (for guests that print without
/// either).
pub const OUTPUT_FLUSH_MS: i32 = 20;

const TOKEN_EXIT: u64 = 0;
const TOKEN_DRAINED: u64 = 2;
const TOKEN_SIGNAL: u64 = 3;
const TOKEN_API: u64 = 4;
const TOKEN_HANDOFF: u64 = 5;

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

/// What a machine is made of (the builder makes them), its vCPU threads spawned paused.
pub struct MachineParts {
    /// The VM.
    pub vm: Vm,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The vCPU threads, paused.
    pub vcpus: Vec<VcpuHandle>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Written when the guest's serial port or console has room for more input.
    pub input_drained: EventFd,
    /// Where vCPUs and devices report that the VM stops.
    pub exit: Arc<ExitNotifier>,
    /// The stop signals, blocked before the vCPU threads were spawned.
    pub signals: StopSignals,
    /// Input from stdin for the guest's console or serial port (none with `--no-stdin`).
    pub input: Option<SerialInput>,
    /// The coalesced-write ring with the buses its writes go to, drained every
    /// [`OUTPUT_FLUSH_MS`] ms for guests that write without ever causing an exit.
    pub coalesced: Option<(Arc<CoalescedRing>, Bus, Bus)>,
    /// The virtio devices the event loop drives and snapshots save.
    pub virtio: Arc<Vec<Slot>>,
    /// The thread that runs them.
    pub devices: DeviceWorker,
    /// The lazy fill of guest memory, if synthesis left one, and how long its background
    /// prefetch waits before it starts.
    pub lazy: Option<(LazyFill, std::time::Duration)>,
    /// The base the VM runs on, if it has one (synthesised or received by handoff): a
    /// handoff sends the VM's δ against it.
    pub base: Option<HandoffBase>,
}

/// A running VM.
pub struct Machine {
    // Field order is drop order: vCPU threads end before the VM and its memory go away.
    pub(crate) vcpus: Vec<VcpuHandle>,
    /// Lazy synthesis still filling guest memory (its threads end before the memory goes).
    pub(crate) lazy: Option<LazyFill>,
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) input_drained: EventFd,
    exit: Arc<ExitNotifier>,
    signals: StopSignals,
    /// Input from stdin for the guest's console or serial port (none with `--no-stdin`).
    input: Option<SerialInput>,
    paused: std::sync::atomic::AtomicBool,
    /// Coalesced guest writes, with the buses they go to, drained here when no vCPU exits.
    coalesced: Option<(Arc<CoalescedRing>, Bus, Bus)>,
    /// virtio devices, run by their own thread.
    pub(crate) virtio: Arc<Vec<Slot>>,
    pub(crate) devices: Option<DeviceWorker>,
    /// A handoff's channel to the event loop, and the base it sends a δ against.
    pub(crate) handoff: HandoffLink,
    /// The event loop holds the devices still (a handoff's pause).
    pub(crate) holding: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Assembles a machine from its parts and lets its vCPUs run unless `paused`; then starts
    /// the background fill of guest memory not yet touched, if synthesis left a lazy fill:
    /// only once the vCPUs run (on these hosts, creating a VM while another thread fills
    /// guest memory took 7–10 ms instead of 0.4, measured), and fill errors stop the VM from
    /// then on. A snapshot waits for the fill to complete.
    pub fn start(parts: MachineParts, paused: bool) -> Result<Self, MachineError> {
        let MachineParts {
            vm,
            mem,
            vcpus,
            serial,
            input_drained,
            exit,
            signals,
            input,
            coalesced,
            virtio,
            devices,
            lazy,
            base,
        } = parts;
        let mut machine = Machine {
            vcpus,
            lazy: None,
            vm,
            mem,
            serial,
            input_drained,
            exit,
            signals,
            input,
            paused: std::sync::atomic::AtomicBool::new(true),
            coalesced,
            virtio,
            devices: Some(devices),
            handoff: HandoffLink::new(base).map_err(MachineError::Handoff)?,
            holding: std::sync::atomic::AtomicBool::new(false),
        };
        // The event loop's filter, before the guest's first instruction.
        crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Main);
        if !paused {
            machine.resume()?;
        }
        if let Some((fill, delay)) = lazy {
            fill.set_exit(machine.exit.clone());
            // Held by the machine first: on an error the vCPUs stop before the fill does.
            machine.lazy.insert(fill).start_prefetch(delay)?;
        }
        Ok(machine)
    }

    /// Whether a handoff of this machine is running.
    pub fn handing_off(&self) -> bool {
        self.handoff.active()
    }

    /// The lazy fill of guest memory, while the machine has one.
    pub fn lazy(&self) -> Option<&LazyFill> {
        self.lazy.as_ref()
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

    /// Feeds `bytes` to the guest's input: its virtio console when it has one (delivered from
    /// this thread into posted receive buffers, the rest held in the device up to its bound),
    /// else COM1's receive FIFO (as much as it takes now). Returns how many were taken; offer
    /// the rest again later.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let console = self.console();
        if console.is_some() && self.holding.load(Ordering::Acquire) {
            // The devices are held by this thread (a handoff's pause): offered again later.
            return 0;
        }
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

    /// Runs the event loop until the VM stops, serving `hooks` (a control socket and a
    /// report channel: `control`), then stops the vCPU threads, reports the exit and
    /// returns why.
    pub fn run(mut self, hooks: &mut dyn LoopHooks) -> std::io::Result<ExitReason> {
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
        if let Some(fd) = hooks.requests_fd() {
            add(fd, TOKEN_API)?;
        }
        add(self.handoff.event_fd(), TOKEN_HANDOFF)?;
        let mut held = Held::default();
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
                    TOKEN_API => hooks.serve_requests(&self),
                    TOKEN_HANDOFF => self.serve_handoff(&mut held, hooks),
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
        // Devices held by a handoff's pause go on (or the device thread's join would wait).
        drop(held);
        // The supervisor learns of the stop once the guest no longer runs and its ports are
        // closed: before the rest of the shutdown (the lazy fill's fault server may wait
        // up to 50 ms for its next poll) and the release of the VM and its memory (~15 ms in
        // the kernel for a 256 MiB guest).
        if hooks.reports_exit() {
            for v in &mut self.vcpus {
                v.stop();
            }
            self.close_host_network();
            hooks.exited(reason.exit_code());
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

/// What the event loop serves beside the VM: a control socket's requests and a supervisor's
/// report channel (`control` implements it; the loop knows only this trait).
pub trait LoopHooks {
    /// Readable when control requests wait.
    fn requests_fd(&self) -> Option<RawFd>;
    /// Answers the waiting requests.
    fn serve_requests(&mut self, machine: &Machine);
    /// A handoff of this machine progressed.
    fn handoff_progress(&mut self, progress: format::control::HandoffProgress);
    /// A supervisor waits for [`LoopHooks::exited`]: the loop then stops the vCPUs and closes
    /// the host ports before it reports, ahead of the rest of the shutdown.
    fn reports_exit(&self) -> bool;
    /// The VM has stopped; the process will exit with `code`.
    fn exited(&mut self, code: i32);
}

/// The event loop's side of a running handoff.
#[derive(Debug, Default)]
struct Held<'a> {
    devices: Option<std::sync::MutexGuard<'a, ()>>,
    was_paused: bool,
}

impl Machine {
    /// Carries out the queued operations (on the event loop's thread). `held` keeps the devices
    /// still from `Pause` to `Resume` or the end of the loop.
    fn serve_handoff<'a>(&'a self, held: &mut Held<'a>, hooks: &mut dyn LoopHooks) {
        let machine = self;
        let _ = machine.handoff.wake.read();
        while let Ok(op) = machine.handoff.rx.try_recv() {
            match op {
                MachineOp::Pause(reply) => {
                    if held.devices.is_none() {
                        held.was_paused = machine.paused();
                        held.devices = machine.devices.as_ref().map(|d| d.hold());
                        machine.holding.store(true, Ordering::Release);
                    }
                    let r = machine
                        .pause()
                        .map_err(|e| crate::error::message(&e))
                        .and_then(|()| {
                            machine
                                .machine_state()
                                .map_err(|e| crate::error::message(&e))
                        })
                        .and_then(|s| {
                            format::state::encode(format::state::Kind::Machine, &s)
                                .map_err(|e| crate::error::message(&e))
                        });
                    let _ = reply.send(r);
                }
                MachineOp::Resume(reply) => {
                    let r = if held.was_paused {
                        Ok(())
                    } else {
                        machine.resume().map_err(|e| crate::error::message(&e))
                    };
                    held.devices = None;
                    machine.holding.store(false, Ordering::Release);
                    // Console input refused while the devices were held is offered again.
                    let _ = machine.input_drained.write(1);
                    let _ = reply.send(r);
                }
                MachineOp::Release => machine.request_stop(),
                MachineOp::Progress(p) => hooks.handoff_progress(p),
                MachineOp::Ended => machine.handoff.active.store(false, Ordering::Release),
            }
        }
    }
}
