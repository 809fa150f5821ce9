//! Building a VM from a [`VmConfig`]: KVM → memory → VM → kernel → devices → vCPUs → start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, mptable};
use crate::config::{SerialOutput, VmConfig};
use crate::devices::legacy::{DebugExit, I8042};
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::{bus::BusError, Bus};
use crate::exit::ExitNotifier;
use crate::loader::{self, LoaderError};
use crate::machine::Machine;
use crate::snapshot::{self, MachineState, SerialSnapshot};
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use vm_memory::GuestMemoryMmap;

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Opening KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Creating or starting a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Base or overlay refused.
    #[error(transparent)]
    Synthesis(#[from] crate::synthesis::SynthesisError),
    /// Reading the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A device state from the snapshot was refused.
    #[error("snapshot device state is invalid: {0}")]
    DeviceState(String),
    /// Wiring devices failed.
    #[error("failed to attach a device")]
    Bus(#[from] BusError),
    /// Creating an eventfd or opening the serial output failed.
    #[error("failed to set up {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// More vCPUs than KVM allows.
    #[error("--vcpus {requested} exceeds what KVM allows on this host ({max})")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM's maximum.
        max: usize,
    },
}

/// Opens the serial output named by the config.
pub fn open_serial_output(out: &SerialOutput) -> Result<SerialOut, BuildError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Null => Box::new(std::io::sink()),
        SerialOutput::File(p) => Box::new(
            std::fs::File::create(p).map_err(|e| BuildError::Io("the serial output file", e))?,
        ),
    })
}

/// Builds a VM that boots `cfg.kernel` and starts its vCPUs.
pub fn build_for_boot(cfg: &VmConfig) -> Result<Machine, BuildError> {
    let t0 = Instant::now();
    let kvm = KvmContext::open(&cfg.kvm_path)?;
    if usize::from(cfg.vcpus) > kvm.max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: cfg.vcpus,
            max: kvm.max_vcpus,
        });
    }
    let mem = memory::create_guest_memory(cfg.mem_mib)?;
    let vm = Vm::new(&kvm, &mem)?;
    let t_vm = t0.elapsed();

    let kernel = loader::load_kernel(&mem, &cfg.kernel)?;
    mptable::write(&mem, cfg.vcpus)?;
    let t_load = t0.elapsed();

    let exit = Arc::new(ExitNotifier::new().map_err(io_err)?);
    let devices = attach_devices(&vm, &exit, open_serial_output(&cfg.serial)?, None)?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for index in 0..cfg.vcpus {
        let vcpu = Vcpu::new(
            &vm,
            index,
            devices.io_bus.clone(),
            devices.mmio_bus.clone(),
            exit.clone(),
            kvm.msr_indices.clone(),
        )?;
        vcpu.configure(
            &mem,
            &kvm.supported_cpuid,
            cfg.vcpus,
            kernel.entry,
            kernel.boot_info,
        )?;
        vcpus.push(vcpu);
    }
    let t_vcpus = t0.elapsed();
    let machine = start(vm, mem, vcpus, devices, exit, cfg.serial_input, false)?;
    tracing::debug!(
        vm_us = t_vm.as_micros() as u64,
        load_us = (t_load - t_vm).as_micros() as u64,
        vcpus_us = (t_vcpus - t_load).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "VM built and started"
    );
    Ok(machine)
}

fn io_err(e: std::io::Error) -> BuildError {
    BuildError::Io("an event file descriptor", e)
}

/// The devices of a machine and the buses that reach them.
struct Devices {
    io_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    input_drained: EventFd,
}

