//! Emulated devices and the I/O bus that routes guest port accesses to them.

pub mod bus;
pub mod legacy;
pub mod serial;

pub use bus::{Bus, BusDevice};
