//! KVM-backed machine state: the KVM handle, guest memory, the VM and its vCPUs.

pub mod coalesced;
pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;