/// COM1 (fresh, or from a snapshot), the i8042 and the power-off port.
fn attach_devices(
    vm: &Vm,
    exit: &Arc<ExitNotifier>,
    serial_out: SerialOut,
    serial_state: Option<&SerialSnapshot>,
) -> Result<Devices, BuildError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
    vm.register_irqfd(&serial_irq, layout::COM1_IRQ)?;
    let input_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
    let drained = input_drained.try_clone().map_err(io_err)?;
    let serial = match serial_state {
        None => SerialDevice::new(serial_irq, drained, serial_out),
        Some(s) => SerialDevice::from_state(s, serial_irq, drained, serial_out)
            .map_err(BuildError::DeviceState)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut io_bus = Bus::new();
    io_bus.insert(serial.clone(), u64::from(layout::COM1_PORT), 8)?;
    io_bus.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        u64::from(layout::I8042_PORT),
        5,
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        u64::from(layout::DEBUG_EXIT_PORT),
        2,
    )?;
    Ok(Devices {
        io_bus,
        mmio_bus: Bus::new(),
        serial,
        input_drained,
    })
}

/// Starts the vCPU threads (running, or paused when `paused`) and assembles the machine.
fn start(
    vm: Vm,
    mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    devices: Devices,
    exit: Arc<ExitNotifier>,
    serial_input: bool,
    paused: bool,
) -> Result<Machine, BuildError> {
    // Signals the event loop handles must be blocked before the vCPU threads exist, so that
    // they inherit the mask and the signals reach the loop's signalfd.
    let signals =
        crate::machine::StopSignals::block().map_err(|e| BuildError::Io("signal handling", e))?;
    let mut vcpus = vcpus;
    let coalesced = coalesce_serial_output(&vm, &mut vcpus);
    let handles = vcpus
        .into_iter()
        .map(|v| v.start(paused))
        .collect::<Result<Vec<_>, _>>()?;
    let mut machine = Machine::new(
        vm,
        mem,
        handles,
        devices.serial,
        devices.input_drained,
        exit,
        signals,
        serial_input,
    );
    if let Some(ring) = coalesced {
        machine.set_coalesced(ring, devices.io_bus, devices.mmio_bus);
    }
    Ok(machine)
}

/// Lets KVM queue the guest's writes to the serial transmit register instead of exiting for
/// each byte (see [`crate::vstate::coalesced`]). Best effort: without the capability every
/// write exits as before.
fn coalesce_serial_output(vm: &Vm, vcpus: &mut [Vcpu]) -> Option<Arc<CoalescedRing>> {
    let offset = vm.fd().check_extension_int(kvm_ioctls::Cap::CoalescedMmio);
    if offset <= 0 || !vm.fd().check_extension(kvm_ioctls::Cap::CoalescedPio) {
        return None;
    }
    let ring = match CoalescedRing::map(vcpus.first()?.fd(), offset as usize) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::debug!("no coalesced serial output: {e}");
            return None;
        }
    };
    let thr = kvm_ioctls::IoEventAddress::Pio(u64::from(layout::COM1_PORT));
    if let Err(e) = vm.fd().register_coalesced_mmio(thr, 1) {
        tracing::debug!("no coalesced serial output: {e}");
        return None;
    }
    for v in vcpus.iter_mut() {
        v.set_coalesced(ring.clone());
    }
    Some(ring)
}

/// What to restore, and how.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub snapshot: std::path::PathBuf,
    /// Serial output destination.
    pub serial: SerialOutput,
    /// Feed stdin to the guest's serial port.
    pub serial_input: bool,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// The KVM device node.
    pub kvm_path: std::path::PathBuf,
}

/// What to synthesise, and how.
#[derive(Clone, Debug)]
pub struct SynthesisConfig {
    /// Base image directory.
    pub base: std::path::PathBuf,
    /// Overlay file.
    pub overlay: std::path::PathBuf,
    /// Serial output destination.
    pub serial: SerialOutput,
    /// Feed stdin to the guest's serial port.
    pub serial_input: bool,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// The KVM device node.
    pub kvm_path: std::path::PathBuf,
    /// Decompression threads.
    pub threads: usize,
    /// Start the vCPUs before the overlay is applied and fill rewritten pages on first touch
    /// (userfaultfd); falls back to applying up front where userfaultfd is unavailable.
    pub lazy: bool,
    /// With `lazy`, how long the background fill waits before it starts (a test knob: the
    /// guest's first touches then all go through the fault path).
    pub prefetch_delay: Duration,
}

