//! vCPUs: boot configuration, the per-vCPU thread with its run-state machine, and the kick
//! that interrupts `KVM_RUN`.
//!
//! Each vCPU runs on its own thread:
//!
//! ```text
//!            ┌────────── Resume ──────────┐
//!            ▼                            │
//!        Running ───── Pause ──────▶ Paused
//!            │  ╲                         │
//!            │   ╲ guest powers off,      │
//!            │    ╲ crashes, or KVM fails │
//!            │     ▼                      │
//!            │   Exited (reason sent to   │
//!            │   the ExitNotifier)        │
//!            │     │                      │
//!            └─────┴──── Stop ────────────┴──▶ Stopped (thread ends)
//! ```
//!
//! Events arrive on a channel; a "kick" (a real-time signal whose handler sets the vCPU's
//! `kvm_run.immediate_exit`) makes `KVM_RUN` return so the thread looks at the channel.
//! Setting `immediate_exit` in the handler closes the race where the signal lands just before
//! the thread re-enters `KVM_RUN`.

use std::cell::Cell;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::{cpuid, msr, regs};
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};

/// How long a vCPU may take to acknowledge a pause, resume or stop.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// LAPIC register offsets and delivery modes for the local interrupt pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while creating, configuring or controlling a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A register-setting ioctl failed.
    #[error("failed to set {what} of vCPU {index}")]
    Set {
        /// Which state.
        what: &'static str,
        /// vCPU index.
        index: u8,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot tables failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Building the CPUID failed.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Registering the kick signal handler failed.
    #[error("failed to install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning the vCPU thread failed.
    #[error("failed to start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// The vCPU did not answer in time.
    #[error("vCPU {0} did not respond to {1:?} within {RESPONSE_TIMEOUT:?}")]
    Timeout(u8, VcpuEvent),
    /// The vCPU thread is gone, or its guest has stopped.
    #[error("vCPU {0} has stopped running the guest")]
    Gone(u8),
}

/// What the VMM asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Run again after a pause.
    Resume,
    /// End the thread.
    Stop,
}

/// What a vCPU thread answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    /// Now paused.
    Paused,
    /// Now running.
    Resumed,
    /// The vCPU has exited (the VM is stopping); it only accepts Stop now.
    Exited,
}

/// The run state of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Exited,
    Stopped,
}

/// Outcome of one `KVM_RUN`.
enum RunOutcome {
    /// Exit handled, keep running.
    Continue,
    /// Kicked: look at the event channel.
    Interrupted,
    /// The VM must stop for this reason.
    Exit(ExitReason),
}

thread_local! {
    /// The `kvm_run` of the vCPU owned by this thread, for the kick signal handler.
    static THREAD_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: the first real-time signal.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    THREAD_KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's mapped `kvm_run`
            // and cleared before that mapping goes away; a signal handler runs on the same
            // thread, so the mapping is alive. A byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

/// Installs the kick handler once per process.
pub fn init_kick_signal() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler));
    result.map_err(VcpuError::Signal)
}

