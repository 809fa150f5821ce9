//! Building a VM: the entry points that turn a configuration into a running
//! [`Machine`] — boot a kernel ([`build_for_boot`]), restore a snapshot
//! ([`build_from_snapshot`]), synthesise from a base and an overlay ([`build_from_overlay`]),
//! resume a VM handed off by another appliance ([`build_from_handoff`]).
//!
//! Boot: KVM → memory → VM → kernel → devices → vCPUs → start. Restore, synthesis, handoff: memory
//! holding the guest's RAM → VM → devices and vCPUs from the machine state
//! ([`crate::snapshot::restore`]) → start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;

use crate::arch::{layout, mptable};
use crate::config::{DevicesConfig, SerialOutput, VmConfig};
use crate::device_manager::{self, virtio_cmdline, DeviceError, Devices, DiskStart};
use crate::devices::virtio::slot::SlotKind;
use crate::devices::virtio::worker::DeviceWorker;
use crate::exit::ExitNotifier;
use crate::handoff::link::HandoffBase;
use crate::handoff::receive::Incoming;
use crate::loader::{self, LoadedKernel, LoaderError};
use crate::machine::{Machine, MachineError, MachineParts, StopSignals};
use crate::serial_input::{deliver_input, SerialInput};
use crate::snapshot::restore;
use crate::snapshot::state::MachineState;
use crate::snapshot::SnapshotError;
use crate::synthesis::lazy::LazyFill;
use crate::synthesis::{self, SynthesisError, Timings};
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::kvm::{KvmContext, KvmError};
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vm::{Vm, VmError};

/// Errors while building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Opening KVM failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating or mapping guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// More vCPUs than KVM allows.
    #[error("--vcpus {requested} exceeds what KVM allows on this host ({max})")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM's maximum.
        max: usize,
    },
    /// Creating the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Creating an eventfd, blocking signals or starting a thread failed.
    #[error("failed to set up {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// Creating or starting a vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Base or overlay refused, or the overlay could not be applied.
    #[error(transparent)]
    Synthesis(#[from] SynthesisError),
    /// Reading the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Setting up a device failed.
    #[error("cannot set up the devices")]
    Devices(#[from] DeviceError),
    /// Starting the machine failed.
    #[error("cannot start the machine")]
    Start(#[from] MachineError),
}

/// What a boot writes into guest memory before any vCPU exists: the kernel (with the
/// command line and its `virtio_mmio.device=` entries for `cfg`'s devices, boot_params or the
/// PVH start info, e820, initrd) and the MP table. [`build_for_boot`] starts with it; the
/// loader-level tests check a kernel's boot through it where KVM cannot run the kernel.
pub fn load_for_boot(cfg: &VmConfig, mem: &GuestMemoryMmap) -> Result<LoadedKernel, BuildError> {
    let mut kernel_cfg = cfg.kernel.clone();
    kernel_cfg.cmdline.push_str(&virtio_cmdline(&cfg.devices));
    let kernel = loader::load_kernel(mem, &kernel_cfg)?;
    mptable::write(mem, cfg.vcpus)?;
    Ok(kernel)
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

    let kernel = load_for_boot(cfg, &mem)?;
    let t_load = t0.elapsed();

    let exit =
        Arc::new(ExitNotifier::new().map_err(|e| BuildError::Io("an event file descriptor", e))?);
    let devices = device_manager::attach_devices(
        &vm,
        &mem,
        &exit,
        &cfg.serial,
        None,
        &cfg.devices,
        None,
        DiskStart::Config,
    )?;
    let supported_cpuid = kvm.supported_cpuid()?;
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
            &supported_cpuid,
            cfg.vcpus,
            kernel.entry,
            kernel.boot_info,
        )?;
        vcpus.push(vcpu);
    }
    let t_vcpus = t0.elapsed();
    let spawned = spawn_vcpus(&vm, vcpus)?;
    let machine = start(
        vm,
        mem,
        spawned,
        devices,
        exit,
        cfg.serial_input,
        false,
        Origin {
            lazy: None,
            base: None,
        },
    )?;
    tracing::debug!(
        vm_us = t_vm.as_micros() as u64,
        load_us = (t_load - t_vm).as_micros() as u64,
        vcpus_us = (t_vcpus - t_load).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "VM built and started"
    );
    Ok(machine)
}

/// What to restore, and how.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub snapshot: std::path::PathBuf,
    /// Serial output destination.
    pub serial: SerialOutput,
    /// Feed stdin to the guest (its console when the snapshot has one, else its serial port).
    pub serial_input: bool,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// The KVM device node.
    pub kvm_path: std::path::PathBuf,
    /// Device overrides (NIC backend; a disk δ file to keep writes in).
    pub devices: DevicesConfig,
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
    /// Feed stdin to the guest (its console when the snapshot has one, else its serial port).
    pub serial_input: bool,
    /// Leave the vCPUs paused.
    pub paused: bool,
    /// The KVM device node.
    pub kvm_path: std::path::PathBuf,
    /// Device overrides (NIC backend; a disk δ file to keep writes in).
    pub devices: DevicesConfig,
    /// Decompression threads for eager application; `None`: one per core (asked only when
    /// needed — finding the core count reads several cgroup files).
    pub threads: Option<usize>,
    /// Start the vCPUs before the overlay is applied and fill rewritten pages on first touch
    /// (userfaultfd); falls back to applying up front where userfaultfd is unavailable.
    pub lazy: bool,
    /// With `lazy`, how long the background fill waits before it starts (a test knob: the
    /// guest's first touches then all go through the fault path).
    pub prefetch_delay: Duration,
}