/// Synthesises a VM from a base and an overlay (see [`crate::synthesis`]); returns it running
/// (or paused) with the time each phase took.
pub fn build_from_overlay(
    cfg: &SynthesisConfig,
) -> Result<(Machine, crate::synthesis::Timings, Duration), BuildError> {
    let t0 = Instant::now();
    let mut timings = crate::synthesis::Timings::default();
    let checked = crate::synthesis::check(&cfg.base, &cfg.overlay)?;
    timings.check = t0.elapsed();
    let kvm = KvmContext::open(&cfg.kvm_path)?;
    let lazy = if cfg.lazy {
        crate::synthesis::materialise_lazy(&cfg.base, &checked, cfg.threads, &mut timings)?
    } else {
        None
    };
    let (mem, fill) = match lazy {
        Some((mem, fill)) => (mem, Some(fill)),
        None => (
            crate::synthesis::materialise(&cfg.base, &checked, cfg.threads, &mut timings)?,
            None,
        ),
    };
    let t_restore = Instant::now();
    let mut machine = restore_machine(
        kvm,
        mem,
        &checked.state,
        cfg.serial.clone(),
        cfg.serial_input,
        cfg.paused,
    )?;
    if let Some(fill) = fill {
        machine.set_lazy(fill);
        machine
            .start_prefetch(cfg.prefetch_delay)
            .map_err(|e| crate::synthesis::SynthesisError::Lazy(e.to_string()))?;
    }
    Ok((machine, timings, t_restore.elapsed()))
}

/// Restores a machine from a snapshot directory. Order (as Firecracker's): state file
/// (checked before anything else) → KVM → memory (mapped `MAP_PRIVATE`) → VM → vCPUs created
/// → VM state → vCPU states → devices → start.
pub fn build_from_snapshot(cfg: &RestoreConfig) -> Result<Machine, BuildError> {
    let t0 = Instant::now();
    let state = snapshot::read_state(&cfg.snapshot)?;
    let kvm = KvmContext::open(&cfg.kvm_path)?;
    let mem = snapshot::map_memory(&cfg.snapshot, state.mem_mib)?;
    let machine = restore_machine(
        kvm,
        mem,
        &state,
        cfg.serial.clone(),
        cfg.serial_input,
        cfg.paused,
    )?;
    tracing::debug!(
        total_us = t0.elapsed().as_micros() as u64,
        "VM restored from snapshot"
    );
    Ok(machine)
}

/// VM, devices and vCPUs from a machine state, over memory that already holds the guest's
/// RAM; starts the vCPUs. Order (as Firecracker's): VM → vCPUs created → VM state → vCPU
/// states → devices → start.
fn restore_machine(
    kvm: KvmContext,
    mem: GuestMemoryMmap,
    state: &MachineState,
    serial: SerialOutput,
    serial_input: bool,
    paused: bool,
) -> Result<Machine, BuildError> {
    if state.vcpus.len() > kvm.max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: state.vcpus.len() as u8,
            max: kvm.max_vcpus,
        });
    }
    let vm = Vm::new(&kvm, &mem)?;
    let exit = Arc::new(ExitNotifier::new().map_err(io_err)?);
    let devices = attach_devices(
        &vm,
        &exit,
        open_serial_output(&serial)?,
        Some(&state.serial),
    )?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for index in 0..state.vcpus.len() {
        vcpus.push(Vcpu::new(
            &vm,
            index as u8,
            devices.io_bus.clone(),
            devices.mmio_bus.clone(),
            exit.clone(),
            kvm.msr_indices.clone(),
        )?);
    }
    vm.restore_state(&state.vm)?;
    for (vcpu, s) in vcpus.iter().zip(&state.vcpus) {
        vcpu.restore_state(s)?;
    }
    let machine = start(vm, mem, vcpus, devices, exit, serial_input, paused)?;
    machine.set_paused(paused);
    Ok(machine)
}
