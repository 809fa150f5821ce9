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

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vm::Vm;
use crate::arch::{cpuid, msr, regs};
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::coalesced::CoalescedRing;

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
    /// Saving or restoring vCPU state failed.
    #[error("failed to {what} the {part} of vCPU {index}")]
    State {
        /// "save" or "restore".
        what: &'static str,
        /// Which part of the state.
        part: &'static str,
        /// vCPU index.
        index: u8,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The saved state does not fit this vCPU.
    #[error("saved state of vCPU {0} is invalid: {1}")]
    BadState(u8, String),
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
    /// Save the vCPU's state (only while paused).
    Save,
    /// Run again after a pause.
    Resume,
    /// End the thread.
    Stop,
}

/// What a vCPU thread answers.
#[derive(Debug)]
pub enum VcpuResponse {
    /// The saved state (answer to `Save`).
    Saved(Box<Result<VcpuState, VcpuError>>),
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
    msr_indices: Arc<Vec<u32>>,
    io_bus: Bus,
    mmio_bus: Bus,
    exit: Arc<ExitNotifier>,
    coalesced: Option<Arc<CoalescedRing>>,
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
        msr_indices: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            msr_indices,
            io_bus,
            mmio_bus,
            exit,
            coalesced: None,
        })
    }

    /// The coalesced-write ring this vCPU drains before handling each exit.
    pub fn set_coalesced(&mut self, ring: Arc<CoalescedRing>) {
        self.coalesced = Some(ring);
    }

    /// The vCPU's KVM file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
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
        // Before the first KVM_RUN.
        crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Vcpu);
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
                // Saving needs a vCPU out of KVM_RUN: Paused (or Exited, for a post-mortem).
                (RunState::Paused | RunState::Exited, VcpuEvent::Save) => {
                    (state, VcpuResponse::Saved(Box::new(self.save_state())))
                }
                (_, VcpuEvent::Save) => (
                    state,
                    VcpuResponse::Saved(Box::new(Err(VcpuError::BadState(
                        self.index,
                        "save requested while running; pause first".into(),
                    )))),
                ),
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
        let run = self.fd.run();
        // Writes KVM queued before this exit happened before it: replay them first.
        if let Some(ring) = &self.coalesced {
            ring.drain(&self.io_bus, &self.mmio_bus);
        }
        let exit = match run {
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

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency, restored where KVM allows it.
    pub tsc_khz: Option<u32>,
}

impl Vcpu {
    fn state_err(
        &self,
        what: &'static str,
        part: &'static str,
    ) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::State {
            what,
            part,
            index,
            source,
        }
    }

    /// The MSRs of `indices` that KVM lets us read. KVM stops at the first MSR it cannot
    /// read: that one is skipped and the rest asked for again.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut i = 0;
        while i < indices.len() {
            let end = (i + kvm_bindings::KVM_MAX_MSR_ENTRIES).min(indices.len());
            let entries: Vec<kvm_msr_entry> = indices[i..end]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VcpuError::BadState(self.index, format!("MSR list: {e:?}")))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.state_err("save", "MSRs"))?;
            out.extend_from_slice(&msrs.as_slice()[..n]);
            i += n;
            if i < end {
                i += 1; // the unreadable one
            }
        }
        Ok(out)
    }

    /// Saves everything KVM holds for this vCPU. The vCPU must be out of `KVM_RUN`.
    fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let e = |part| self.state_err("save", part);
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e("CPUID"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            msrs: self.read_msrs(&self.msr_indices)?,
            regs: self.fd.get_regs().map_err(e("registers"))?,
            sregs: self.fd.get_sregs().map_err(e("special registers"))?,
            xsave: self.fd.get_xsave().map_err(e("XSAVE area"))?,
            xcrs: self.fd.get_xcrs().map_err(e("XCRs"))?,
            debug_regs: self.fd.get_debug_regs().map_err(e("debug registers"))?,
            lapic: self.fd.get_lapic().map_err(e("LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(e("MP state"))?,
            vcpu_events: self.fd.get_vcpu_events().map_err(e("vCPU events"))?,
            tsc_khz: self.tsc_khz(),
        })
    }

    /// Restores a saved state into this freshly created vCPU. Order (as Firecracker's): CPUID,
    /// MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC (after the
    /// APIC base in the special registers), MSRs (the TSC deadline needs the LAPIC), events.
    fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let e = |part| self.state_err("restore", part);
        if let (Some(khz), Some(now)) = (s.tsc_khz, self.tsc_khz()) {
            if khz != now {
                // Best effort: a host without TSC scaling keeps its own rate.
                if let Err(err) = self.fd.set_tsc_khz(khz) {
                    tracing::warn!(
                        saved = khz,
                        host = now,
                        "cannot set the saved TSC rate: {err}"
                    );
                }
            }
        }
        let cpuid = CpuId::from_entries(&s.cpuid)
            .map_err(|err| VcpuError::BadState(self.index, format!("CPUID: {err:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(e("CPUID"))?;
        self.fd.set_mp_state(s.mp_state).map_err(e("MP state"))?;
        self.fd.set_regs(&s.regs).map_err(e("registers"))?;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(e("special registers"))?;
        // SAFETY: `s.xsave` is a complete legacy-size kvm_xsave, which KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(e("XSAVE area"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(e("XCRs"))?;
        self.fd
            .set_debug_regs(&s.debug_regs)
            .map_err(e("debug registers"))?;
        self.fd.set_lapic(&s.lapic).map_err(e("LAPIC"))?;
        for chunk in s.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk)
                .map_err(|err| VcpuError::BadState(self.index, format!("MSRs: {err:?}")))?;
            let n = self.fd.set_msrs(&msrs).map_err(e("MSRs"))?;
            if n != chunk.len() {
                return Err(VcpuError::BadState(
                    self.index,
                    format!("KVM refused MSR {:#x}", chunk[n].index),
                ));
            }
        }
        self.fd
            .set_vcpu_events(&s.vcpu_events)
            .map_err(e("vCPU events"))?;
        Ok(())
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

    /// Waits for the answer to an `ev` sent earlier.
    pub fn response(&self, ev: VcpuEvent) -> Result<VcpuResponse, VcpuError> {
        match self.rx.recv_timeout(RESPONSE_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(self.index, ev)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Waits for the answer to a Pause or Resume sent earlier; a vCPU that has exited answers
    /// `Exited`, which is an error.
    pub fn wait_for(&self, ev: VcpuEvent) -> Result<(), VcpuError> {
        match (ev, self.response(ev)?) {
            (VcpuEvent::Pause, VcpuResponse::Paused)
            | (VcpuEvent::Resume, VcpuResponse::Resumed) => Ok(()),
            _ => Err(VcpuError::Gone(self.index)),
        }
    }

    /// Saves the state of this (paused) vCPU.
    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        self.send(VcpuEvent::Save)?;
        match self.response(VcpuEvent::Save)? {
            VcpuResponse::Saved(r) => *r,
            _ => Err(VcpuError::Gone(self.index)),
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
/// Everything KVM holds for a vCPU; restored onto a freshly created vCPU (`Args`), after the
/// VM's own state (see the snapshot module's `restore`).
impl crate::persist::Persist for Vcpu {
    type State = VcpuState;
    type Args<'a> = Vcpu;
    type Error = VcpuError;

    fn save(&self) -> Result<VcpuState, VcpuError> {
        self.save_state()
    }

    fn restore(created: Vcpu, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        created.restore_state(state)?;
        Ok(created)
    }
}