/// Synthesises a VM from a base and an overlay (see [`crate::synthesis`]); returns it running
/// (or paused) with the time each phase took and the time from the VM's creation to the
/// start.
pub fn build_from_overlay(
    cfg: &SynthesisConfig,
) -> Result<(Machine, Timings, Duration), BuildError> {
    let synthesis::Prepared {
        kvm,
        memory: mem,
        mut synthesis,
    } = synthesis::prepare(
        &cfg.base,
        &cfg.overlay,
        &cfg.kvm_path,
        cfg.lazy,
        cfg.threads,
    )?;
    let vm = Vm::new(&kvm, &mem)?;
    // The VM and its memory slot exist: a lazy fill may fill ahead from now on.
    synthesis.vm_created();
    let t_restore = Instant::now();
    let devices = synthesis.devices(&cfg.devices);
    let disk_blocks = synthesis.disk_blocks()?;
    let mut restored = restore::restore_machine(
        &kvm,
        vm,
        &mem,
        synthesis.state(),
        &cfg.serial,
        &devices,
        DiskStart::Blocks(disk_blocks),
    )?;
    let spawned = spawn_vcpus(&restored.vm, std::mem::take(&mut restored.vcpus))?;
    // The chunk checks ran beside the VM's creation; they must pass before any vCPU runs.
    let fill = synthesis.start_fill()?;
    let lazy = fill.map(|f| (f, cfg.prefetch_delay));
    let origin = Origin {
        lazy,
        base: Some(synthesis.handoff_base()),
    };
    let machine = start_restored(restored, mem, spawned, cfg.serial_input, cfg.paused, origin)?;
    Ok((machine, synthesis.timings(), t_restore.elapsed()))
}

/// How a VM received by handoff runs here.
#[derive(Clone, Debug)]
pub struct HandoffConfig {
    /// Serial output destination.
    pub serial: SerialOutput,
    /// Feed stdin to the guest (its console when it has one, else its serial port).
    pub serial_input: bool,
    /// Device overrides (NIC backend; a disk δ file to keep writes in).
    pub devices: DevicesConfig,
}

/// Restores a VM received by handoff ([`crate::handoff::receive`], which created the VM over
/// the memory the stream filled) as a synthesis restores one: the devices of its state with `cfg`'s overrides, its
/// disk the base's disk under the received δ; returns it running. Call it only with a
/// complete, checked stream.
pub fn build_from_handoff(incoming: Incoming, cfg: &HandoffConfig) -> Result<Machine, BuildError> {
    let Incoming {
        kvm,
        vm,
        memory: mem,
        state,
        disk_blocks,
        base_disk,
        base,
        ..
    } = incoming;
    let t0 = Instant::now();
    let mut devices = cfg.devices.clone();
    if let Some(disk) = base_disk {
        let mut d = devices.disk.take().unwrap_or_default();
        if d.base.is_none() {
            d.base = Some(disk);
        }
        devices.disk = Some(d);
    }
    let restoring = Restoring {
        kvm: &kvm,
        state: &state,
        serial: &cfg.serial,
        devices: &devices,
        disk_blocks,
    };
    // It can move on again, to the next appliance or back: it keeps its base.
    let (machine, t_restore) = restoring.run(vm, mem, cfg.serial_input, false, Some(base), t0)?;
    tracing::debug!(
        restore_us = t_restore.as_micros() as u64,
        start_us = (t0.elapsed() - t_restore).as_micros() as u64,
        "handed-off VM built and started"
    );
    Ok(machine)
}

/// Restores a machine from a snapshot directory. Order (as Firecracker's): state file
/// (checked before anything else) → KVM → memory (mapped `MAP_PRIVATE`) → VM → devices →
/// vCPUs created → VM state → vCPU states → start.
pub fn build_from_snapshot(cfg: &RestoreConfig) -> Result<Machine, BuildError> {
    let t0 = Instant::now();
    let state = restore::read_state(&cfg.snapshot)?;
    let kvm = KvmContext::open(&cfg.kvm_path)?;
    let image = cfg.snapshot.join(format::base::MEMORY);
    let mem = memory::map_image(&image, state.mem_mib)?;
    memory::prefault_image(&image, &mem, &[]);
    let disk_start = restore::read_disk_delta(&cfg.snapshot, &state)?;
    let vm = Vm::new(&kvm, &mem)?;
    let restoring = Restoring {
        kvm: &kvm,
        state: &state,
        serial: &cfg.serial,
        devices: &cfg.devices,
        disk_blocks: disk_start,
    };
    let (machine, _) = restoring.run(vm, mem, cfg.serial_input, cfg.paused, None, t0)?;
    tracing::debug!(
        total_us = t0.elapsed().as_micros() as u64,
        "VM restored from snapshot"
    );
    Ok(machine)
}

