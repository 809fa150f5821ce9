//! A minimal KVM virtual machine monitor for the cloudlet appliance.
//!
//! Layout (after Firecracker's `vstate` split):
//! - [`arch`]: x86-64 memory layout, boot registers, CPUID and MSRs;
//! - [`vstate`]: the KVM handle, guest memory, the VM and its vCPU threads;
//! - [`devices`]: the I/O bus, COM1 serial, power-off and reset ports;
//! - [`loader`]: kernel, command line, initrd and boot information via linux-loader;
//! - [`device_manager`]: the devices of a machine wired to buses, lines and ioeventfds;
//! - [`builder`]: the entry points that turn a configuration into a running
//!   [`machine::Machine`] (boot, restore a snapshot, synthesise);
//! - [`machine`]: the running VM and its event loop; [`serial_input`]: stdin for the guest;
//! - [`persist`]: the save/restore pair of every stateful component; [`snapshot`]: a machine
//!   saved into a directory and restored from one;
//! - [`synthesis`]: base + overlay → guest memory and machine state, the overlay applied up
//!   front or on first touch through userfaultfd.

pub mod arch;
pub mod builder;
pub mod config;
pub mod confine;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod error;
pub mod exit;
pub mod handoff;
pub mod jail;
pub mod limits;
pub mod loader;
pub mod machine;
pub mod persist;
pub mod seccomp;
pub mod serial_input;
pub mod snapshot;
pub mod synthesis;
pub mod vstate;
