//! The validated description of a VM to build.

use std::path::PathBuf;

use crate::loader::KernelConfig;
use crate::vstate::memory;

/// Most vCPUs we start (APIC ids are 8-bit and 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// Default kernel command line: serial console, reboot through the keyboard controller (which
/// our VMM turns into a clean stop), no PCI probing.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Errors in a VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus {requested} is out of range: use 1 to {max}")]
    Vcpus {
        /// Requested count.
        requested: u64,
        /// Largest allowed.
        max: u64,
    },
    /// Memory size rejected.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
}

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Discarded.
    Null,
}

/// A virtio block device: a raw base image (opened read-only, never written) under a
/// copy-on-write δ of 4 KiB blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw base image; `None` for a blank disk of `size` bytes.
    pub base: Option<PathBuf>,
    /// Disk size in bytes when there is no base (a multiple of 512).
    pub size: u64,
    /// File holding the δ (created when missing, reused when present); `None` keeps it in
    /// memory (it still goes into snapshots).
    pub delta: Option<PathBuf>,
    /// Guest writes fail.
    pub read_only: bool,
}

/// The host side of a guest NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// User-mode networking (no root): the VMM is the guest's gateway and NAT; `forwards` are
    /// `HOST_IP:PORT=GUEST_IP:PORT` host-to-guest TCP forwards.
    User {
        /// Port forwards.
        forwards: Vec<String>,
    },
    /// An existing or new TAP device.
    Tap(String),
}

/// A virtio-net NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackendConfig,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// Default guest MAC: locally administered, QEMU-like.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The virtio devices of a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DevicesConfig {
    /// Block device (virtio-mmio device 0 when present).
    pub disk: Option<DiskConfig>,
    /// NIC (the next virtio-mmio device).
    pub net: Option<NetConfig>,
    /// A virtio console (the device after those): the VMM's standard input and the serial
    /// output destination are connected to it instead of COM1's input (COM1 keeps writing to
    /// the same destination).
    pub console: bool,
}

/// A validated VM description.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// What to boot.
    pub kernel: KernelConfig,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Serial output destination.
    pub serial: SerialOutput,
    /// Feed the VMM's standard input to the guest (its console when it has one, else its
    /// serial port).
    pub serial_input: bool,
    /// The KVM device node.
    pub kvm_path: PathBuf,
    /// virtio devices.
    pub devices: DevicesConfig,
}

impl VmConfig {
    /// Checks ranges that do not need KVM (vCPU count against [`MAX_VCPUS`], memory size
    /// against the host) and returns a config ready to build.
    pub fn new(
        kernel: KernelConfig,
        mem_mib: u64,
        vcpus: u64,
        serial: SerialOutput,
        serial_input: bool,
    ) -> Result<Self, ConfigError> {
        if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus {
                requested: vcpus,
                max: u64::from(MAX_VCPUS),
            });
        }
        memory::validate_size(mem_mib)?;
        Ok(VmConfig {
            kernel,
            mem_mib,
            vcpus: vcpus as u8,
            serial,
            serial_input,
            kvm_path: PathBuf::from("/dev/kvm"),
            devices: DevicesConfig::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::BootProtocol;

    fn kernel() -> KernelConfig {
        KernelConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            protocol: BootProtocol::Linux,
        }
    }

    #[test]
    fn vcpu_and_memory_ranges_are_checked() {
        let e = VmConfig::new(kernel(), 64, 0, SerialOutput::Null, false).unwrap_err();
        assert_eq!(e.to_string(), "--vcpus 0 is out of range: use 1 to 254");
        assert!(VmConfig::new(kernel(), 64, 255, SerialOutput::Null, false).is_err());
        assert!(VmConfig::new(kernel(), 1, 1, SerialOutput::Null, false).is_err());
        let c = VmConfig::new(kernel(), 64, 2, SerialOutput::Null, false).unwrap();
        assert_eq!((c.vcpus, c.mem_mib), (2, 64));
    }
}
