//! What a snapshot holds besides RAM, and the errors of reading and writing one.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device_manager::DeviceError;
use crate::devices::serial::{SerialError, SerialSnapshot};
use crate::devices::virtio::disk::DiskError;
use crate::devices::virtio::slot::VirtioSlotState;
use crate::devices::virtio::VirtioError;
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::{VcpuError, VcpuState};
use crate::vstate::vm::{VmError, VmState};
use format::state::StateError;

/// The disk δ (a δ file, see [`crate::devices::virtio::disk`]) next to a snapshot's state.
pub const DISK_DELTA_FILE: &str = "disk.delta";

/// Errors while writing or reading a snapshot's files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// File system failure.
    #[error("failed to {0} '{1}'")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// The state file is bad.
    #[error("snapshot state '{0}' is unusable")]
    State(PathBuf, #[source] StateError),
    /// The state does not describe a machine we can build.
    #[error("snapshot '{0}' is inconsistent: {1}")]
    Inconsistent(PathBuf, String),
    /// The state's guest RAM size is unusable here.
    #[error("snapshot '{0}' is inconsistent")]
    MemorySize(PathBuf, #[source] MemoryError),
    /// Reading guest memory failed.
    #[error("failed to read guest memory at {0:#x}")]
    Memory(u64),
    /// The disk δ file is unusable.
    #[error("the disk δ '{0}' is unusable")]
    Disk(PathBuf, #[source] DiskError),
    /// The state has more vCPUs than KVM allows.
    #[error("the state has {requested} vCPUs, more than KVM allows on this host ({max})")]
    TooManyVcpus {
        /// In the state.
        requested: usize,
        /// KVM's maximum.
        max: usize,
    },
    /// The exit eventfd could not be created.
    #[error("failed to set up an event file descriptor")]
    Exit(#[source] std::io::Error),
    /// A device could not be rebuilt.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A vCPU could not be created, paused, saved or restored.
    #[error("failed to {0} a vCPU")]
    Vcpu(&'static str, #[source] VcpuError),
    /// The VM's state could not be saved or restored.
    #[error("failed to {0} the VM's state")]
    Vm(&'static str, #[source] VmError),
    /// The serial port's state could not be saved.
    #[error("failed to save the serial port")]
    Serial(#[from] SerialError),
    /// A virtio device's state could not be saved.
    #[error("failed to save a virtio device")]
    Virtio(#[from] VirtioError),
}

/// Everything but RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Guest RAM in MiB (the layout follows from it).
    pub mem_mib: u64,
    /// One state per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PICs, IOAPIC, PIT, clock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio devices, in window order.
    pub virtio: Vec<VirtioSlotState>,
}

/// What a finished snapshot wrote.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Non-zero bytes written to the memory image.
    pub memory_bytes_written: u64,
    /// Logical size of the memory image.
    pub memory_bytes: u64,
}
