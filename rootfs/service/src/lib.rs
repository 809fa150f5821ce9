//! The micro guest's service, as plain `no_std` logic that the host can test: the request
//! protocol (see `docs/micro-guest.md`), its TCP framing ([`frame`]), the disk table format
//! ([`table`]), the disk scan's request sizes and checksum ([`scan`]), the command-line keys ([`cmdline`]), serial line assembly ([`line`]), reply
//! formatting into fixed buffers, and the sample compute job (counting primes).
//!
//! Nothing here touches hardware; the guest binary (`rootfs/guest`) wires it to the serial
//! port, its virtio disk and its TCP/IP stack. Parsing untrusted bytes never panics. Host-side
//! clients can use [`frame`] and [`table`] to talk to the guest and to build its disk.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod cmdline;
pub mod fixed;
pub mod frame;
pub mod line;
pub mod model;
pub mod primes;
pub mod request;
pub mod scan;
pub mod table;

pub use fixed::FixedBuf;
pub use line::{Line, LineReader};
pub use primes::PrimeCounter;
pub use request::{ParseError, Request};
