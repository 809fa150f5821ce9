//! The micro guest's service, as plain `no_std` logic that the host can test: the request
//! protocol (see `docs/micro-guest.md`), its TCP framing ([`frame`]), the disk table format
//! ([`table`]), the disk scan's request sizes and checksum ([`scan`]), the command-line keys ([`cmdline`]), serial line assembly ([`line`]), reply
//! formatting into fixed buffers, the sample compute job (counting primes) and the RAM the
//! handoff scenario moves ([`ram`]: base content, model table, steady page dirtier).
//!
//! Nothing here touches hardware; the guest binary (`rootfs/guest`) wires it to the serial
//! port, its virtio disk and its TCP/IP stack. Parsing untrusted bytes never panics.
//!
//! With the `std` feature the crate also holds the host's side, shared by the agent, the
//! `cloudlet` CLI, xtask's demo and benchmarks and the end-to-end tests: `client` (a blocking
//! TCP client speaking [`frame`]) and `oracle` (the answers the guest must give, computed
//! independently of this crate's guest-side code).
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
pub mod client;
pub mod cmdline;
pub mod fixed;
pub mod frame;
pub mod line;
pub mod model;
#[cfg(feature = "std")]
pub mod oracle;
pub mod primes;
pub mod ram;
pub mod request;
pub mod scan;
pub mod table;

pub use fixed::FixedBuf;
pub use line::{Line, LineReader};
pub use primes::PrimeCounter;
pub use request::{ParseError, Request};
