//! The pure logic of the micro guest (`rootfs/guest`), kept apart from the hardware glue so
//! it is unit-tested on the host.
//!
//! - [`cmdline`]: the kernel command line and its `micro.run=` commands;
//! - [`line`]: assembling serial input bytes into request lines;
//! - [`request`]: a line (or a `micro.run` command) → [`Request`];
//! - [`reply`]: replies and the banner, formatted into a fixed [`LineBuf`];
//! - [`primes`]: counting primes ≤ N with a segmented sieve in O(√N) fixed memory;
//! - [`stats`] and [`service`]: the request counter and the dispatcher tying it together;
//! - [`time`]: TSC ticks → microseconds (or raw cycles when the frequency is unknown).
//!
//! The protocol is specified in `docs/micro-guest.md`. Nothing here allocates, panics on any
//! input, or uses `unsafe`.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cmdline;
pub mod line;
pub mod primes;
pub mod reply;
pub mod request;
pub mod service;
pub mod stats;
pub mod time;

pub use line::{LineEvent, LineReader};
pub use reply::{LineBuf, Reply};
pub use request::{ParseError, Request};
pub use service::{Action, Clock, Service};
pub use time::Elapsed;

/// Longest request line in bytes, without its terminator.
pub const MAX_LINE: usize = 255;
/// Room for the longest reply line (an `ok echo` of a [`MAX_LINE`] request), without `\n`.
pub const MAX_REPLY: usize = 320;
