//! Building a VM from a [`VmConfig`]: KVM → memory → VM → kernel → devices → vCPUs → start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::arch::{layout, mptable};
use crate::config::{DevicesConfig, NetBackendConfig, SerialOutput, VmConfig};
use crate::devices::legacy::{DebugExit, I8042};
use crate::devices::serial::{SerialDevice, SerialOut};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::console::Console;
use crate::devices::virtio::disk::{CowDisk, Delta};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::slot::{Slot, SlotKind};
use crate::devices::Interrupt;
use crate::devices::{bus::BusError, Bus};
use crate::exit::ExitNotifier;
use crate::loader::{self, LoaderError};
use crate::machine::Machine;
use crate::snapshot::{self, MachineState, SerialSnapshot, VirtioSlotState};
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
    /// A virtio device could not be set up.
    #[error("failed to set up {0}: {1}")]
    Virtio(&'static str, String),
    /// User-mode networking could not be set up (a forward's port is taken …).
    #[error("failed to set up user-mode networking")]
    UserNet(#[source] netback::UserNetError),
    /// More vCPUs than KVM allows.
    #[error("--vcpus {requested} exceeds what KVM allows on this host ({max})")]
    TooManyVcpus {
        /// Requested.
        requested: u8,
        /// KVM's maximum.
        max: usize,
    },
}

/// Opens the serial output named by the config and, with `console`, a second writer to the
/// same destination for the virtio console. A file is created once and both writers share its
/// open file description (one file offset), so neither overwrites the other's output.
pub fn open_outputs(
    out: &SerialOutput,
    console: bool,
) -> Result<(SerialOut, Option<SerialOut>), BuildError> {
    Ok(match out {
        SerialOutput::Stdout => (
            Box::new(std::io::stdout()),
            console.then(|| Box::new(std::io::stdout()) as SerialOut),
        ),
        SerialOutput::Null => (
            Box::new(std::io::sink()),
            console.then(|| Box::new(std::io::sink()) as SerialOut),
        ),
        SerialOutput::File(p) => {
            let f = std::fs::File::create(p)
                .map_err(|e| BuildError::Io("the serial output file", e))?;
            let second = if console {
                let c = f
                    .try_clone()
                    .map_err(|e| BuildError::Io("the console output file", e))?;
                Some(Box::new(c) as SerialOut)
            } else {
                None
            };
            (Box::new(f), second)
        }
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

    let mut kernel_cfg = cfg.kernel.clone();
    kernel_cfg.cmdline.push_str(&virtio_cmdline(&cfg.devices));
    let kernel = loader::load_kernel(&mem, &kernel_cfg)?;
    mptable::write(&mem, cfg.vcpus)?;
    let t_load = t0.elapsed();

    let exit = Arc::new(ExitNotifier::new().map_err(io_err)?);
    let devices = attach_devices(
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
    let machine = start(vm, mem, spawned, devices, exit, cfg.serial_input, false)?;
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
    virtio: Vec<Slot>,
}

/// Where a disk's δ starts from when a VM is restored or synthesised.
pub enum DiskStart {
    /// Empty (a fresh boot) or the δ file named in the config.
    Config,
    /// These blocks (from a snapshot or an overlay), in memory unless the config names a δ
    /// file (which is then created with them).
    Blocks(Vec<(u64, Vec<u8>)>),
}

/// The `virtio_mmio.device=` command-line entries Linux (and the micro guest) use to find
/// the devices `cfg` describes.
pub fn virtio_cmdline(cfg: &DevicesConfig) -> String {
    let n =
        usize::from(cfg.disk.is_some()) + usize::from(cfg.net.is_some()) + usize::from(cfg.console);
    (0..n as u64)
        .map(|i| {
            format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE,
                u64::from(layout::VIRTIO_IRQ_BASE) + i
            )
        })
        .collect()
}

fn virtio_err(what: &'static str) -> impl Fn(crate::devices::virtio::VirtioError) -> BuildError {
    move |e| BuildError::Virtio(what, e.to_string())
}

/// Creates the NIC's host side.
fn net_backend(cfg: &NetBackendConfig) -> Result<Box<dyn netback::NetBackend>, BuildError> {
    match cfg {
        NetBackendConfig::User { forwards } => {
            let mut c = netback::UserNetConfig::default();
            for f in forwards {
                c.forwards
                    .push(f.parse::<netback::Forward>().map_err(|e| {
                        BuildError::Virtio("a port forward", format!("'{f}': {e}"))
                    })?);
            }
            let net = netback::UserNet::new(c).map_err(BuildError::UserNet)?;
            for f in net.forwards() {
                tracing::info!("forwarding {f}");
            }
            Ok(Box::new(net))
        }
        NetBackendConfig::Tap(name) => {
            Ok(Box::new(netback::Tap::open(name).map_err(|e| {
                BuildError::Virtio("the TAP device", e.to_string())
            })?))
        }
    }
}

/// Attaches the virtio devices of `cfg` (fresh, or from `saved` states) at their windows,
/// with their interrupt lines and ioeventfds. `console` is the console's output and input-room
/// eventfd, given when `cfg.console` is set.
fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    cfg: &DevicesConfig,
    saved: Option<&[VirtioSlotState]>,
    disk_start: DiskStart,
    console: Option<(SerialOut, EventFd)>,
) -> Result<Vec<Slot>, BuildError> {
    let mut slots = Vec::new();
    let mut index = 0u32;
    let mut place =
        |kind: SlotKind| -> Result<(u32, Interrupt, Option<&VirtioSlotState>), BuildError> {
            let i = index;
            index += 1;
            let state = match saved {
                Some(states) => {
                    let st = states.iter().find(|s| s.index == i).ok_or_else(|| {
                        BuildError::DeviceState(format!(
                            "the snapshot has no virtio device {i} ({kind:?})"
                        ))
                    })?;
                    if st.kind != kind {
                        return Err(BuildError::DeviceState(format!(
                            "virtio device {i} is a {:?} in the snapshot, not a {kind:?}",
                            st.kind
                        )));
                    }
                    Some(st)
                }
                None => None,
            };
            // Raised with KVM_IRQ_LINE from the device thread, not through an irqfd: KVM
            // injects an irqfd on an IOAPIC line from a kernel worker, one more thread
            // wake-up per interrupt (see `IrqLine`).
            let irq = Interrupt::Line(vm.irq_line(layout::VIRTIO_IRQ_BASE + i)?);
            Ok((i, irq, state))
        };
    if let Some(d) = &cfg.disk {
        let (i, irq, state) = place(SlotKind::Block)?;
        let base = d
            .base
            .as_deref()
            .map(CowDisk::open_base)
            .transpose()
            .map_err(|e| BuildError::Virtio("the base disk", e.to_string()))?;
        let size = match (&base, state.and_then(|s| s.disk.as_ref())) {
            (_, Some(saved)) => saved.size,
            (Some(f), None) => CowDisk::size_for_base(
                f.metadata()
                    .map_err(|e| BuildError::Io("the base disk", e))?
                    .len(),
            ),
            (None, None) => d.size,
        };
        let blocks = match disk_start {
            DiskStart::Blocks(b) => Some(b),
            DiskStart::Config => None,
        };
        let delta = match (&d.delta, blocks) {
            (Some(p), Some(b)) => Delta::create_from_blocks(p, size, b),
            (Some(p), None) if p.exists() => Delta::open(p, size),
            (Some(p), None) => Delta::create(p, size),
            (None, Some(b)) => Delta::from_blocks(size, b),
            (None, None) => Delta::in_memory(size),
        }
        .map_err(|e| BuildError::Virtio("the disk δ", e.to_string()))?;
        let disk =
            CowDisk::new(base, delta).map_err(|e| BuildError::Virtio("the disk", e.to_string()))?;
        let dev = Block::new(disk, d.read_only, "cloudlet-disk");
        let t = transport(dev, mem, irq, state).map_err(virtio_err("the virtio disk"))?;
        let mut slot = plug(vm, mmio_bus, i, SlotKind::Block, t)?;
        slot.disk = Some(crate::snapshot::DiskSnapshot {
            base: d
                .base
                .as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
            size,
            read_only: d.read_only,
        });
        slots.push(slot);
    }
    if let Some(n) = &cfg.net {
        let (i, irq, state) = place(SlotKind::Net)?;
        let dev = Net::new(net_backend(&n.backend)?, n.mac);
        let t = transport(dev, mem, irq, state).map_err(virtio_err("the virtio NIC"))?;
        slots.push(plug(vm, mmio_bus, i, SlotKind::Net, t)?);
    }
    if cfg.console {
        let (out, input_room) = console.ok_or(BuildError::Virtio(
            "the virtio console",
            "no output given".into(),
        ))?;
        let (i, irq, state) = place(SlotKind::Console)?;
        let dev = Console::new(out, input_room);
        let t = transport(dev, mem, irq, state).map_err(virtio_err("the virtio console"))?;
        slots.push(plug(vm, mmio_bus, i, SlotKind::Console, t)?);
    }
    if let Some(states) = saved {
        if states.len() != slots.len() {
            return Err(BuildError::DeviceState(format!(
                "the snapshot has {} virtio devices, this VM is configured with {}",
                states.len(),
                slots.len()
            )));
        }
    }
    Ok(slots)
}

/// The devices a restored VM gets: those of its snapshot. The disk sits on the base the
/// snapshot names unless `cfg` names a disk (and a δ file to keep); the NIC uses `cfg`'s
/// backend, or user-mode networking without forwards when `cfg` has none; a console is there
/// when the snapshot has one (whatever `cfg` says).
pub fn devices_for_restore(state: &MachineState, cfg: &DevicesConfig) -> DevicesConfig {
    let mut out = DevicesConfig::default();
    for s in &state.virtio {
        match s.kind {
            SlotKind::Block => {
                let saved = s.disk.clone().unwrap_or(crate::snapshot::DiskSnapshot {
                    base: None,
                    size: 0,
                    read_only: false,
                });
                let mut d = cfg.disk.clone().unwrap_or_default();
                if d.base.is_none() {
                    d.base = saved.base;
                }
                d.size = saved.size;
                d.read_only |= saved.read_only;
                out.disk = Some(d);
            }
            SlotKind::Net => {
                out.net = Some(cfg.net.clone().unwrap_or(crate::config::NetConfig {
                    backend: NetBackendConfig::User {
                        forwards: Vec::new(),
                    },
                    mac: crate::config::DEFAULT_MAC,
                }));
            }
            SlotKind::Console => out.console = true,
        }
    }
    out
}

/// A fresh transport for `dev`, or one restored from its snapshot state.
fn transport<D: crate::devices::virtio::VirtioDevice>(
    dev: D,
    mem: &GuestMemoryMmap,
    irq: Interrupt,
    state: Option<&VirtioSlotState>,
) -> Result<MmioTransport<D>, crate::devices::virtio::VirtioError> {
    match state {
        Some(st) => MmioTransport::restore(dev, mem.clone(), irq, &st.mmio),
        None => MmioTransport::new(dev, mem.clone(), irq),
    }
}

/// Registers the transport's queue eventfds as KVM ioeventfds on its notify register and
/// puts its window on the MMIO bus.
fn plug<D: crate::devices::virtio::VirtioDevice + 'static>(
    vm: &Vm,
    mmio_bus: &mut Bus,
    index: u32,
    kind: SlotKind,
    t: MmioTransport<D>,
) -> Result<Slot, BuildError> {
    let base = layout::VIRTIO_MMIO_START + u64::from(index) * layout::VIRTIO_MMIO_SIZE;
    for (q, evt) in t.queue_events().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                q as u32,
            )
            .map_err(|e| BuildError::Virtio("a queue notification", e.to_string()))?;
    }
    let slot = Slot::new(index, kind, t);
    mmio_bus.insert(slot.transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
    Ok(slot)
}