/// A machine to rebuild from its state over a VM already created on its memory: the
/// snapshot's and the handoff's path (synthesis starts a lazy fill in between).
struct Restoring<'a> {
    kvm: &'a KvmContext,
    state: &'a MachineState,
    serial: &'a SerialOutput,
    devices: &'a DevicesConfig,
    disk_blocks: Vec<(u64, Vec<u8>)>,
}

impl Restoring<'_> {
    /// Restores devices and vCPUs into `vm`, spawns the vCPUs and starts the machine (paused
    /// with `paused`); returns it with the time from `t0` to the end of the restore proper.
    fn run(
        self,
        vm: Vm,
        mem: GuestMemoryMmap,
        serial_input: bool,
        paused: bool,
        base: Option<HandoffBase>,
        t0: Instant,
    ) -> Result<(Machine, Duration), BuildError> {
        let mut restored = restore::restore_machine(
            self.kvm,
            vm,
            &mem,
            self.state,
            self.serial,
            self.devices,
            DiskStart::Blocks(self.disk_blocks),
        )?;
        let t_restore = t0.elapsed();
        let spawned = spawn_vcpus(&restored.vm, std::mem::take(&mut restored.vcpus))?;
        let origin = Origin { lazy: None, base };
        let machine = start_restored(restored, mem, spawned, serial_input, paused, origin)?;
        Ok((machine, t_restore))
    }
}

/// vCPU threads spawned paused, with what must exist before them.
struct Spawned {
    signals: StopSignals,
    coalesced: Option<Arc<CoalescedRing>>,
    handles: Vec<VcpuHandle>,
}

/// Spawns the vCPU threads, paused: a thread's start-up (stack, signal stack, thread-local
/// state: ~0.1 ms and some 50 page faults here) then overlaps the last checks before the
/// guest may run, instead of delaying its first instruction. (The virtio device thread is
/// not started before those checks: devices must not act for a VM that is then refused.)
fn spawn_vcpus(vm: &Vm, vcpus: Vec<Vcpu>) -> Result<Spawned, BuildError> {
    // Signals the event loop handles must be blocked before the vCPU threads exist, so that
    // they inherit the mask and the signals reach the loop's signalfd.
    let signals = StopSignals::block().map_err(|e| BuildError::Io("signal handling", e))?;
    let mut vcpus = vcpus;
    let coalesced = coalesce_serial_output(vm, &mut vcpus);
    let handles = vcpus
        .into_iter()
        .map(|v| v.start(true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Spawned {
        signals,
        coalesced,
        handles,
    })
}

/// [`start`] for a machine rebuilt from its state (its vCPUs taken out and spawned).
fn start_restored(
    restored: restore::Restored,
    mem: GuestMemoryMmap,
    spawned: Spawned,
    serial_input: bool,
    paused: bool,
    origin: Origin,
) -> Result<Machine, BuildError> {
    let restore::Restored {
        vm, devices, exit, ..
    } = restored;
    start(
        vm,
        mem,
        spawned,
        devices,
        exit,
        serial_input,
        paused,
        origin,
    )
}

/// What a restored machine came from, beside its state: a synthesis's lazy fill still
/// running (with its prefetch delay), and the base a handoff sends its δ against.
struct Origin {
    lazy: Option<(LazyFill, Duration)>,
    base: Option<HandoffBase>,
}

/// Assembles the machine around spawned vCPUs and lets them run unless `paused`; a lazy fill
/// (with its prefetch delay) goes on in the background once they do.
#[allow(clippy::too_many_arguments)]
fn start(
    vm: Vm,
    mem: GuestMemoryMmap,
    spawned: Spawned,
    devices: Devices,
    exit: Arc<ExitNotifier>,
    serial_input: bool,
    paused: bool,
    origin: Origin,
) -> Result<Machine, BuildError> {
    let virtio = Arc::new(devices.virtio);
    let worker = DeviceWorker::start(virtio.clone())
        .map_err(|e| BuildError::Io("the virtio device thread", e))?;
    // Input typed while the VM was being built reaches the guest's console (or serial port)
    // before its first instruction.
    let console = virtio.iter().find(|s| s.kind == SlotKind::Console);
    let input = serial_input
        .then(|| SerialInput::primed(&|b: &[u8]| deliver_input(&devices.serial, console, b)));
    let parts = MachineParts {
        vm,
        mem,
        vcpus: spawned.handles,
        serial: devices.serial,
        input_drained: devices.input_drained,
        exit,
        signals: spawned.signals,
        input,
        coalesced: spawned
            .coalesced
            .map(|ring| (ring, devices.io_bus, devices.mmio_bus)),
        virtio,
        devices: worker,
        lazy: origin.lazy,
        base: origin.base,
    };
    Ok(Machine::start(parts, paused)?)
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
