//! A minimal KVM virtual machine monitor for the cloudlet appliance.
//!
//! Layout (after Firecracker's `vstate` split):
//! - [`arch`]: x86-64 memory layout, boot registers, CPUID and MSRs;
//! - [`vstate`]: the KVM handle, guest memory, the VM and its vCPU threads;
//! - [`devices`]: the I/O bus, COM1 serial, power-off and reset ports;
//! - [`loader`]: kernel, command line, initrd and boot information via linux-loader;
//! - [`builder`]: the entry point that turns a [`config::VmConfig`] into a running
//!   [`machine::Machine`];
//! - [`machine`]: the running VM and its event loop;
//! - [`synthesis`], [`lazy`], [`uffd`]: base + overlay → a running VM, the overlay applied up
//!   front or on first touch through userfaultfd.

pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod devices;
pub mod exit;
pub mod lazy;
pub mod loader;
pub mod machine;
pub mod snapshot;
pub mod synthesis;
pub mod uffd;
pub mod vstate;
