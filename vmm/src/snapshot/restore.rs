//! Restoring a machine from its saved state: the state file read and checked, then (over
//! memory that already holds the guest's RAM) devices and vCPUs rebuilt. Order (as
//! Firecracker's): VM → devices → vCPUs created → VM state → vCPU states → pending device
//! interrupts raised again. The builder then spawns the vCPUs and starts them.

use std::path::Path;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use format::base::STATE;
use format::state::{self as persist, Kind};

use super::state::{MachineState, SnapshotError, DISK_DELTA_FILE};
use crate::config::{DevicesConfig, NetBackendConfig, SerialOutput};
use crate::device_manager::{self, Devices, DiskStart};
use crate::devices::virtio::block::DiskSnapshot;
use crate::devices::virtio::disk::{Delta, DiskError};
use crate::devices::virtio::slot::SlotKind;
use crate::exit::ExitNotifier;
use crate::persist::Persist;
use crate::vstate::kvm::KvmContext;
use crate::vstate::memory;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// A machine rebuilt from its state, its vCPUs created but not spawned.
pub struct Restored {
    /// The VM, its state restored.
    pub vm: Vm,
    /// The vCPUs, their states restored.
    pub vcpus: Vec<Vcpu>,
    /// The devices, their states restored.
    pub devices: Devices,
    /// Where vCPUs and devices report that the VM stops.
    pub exit: Arc<ExitNotifier>,
}

/// Reads and checks a snapshot's state file.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).map_err(|e| SnapshotError::Io("read", path.clone(), e))?;
    let state: MachineState = persist::decode(Kind::Machine, &bytes)
        .map_err(|e| SnapshotError::State(path.clone(), e))?;
    let bad = |why: String| SnapshotError::Inconsistent(dir.to_owned(), why);
    if state.vcpus.is_empty() || state.vcpus.len() > usize::from(crate::config::MAX_VCPUS) {
        return Err(bad(format!("{} vCPUs", state.vcpus.len())));
    }
    if state.serial.in_buffer.len() > 64 {
        return Err(bad("serial FIFO holds more than 64 bytes".into()));
    }
    memory::validate_size(state.mem_mib)
        .map_err(|e| SnapshotError::MemorySize(dir.to_owned(), e))?;
    Ok(state)
}

/// The δ blocks of the snapshot's disk (empty without a disk or a δ file).
pub fn read_disk_delta(
    dir: &Path,
    state: &MachineState,
) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
    let Some(disk) = state.virtio.iter().find_map(|s| s.disk.as_ref()) else {
        return Ok(Vec::new());
    };
    let path = dir.join(DISK_DELTA_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bad = |e: DiskError| SnapshotError::Disk(path.clone(), e);
    // Read-only: restoring must not change the snapshot (not even a torn tail).
    let delta = Delta::open_read_only(&path, disk.size).map_err(bad)?;
    delta
        .delta_blocks()
        .map(|b| b.map(|(n, data)| (n, data.into_owned())).map_err(bad))
        .collect()
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
                let saved = s.disk.clone().unwrap_or(DiskSnapshot {
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

/// Devices and vCPUs of `state` on `vm`, over memory `mem` that already holds the guest's RAM:
/// the devices of the snapshot (see [`devices_for_restore`]) with `cfg`'s overrides, COM1
/// writing to `serial`, a disk's δ from `disk_start`.
pub fn restore_machine(
    kvm: &KvmContext,
    vm: Vm,
    mem: &GuestMemoryMmap,
    state: &MachineState,
    serial: &SerialOutput,
    cfg: &DevicesConfig,
    disk_start: DiskStart,
) -> Result<Restored, SnapshotError> {
    if state.vcpus.len() > kvm.max_vcpus {
        return Err(SnapshotError::TooManyVcpus {
            requested: state.vcpus.len(),
            max: kvm.max_vcpus,
        });
    }
    let exit = Arc::new(ExitNotifier::new().map_err(SnapshotError::Exit)?);
    let devices_cfg = devices_for_restore(state, cfg);
    let devices = device_manager::attach_devices(
        &vm,
        mem,
        &exit,
        serial,
        Some(&state.serial),
        &devices_cfg,
        Some(&state.virtio),
        disk_start,
    )?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for index in 0..state.vcpus.len() {
        vcpus.push(
            Vcpu::new(
                &vm,
                index as u8,
                devices.io_bus.clone(),
                devices.mmio_bus.clone(),
                exit.clone(),
                kvm.msr_indices.clone(),
            )
            .map_err(|e| SnapshotError::Vcpu("create", e))?,
        );
    }
    let vm = Vm::restore(vm, &state.vm).map_err(|e| SnapshotError::Vm("restore", e))?;
    let vcpus = vcpus
        .into_iter()
        .zip(&state.vcpus)
        .map(|(vcpu, s)| Vcpu::restore(vcpu, s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SnapshotError::Vcpu("restore", e))?;
    // Interrupts the devices had pending when the snapshot was taken, on lines whose state
    // the controllers' restore just overwrote.
    for slot in &devices.virtio {
        slot.lock().reassert_interrupt();
    }
    Ok(Restored {
        vm,
        vcpus,
        devices,
        exit,
    })
}