/// COM1 (fresh, or from a snapshot) writing to `output`, the i8042, the power-off port and
/// the virtio devices (a console writes to `output` too).
#[allow(clippy::too_many_arguments)]
fn attach_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    exit: &Arc<ExitNotifier>,
    output: &SerialOutput,
    serial_state: Option<&SerialSnapshot>,
    virtio: &DevicesConfig,
    virtio_state: Option<&[VirtioSlotState]>,
    disk_start: DiskStart,
) -> Result<Devices, BuildError> {
    let (serial_out, console_out) = open_outputs(output, virtio.console)?;
    let serial_irq = Interrupt::Line(vm.irq_line(layout::COM1_IRQ)?);
    // Written by COM1 when the guest empties its receive FIFO, and by a console when it
    // delivered input it had refused: the event loop then offers the input it holds again.
    let input_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
    let drained = input_drained.try_clone().map_err(io_err)?;
    let console = match console_out {
        Some(out) => Some((out, input_drained.try_clone().map_err(io_err)?)),
        None => None,
    };
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
    let mut mmio_bus = Bus::new();
    let virtio = attach_virtio(
        vm,
        mem,
        &mut mmio_bus,
        virtio,
        virtio_state,
        disk_start,
        console,
    )?;
    Ok(Devices {
        io_bus,
        mmio_bus,
        serial,
        input_drained,
        virtio,
    })
}

