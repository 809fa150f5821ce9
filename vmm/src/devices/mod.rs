//! Emulated devices and the I/O bus that routes guest port accesses to them.

pub mod bus;
pub mod legacy;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};