/// A vCPU before its thread starts.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    io_bus: Bus,
    mmio_bus: Bus,
    exit: Arc<ExitNotifier>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(
        vm: &Vm,
        index: u8,
        io_bus: Bus,
        mmio_bus: Bus,
        exit: Arc<ExitNotifier>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            io_bus,
            mmio_bus,
            exit,
        })
    }

    /// The TSC frequency KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|k| *k > 0)
    }

    fn set<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Set {
            what,
            index: self.index,
            source,
        })
    }

    /// Sets CPUID, MSRs, local interrupt pins and — on the boot vCPU only — the registers for
    /// `mode`. Other vCPUs wait for INIT/SIPI from the guest, as on a PC.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        count: u8,
        mode: regs::EntryMode,
        boot_info: u64,
    ) -> Result<(), VcpuError> {
        let mut cpuid = supported_cpuid.clone();
        cpuid::filter(&mut cpuid, self.index, count, self.tsc_khz())?;
        self.set("CPUID", self.fd.set_cpuid2(&cpuid))?;
        let msrs = msr::boot_msrs();
        let written = self.set("MSRs", self.fd.set_msrs(&msrs))?;
        if written != msrs.as_slice().len() {
            tracing::debug!(written, "KVM accepted only some boot MSRs");
        }
        self.set_lint()?;
        if self.index == 0 {
            let mut sregs = self.set("special registers", self.fd.get_sregs())?;
            regs::setup_sregs(mem, mode, &mut sregs)?;
            self.set("special registers", self.fd.set_sregs(&sregs))?;
            self.set(
                "registers",
                self.fd.set_regs(&regs::boot_regs(mode, boot_info)),
            )?;
            self.set("FPU", self.fd.set_fpu(&regs::boot_fpu()))?;
        }
        Ok(())
    }

    /// LINT0 = ExtINT (the 8259 PIC reaches the CPU), LINT1 = NMI, as firmware leaves them.
    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self.set("LAPIC", self.fd.get_lapic())?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let v = u32::from_le_bytes(bytes);
            // Delivery mode is bits 8-10; clear the mask bit (16).
            let v = (v & !0x0001_0700) | (mode << 8);
            for (i, b) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as libc::c_char;
            }
        }
        self.set("LAPIC", self.fd.set_lapic(&lapic))
    }

    /// Starts the vCPU thread, running (or paused when `paused`).
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        init_kick_signal()?;
        let index = self.index;
        let (ev_tx, ev_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.thread_main(ev_rx, resp_tx, paused))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            tx: ev_tx,
            rx: resp_rx,
            thread: Some(thread),
        })
    }

    fn thread_main(
        mut self,
        events: Receiver<VcpuEvent>,
        responses: Sender<VcpuResponse>,
        paused: bool,
    ) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        THREAD_KVM_RUN.with(|p| p.set(run_ptr));
        let mut state = if paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        while state != RunState::Stopped {
            state = match state {
                RunState::Running => match self.run_once() {
                    RunOutcome::Continue => RunState::Running,
                    RunOutcome::Interrupted => {
                        self.handle_events(&events, &responses, state, false)
                    }
                    // Running --guest stops--> Exited
                    RunOutcome::Exit(reason) => {
                        self.exit.notify(reason);
                        RunState::Exited
                    }
                },
                // Paused/Exited: block until told what to do.
                RunState::Paused | RunState::Exited => {
                    self.handle_events(&events, &responses, state, true)
                }
                RunState::Stopped => RunState::Stopped,
            };
        }
        THREAD_KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Applies pending events (blocking for one when `block`) and returns the new state.
    fn handle_events(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responses: &Sender<VcpuResponse>,
        mut state: RunState,
        block: bool,
    ) -> RunState {
        let first = if block {
            match events.recv() {
                Ok(ev) => Some(ev),
                Err(_) => return RunState::Stopped,
            }
        } else {
            None
        };
        for ev in first.into_iter().chain(events.try_iter()) {
            let (next, reply) = match (state, ev) {
                (_, VcpuEvent::Stop) => return RunState::Stopped,
                (RunState::Exited, _) => (RunState::Exited, VcpuResponse::Exited),
                // Running --Pause--> Paused
                (_, VcpuEvent::Pause) => (RunState::Paused, VcpuResponse::Paused),
                // Paused --Resume--> Running
                (_, VcpuEvent::Resume) => (RunState::Running, VcpuResponse::Resumed),
            };
            state = next;
            // The VMM may have given up waiting; nothing to do then.
            let _ = responses.send(reply);
        }
        state
    }

    fn run_once(&mut self) -> RunOutcome {
        let index = self.index;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return RunOutcome::Interrupted;
            }
            Err(e) => {
                return RunOutcome::Exit(ExitReason::Error(format!(
                    "KVM_RUN failed on vCPU {index}: {e}"
                )))
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.io_bus.read(u64::from(port), data) {
                    tracing::trace!(port, "read of unclaimed I/O port");
                }
                RunOutcome::Continue
            }
            VcpuExit::IoOut(port, data) => {
                if !self.io_bus.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "write to unclaimed I/O port");
                }
                RunOutcome::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio_bus.read(addr, data) {
                    tracing::trace!(addr, "read of unclaimed MMIO address");
                }
                RunOutcome::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio_bus.write(addr, data) {
                    tracing::trace!(addr, "write to unclaimed MMIO address");
                }
                RunOutcome::Continue
            }
            VcpuExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => RunOutcome::Exit(ExitReason::PowerOff(0)),
                KVM_SYSTEM_EVENT_RESET => RunOutcome::Exit(ExitReason::Reset),
                other => RunOutcome::Exit(ExitReason::Error(format!("unexpected KVM system event {other} on vCPU {index}"))),
            },
            VcpuExit::Shutdown => RunOutcome::Exit(ExitReason::Crashed(format!(
                "vCPU {index} triple-faulted (KVM_EXIT_SHUTDOWN)\n{}",
                self.describe_state()
            ))),
            VcpuExit::InternalError => {
                let detail = self.internal_error_detail();
                RunOutcome::Exit(ExitReason::Crashed(format!(
                    "vCPU {index} stopped with a KVM internal error ({detail})\n{}",
                    self.describe_state()
                )))
            }
            VcpuExit::FailEntry(reason, cpu) => RunOutcome::Exit(ExitReason::Crashed(format!(
                "vCPU {index} failed to enter the guest (hardware reason {reason:#x}, host cpu {cpu}): the register state is invalid\n{}",
                self.describe_state()
            ))),
            VcpuExit::Hlt => RunOutcome::Exit(ExitReason::Crashed(format!(
                "vCPU {index} halted with nothing to wake it\n{}",
                self.describe_state()
            ))),
            VcpuExit::Intr => RunOutcome::Interrupted,
            other => RunOutcome::Exit(ExitReason::Error(format!(
                "vCPU {index}: unhandled KVM exit {other:?}"
            ))),
        }
    }

    /// `suberror` and data words of a `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let what = match internal.suberror {
            1 => "emulation failure: the instruction emulator cannot run this guest instruction",
            2 => "simultaneous exceptions",
            3 => "delivery event failed",
            _ => "unknown suberror",
        };
        format!(
            "suberror {} = {what}; data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }

    /// The vCPU's general-purpose and special registers as KVM holds them.
    pub fn registers(
        &self,
    ) -> Result<(kvm_bindings::kvm_regs, kvm_bindings::kvm_sregs), VcpuError> {
        let regs = self.set("registers", self.fd.get_regs())?;
        let sregs = self.set("special registers", self.fd.get_sregs())?;
        Ok((regs, sregs))
    }

    /// The guest's registers, for crash reports.
    pub fn describe_state(&self) -> String {
        let mut s = String::new();
        use std::fmt::Write;
        match self.fd.get_regs() {
            Ok(r) => {
                let _ = write!(
                    s,
                    "  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x}\n  rsi={:#x} rdi={:#x} rbp={:#x}",
                    r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
                );
            }
            Err(e) => {
                let _ = write!(s, "  (registers unavailable: {e})");
            }
        }
        if let Ok(sr) = self.fd.get_sregs() {
            let _ = write!(
                s,
                "\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} (cpl {}) idt={:#x}+{:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.cs.dpl, sr.idt.base, sr.idt.limit
            );
        }
        s
    }
}

/// The VMM's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    tx: Sender<VcpuEvent>,
    rx: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends `ev` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, ev: VcpuEvent) -> Result<(), VcpuError> {
        self.tx.send(ev).map_err(|_| VcpuError::Gone(self.index))?;
        if let Some(t) = &self.thread {
            // ESRCH means the thread is already gone, which the join reports.
            let _ = t.kill(kick_signal());
        }
        Ok(())
    }

    /// Waits for the answer to an `ev` sent earlier; a vCPU that has exited answers
    /// `Exited`, which is an error unless that is what was wanted.
    pub fn wait_for(&self, ev: VcpuEvent, want: VcpuResponse) -> Result<(), VcpuError> {
        match self.rx.recv_timeout(RESPONSE_TIMEOUT) {
            Ok(r) if r == want => Ok(()),
            Ok(_) => Err(VcpuError::Gone(self.index)),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.index, ev)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Stops the thread and waits for it to end.
    pub fn stop(&mut self) {
        let _ = self.send(VcpuEvent::Stop);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(vcpu = self.index, "vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
