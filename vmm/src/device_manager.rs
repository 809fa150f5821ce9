//! The devices of a machine, fresh or from saved states, wired to their buses, interrupt
//! lines and ioeventfds: COM1, the i8042 and power-off ports, and the virtio devices (disk,
//! NIC, console) in that window order.

use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::config::{DevicesConfig, NetBackendConfig, SerialOutput};
use crate::devices::legacy::{DebugExit, I8042};
use crate::devices::serial::{SerialDevice, SerialError, SerialOut, SerialSnapshot};
use crate::devices::virtio::block::{Block, DiskSnapshot};
use crate::devices::virtio::console::Console;
use crate::devices::virtio::disk::{CowDisk, Delta, DiskError};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::slot::{Slot, SlotKind, VirtioSlotState};
use crate::devices::virtio::{VirtioDevice, VirtioError};
use crate::devices::{bus::BusError, Bus, Interrupt};
use crate::exit::ExitNotifier;
use crate::persist::Persist;
use crate::vstate::vm::{Vm, VmError};

/// Errors while setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Creating an eventfd or opening an output failed.
    #[error("failed to set up {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Wiring a device failed.
    #[error("failed to attach a device")]
    Bus(#[from] BusError),
    /// An interrupt line could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The saved serial port state was refused.
    #[error("snapshot device state is invalid")]
    Serial(#[from] SerialError),
    /// The saved states have no device at this window.
    #[error("snapshot device state is invalid: the snapshot has no virtio device {0} ({1:?})")]
    MissingSlot(u32, SlotKind),
    /// The saved device at this window is of another kind.
    #[error("snapshot device state is invalid: virtio device {0} is a {1:?} in the snapshot, not a {2:?}")]
    SlotKind(u32, SlotKind, SlotKind),
    /// The saved states have another number of devices.
    #[error("snapshot device state is invalid: the snapshot has {0} virtio devices, this VM is configured with {1}")]
    SlotCount(usize, usize),
    /// A virtio device could not be set up.
    #[error("failed to set up {0}")]
    Virtio(&'static str, #[source] VirtioError),
    /// The disk's base or δ could not be opened.
    #[error("failed to set up {0}")]
    Disk(&'static str, #[source] DiskError),
    /// A port forward does not parse.
    #[error("failed to set up a port forward: '{0}'")]
    Forward(String, #[source] netback::ForwardParseError),
    /// User-mode networking could not start.
    #[error("failed to set up user-mode networking")]
    UserNet(#[source] netback::UserNetError),
    /// The TAP device could not be opened.
    #[error("failed to set up the TAP device")]
    Tap(#[source] netback::TapError),
    /// A queue's ioeventfd could not be registered.
    #[error("failed to set up a queue notification")]
    QueueNotify(#[source] kvm_ioctls::Error),
    /// A console was configured without an output.
    #[error("failed to set up the virtio console: no output given")]
    NoConsoleOutput,
}

/// Opens the serial output named by the config and, with `console`, a second writer to the
/// same destination for the virtio console. A file is created once and both writers share its
/// open file description (one file offset), so neither overwrites the other's output.
pub fn open_outputs(
    out: &SerialOutput,
    console: bool,
) -> Result<(SerialOut, Option<SerialOut>), DeviceError> {
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
                .map_err(|e| DeviceError::Io("the serial output file", e))?;
            let second = if console {
                let c = f
                    .try_clone()
                    .map_err(|e| DeviceError::Io("the console output file", e))?;
                Some(Box::new(c) as SerialOut)
            } else {
                None
            };
            (Box::new(f), second)
        }
    })
}

fn io_err(e: std::io::Error) -> DeviceError {
    DeviceError::Io("an event file descriptor", e)
}

/// The devices of a machine and the buses that reach them.
pub struct Devices {
    /// The port I/O bus (COM1, i8042, power-off port).
    pub io_bus: Bus,
    /// The MMIO bus (the virtio windows).
    pub mmio_bus: Bus,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Written when the guest's serial port or console has room for more input.
    pub input_drained: EventFd,
    /// The virtio devices, in window order.
    pub virtio: Vec<Slot>,
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

fn virtio_err(what: &'static str) -> impl Fn(VirtioError) -> DeviceError {
    move |e| DeviceError::Virtio(what, e)
}

fn disk_err(what: &'static str) -> impl Fn(DiskError) -> DeviceError {
    move |e| DeviceError::Disk(what, e)
}

/// Creates the NIC's host side.
fn net_backend(cfg: &NetBackendConfig) -> Result<Box<dyn netback::NetBackend>, DeviceError> {
    match cfg {
        NetBackendConfig::User { forwards } => {
            let mut c = netback::UserNetConfig::default();
            for f in forwards {
                c.forwards.push(
                    f.parse::<netback::Forward>()
                        .map_err(|e| DeviceError::Forward(f.clone(), e))?,
                );
            }
            let net = netback::UserNet::new(c).map_err(DeviceError::UserNet)?;
            for f in net.forwards() {
                tracing::info!("forwarding {f}");
            }
            Ok(Box::new(net))
        }
        NetBackendConfig::Tap(name) => Ok(Box::new(
            netback::Tap::open(name).map_err(DeviceError::Tap)?,
        )),
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
) -> Result<Vec<Slot>, DeviceError> {
    let mut slots = Vec::new();
    let mut index = 0u32;
    let mut place =
        |kind: SlotKind| -> Result<(u32, Interrupt, Option<&VirtioSlotState>), DeviceError> {
            let i = index;
            index += 1;
            let state = match saved {
                Some(states) => {
                    let st = states
                        .iter()
                        .find(|s| s.index == i)
                        .ok_or(DeviceError::MissingSlot(i, kind))?;
                    if st.kind != kind {
                        return Err(DeviceError::SlotKind(i, st.kind, kind));
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
            .map_err(disk_err("the base disk"))?;
        let size = match (&base, state.and_then(|s| s.disk.as_ref())) {
            (_, Some(saved)) => saved.size,
            (Some(f), None) => CowDisk::size_for_base(
                f.metadata()
                    .map_err(|e| DeviceError::Io("the base disk", e))?
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
        .map_err(disk_err("the disk δ"))?;
        let disk = CowDisk::new(base, delta).map_err(disk_err("the disk"))?;
        let dev = Block::new(disk, d.read_only, "cloudlet-disk");
        let t = transport(dev, mem, irq, state).map_err(virtio_err("the virtio disk"))?;
        let mut slot = plug(vm, mmio_bus, i, SlotKind::Block, t)?;
        slot.disk = Some(DiskSnapshot {
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
        let (out, input_room) = console.ok_or(DeviceError::NoConsoleOutput)?;
        let (i, irq, state) = place(SlotKind::Console)?;
        let dev = Console::new(out, input_room);
        let t = transport(dev, mem, irq, state).map_err(virtio_err("the virtio console"))?;
        slots.push(plug(vm, mmio_bus, i, SlotKind::Console, t)?);
    }
    if let Some(states) = saved {
        if states.len() != slots.len() {
            return Err(DeviceError::SlotCount(states.len(), slots.len()));
        }
    }
    Ok(slots)
}

/// A fresh transport for `dev`, or one restored from its snapshot state.
fn transport<D: VirtioDevice>(
    dev: D,
    mem: &GuestMemoryMmap,
    irq: Interrupt,
    state: Option<&VirtioSlotState>,
) -> Result<MmioTransport<D>, VirtioError> {
    match state {
        Some(st) => MmioTransport::restore((dev, mem.clone(), irq), &st.mmio),
        None => MmioTransport::new(dev, mem.clone(), irq),
    }
}

/// Registers the transport's queue eventfds as KVM ioeventfds on its notify register and
/// puts its window on the MMIO bus.
fn plug<D: VirtioDevice + 'static>(
    vm: &Vm,
    mmio_bus: &mut Bus,
    index: u32,
    kind: SlotKind,
    t: MmioTransport<D>,
) -> Result<Slot, DeviceError> {
    let base = layout::VIRTIO_MMIO_START + u64::from(index) * layout::VIRTIO_MMIO_SIZE;
    for (q, evt) in t.queue_events().iter().enumerate() {
        vm.fd()
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                q as u32,
            )
            .map_err(DeviceError::QueueNotify)?;
    }
    let slot = Slot::new(index, kind, t);
    mmio_bus.insert(slot.transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
    Ok(slot)
}

/// COM1 (fresh, or from a snapshot) writing to `output`, the i8042, the power-off port and
/// the virtio devices (a console writes to `output` too).
#[allow(clippy::too_many_arguments)]
pub fn attach_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    exit: &Arc<ExitNotifier>,
    output: &SerialOutput,
    serial_state: Option<&SerialSnapshot>,
    virtio: &DevicesConfig,
    virtio_state: Option<&[VirtioSlotState]>,
    disk_start: DiskStart,
) -> Result<Devices, DeviceError> {
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
        Some(s) => SerialDevice::restore((serial_irq, drained, serial_out), s)?,
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