/// vCPU threads spawned paused, with what must exist before them.
struct Spawned {
    signals: crate::machine::StopSignals,
    coalesced: Option<Arc<CoalescedRing>>,
    handles: Vec<crate::vstate::vcpu::VcpuHandle>,
}

/// Spawns the vCPU threads, paused: a thread's start-up (stack, signal stack, thread-local
/// state: ~0.1 ms and some 50 page faults here) then overlaps the last checks before the
/// guest may run, instead of delaying its first instruction. (The virtio device thread is
/// not started before those checks: devices must not act for a VM that is then refused.)
fn spawn_vcpus(vm: &Vm, vcpus: Vec<Vcpu>) -> Result<Spawned, BuildError> {
    // Signals the event loop handles must be blocked before the vCPU threads exist, so that
    // they inherit the mask and the signals reach the loop's signalfd.
    let signals =
        crate::machine::StopSignals::block().map_err(|e| BuildError::Io("signal handling", e))?;
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

/// Assembles the machine around spawned vCPUs and lets them run unless `paused`.
fn start(
    vm: Vm,
    mem: GuestMemoryMmap,
    spawned: Spawned,
    devices: Devices,
    exit: Arc<ExitNotifier>,
    serial_input: bool,
    paused: bool,
) -> Result<Machine, BuildError> {
    let virtio = Arc::new(devices.virtio);
    let worker = crate::devices::virtio::worker::DeviceWorker::start(virtio.clone())
        .map_err(|e| BuildError::Io("the virtio device thread", e))?;
    // Input typed while the VM was being built reaches the guest's console (or serial port)
    // before its first instruction.
    let console = virtio.iter().find(|s| s.kind == SlotKind::Console);
    let input = serial_input.then(|| {
        crate::machine::SerialInput::primed(&|b: &[u8]| {
            crate::machine::deliver_input(&devices.serial, console, b)
        })
    });
    let mut machine = Machine::new(
        vm,
        mem,
        spawned.handles,
        devices.serial,
        devices.input_drained,
        exit,
        spawned.signals,
        input,
    );
    if let Some(ring) = spawned.coalesced {
        machine.set_coalesced(ring, devices.io_bus, devices.mmio_bus);
    }
    machine.set_virtio(virtio, worker);
    machine.set_paused(true);
    if !paused {
        machine.resume()?;
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
        crate::synthesis::LazyPlan::new(&cfg.base, &checked, &mut timings)?
    } else {
        None
    };
    let (mem, mut plan) = match lazy {
        Some((mem, plan)) => (mem, Some(plan)),
        None => (
            crate::synthesis::materialise(
                &cfg.base,
                &checked,
                cfg.threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                &mut timings,
            )?,
            None,
        ),
    };
    let vm = Vm::new(&kvm, &mem)?;
    if let Some(p) = &plan {
        p.vm_created();
    }
    let t_restore = Instant::now();
    // The chunk checks ran beside the VM's creation; they must pass before any vCPU runs.
    let mut fill = None;
    let mut gate = || -> Result<(), BuildError> {
        if let Some(p) = plan.take() {
            fill = Some(p.start(&mut timings)?);
        }
        Ok(())
    };
    // The disk: the base's own (read-only, shared), under the overlay's δ.
    let mut devices = cfg.devices.clone();
    if checked.manifest.disk_bytes.is_some() {
        let mut d = devices.disk.take().unwrap_or_default();
        if d.base.is_none() {
            d.base = Some(cfg.base.join(format::base::DISK));
        }
        devices.disk = Some(d);
    }
    let disk_blocks = checked
        .overlay
        .disk_blocks()
        .map_err(crate::synthesis::SynthesisError::from)?;
    let mut machine = restore_machine(
        kvm,
        vm,
        mem,
        &checked.state,
        cfg.serial.clone(),
        cfg.serial_input,
        cfg.paused,
        &devices,
        DiskStart::Blocks(disk_blocks),
        &mut gate,
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
    snapshot::prefault_data(&cfg.snapshot, &mem, &[]);
    let disk_start = snapshot::read_disk_delta(&cfg.snapshot, &state)?;
    let vm = Vm::new(&kvm, &mem)?;
    let machine = restore_machine(
        kvm,
        vm,
        mem,
        &state,
        cfg.serial.clone(),
        cfg.serial_input,
        cfg.paused,
        &cfg.devices,
        DiskStart::Blocks(disk_start),
        &mut || Ok(()),
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
#[allow(clippy::too_many_arguments)]
fn restore_machine(
    kvm: KvmContext,
    vm: Vm,
    mem: GuestMemoryMmap,
    state: &MachineState,
    serial: SerialOutput,
    serial_input: bool,
    paused: bool,
    devices_cfg: &DevicesConfig,
    disk_start: DiskStart,
    before_start: &mut dyn FnMut() -> Result<(), BuildError>,
) -> Result<Machine, BuildError> {
    if state.vcpus.len() > kvm.max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: state.vcpus.len() as u8,
            max: kvm.max_vcpus,
        });
    }
    let exit = Arc::new(ExitNotifier::new().map_err(io_err)?);
    let devices_cfg = devices_for_restore(state, devices_cfg);
    let devices = attach_devices(
        &vm,
        &mem,
        &exit,
        &serial,
        Some(&state.serial),
        &devices_cfg,
        Some(&state.virtio),
        disk_start,
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
    // Interrupts the devices had pending when the snapshot was taken, on lines whose state
    // the controllers' restore just overwrote.
    for slot in &devices.virtio {
        slot.lock().reassert_interrupt();
    }
    let spawned = spawn_vcpus(&vm, vcpus)?;
    before_start()?;
    start(vm, mem, spawned, devices, exit, serial_input, paused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_console_comes_after_the_disk_and_the_nic() {
        let mut cfg = DevicesConfig {
            console: true,
            ..Default::default()
        };
        let line = |i: u64| {
            format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                layout::VIRTIO_MMIO_START + i * layout::VIRTIO_MMIO_SIZE,
                u64::from(layout::VIRTIO_IRQ_BASE) + i
            )
        };
        assert_eq!(virtio_cmdline(&cfg), line(0));
        cfg.disk = Some(crate::config::DiskConfig::default());
        cfg.net = Some(crate::config::NetConfig {
            backend: NetBackendConfig::User {
                forwards: Vec::new(),
            },
            mac: crate::config::DEFAULT_MAC,
        });
        assert_eq!(virtio_cmdline(&cfg), line(0) + &line(1) + &line(2));
    }

    #[test]
    fn serial_and_console_share_an_output_file_without_overwriting() {
        let path = std::env::temp_dir().join(format!("vmm-console-out-{}", std::process::id()));
        std::fs::write(&path, b"old contents, longer than what follows\n").unwrap();
        let (mut serial, console) = open_outputs(&SerialOutput::File(path.clone()), true).unwrap();
        let mut console = console.unwrap();
        serial.write_all(b"serial 1\n").unwrap();
        console.write_all(b"console\n").unwrap();
        serial.write_all(b"serial 2\n").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text, "serial 1\nconsole\nserial 2\n");
        let (_, none) = open_outputs(&SerialOutput::Null, false).unwrap();
        assert!(none.is_none());
    }
}
