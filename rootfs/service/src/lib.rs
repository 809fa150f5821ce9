//! The micro guest's service, as plain `no_std` logic that the host can test: the request
//! protocol (see `docs/micro-guest.md`), the command-line `micro.run=` list, reply formatting
//! into fixed buffers, and the sample compute job (counting primes).
//!
//! Nothing here touches hardware; the guest binary (`rootfs/guest`) wires it to the serial
//! port. Parsing untrusted bytes never panics.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod cmdline;
pub mod fixed;
pub mod model;
pub mod primes;
pub mod request;

pub use fixed::FixedBuf;
pub use primes::PrimeCounter;
pub use request::{ParseError, Request};
