//! VM handoff: a running VM moves to the vmm of another appliance (`format::handoff` is the
//! stream).
//!
//! - [`dirty`]: which guest pages and disk blocks changed since a point in time — KVM's dirty
//!   log on the memory slots (guest writes) OR the VMM's own record of its writes (virtio
//!   devices, the lazy fill), and the disk δ's written blocks.
//! - [`send`]: the source. Round 0 sends the VM's δ against the base both appliances hold
//!   while the VM runs; rounds 1..n send what was dirtied meanwhile; once the bytes left fit
//!   the downtime budget at the measured bandwidth, the vCPUs pause, the last pages, the disk
//!   tail and the machine state go out, and the source waits for the target's `Resumed`. Any
//!   failure before `Resumed` resumes the VM here with all its state.
//! - [`receive`]: the target (`vmm receive`). Maps the base `MAP_PRIVATE`, checks the
//!   preamble (base id, token) and `Start`, applies pages as they arrive, restores the machine
//!   from `State` and resumes it, then answers `Resumed`. Any failure before that exits
//!   without a VM and without leaving a file behind.

pub mod dirty;
pub mod link;
pub mod receive;
pub mod send;
