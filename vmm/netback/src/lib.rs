//! Network backends for service VMs: the host side of a guest's virtio-net device.
//!
//! A backend moves whole Ethernet frames (no virtio-net header) between the guest's NIC and
//! the host. Two exist: user-mode networking on smoltcp ([`UserNet`]: no root, no bridge: the
//! VMM is the guest's gateway, with DHCP, port forwards and outbound NAT) and TAP ([`Tap`]).
//!
//! Driving either from an event loop:
//!
//! ```text
//! register backend.event_fd() (readable = work pending)
//! loop {
//!     wait for event_fd readable, or backend.next_timeout() to pass
//!     backend.poll()?
//!     while guest RX buffer available && let Some(n) = backend.recv(buf)? { deliver buf[..n] }
//!     for each frame the guest transmitted { backend.send(frame)? }
//! }
//! ```
//!
//! `send` never needs an immediate `poll`: when it queues work it makes `event_fd` readable.
//! Likewise `recv` makes it readable when it freed room the backend was waiting for.

mod sys;
mod tap;
mod usernet;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use sys::set_linger_zero;
pub use tap::{Tap, TapError};
pub use usernet::{
    ConfigError, Forward, ForwardParseError, UserNet, UserNetConfig, UserNetError, UserNetStats,
    QUEUE_FRAMES,
};

/// The host side of one guest NIC. The VMM's event loop polls [`NetBackend::event_fd`] and
/// calls [`NetBackend::poll`] when it is readable or when [`NetBackend::next_timeout`] expires.
pub trait NetBackend: Send {
    /// Takes one Ethernet frame the guest sent. Malformed frames are dropped, never an error
    /// that stops the device; an `Err` means the backend itself failed.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;

    /// Moves the next frame for the guest into `buf`; `Ok(None)` when none is pending.
    /// A frame larger than `buf` is dropped.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// A file descriptor that becomes readable when [`NetBackend::poll`] has work (host
    /// sockets readable, a TAP frame arrived). Level-triggered.
    fn event_fd(&self) -> RawFd;

    /// Does pending host-side work (accepts, socket reads and writes, timers). Afterwards
    /// [`NetBackend::recv`] may have frames for the guest. By default there is none (a
    /// backend whose work is all in `send` and `recv`).
    fn poll(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// How long the caller may wait before calling [`NetBackend::poll`] again even if
    /// [`NetBackend::event_fd`] stays quiet (protocol timers); `None` for no deadline, the
    /// default (a backend without timers).
    fn next_timeout(&mut self) -> Option<Duration> {
        None
    }

    /// The host → guest port forwards, with the host addresses actually bound; none for a
    /// backend without forwards.
    fn forwards(&self) -> Vec<Forward> {
        Vec::new()
    }

    /// Closes what the backend holds open on the host for the guest (port forward
    /// listeners, relayed connections) once the guest has stopped for good.
    fn close(&mut self) {}
}

/// Feeds arbitrary bytes to a fresh [`UserNet`] (outbound relaying off, so nothing reaches
/// the host's network) as frames: each is a big-endian `u16` length followed by that many
/// bytes (fewer at the end). The entry point for a `cargo fuzz` target; must never panic.
/// Under `cfg(fuzzing)` checksums are not verified, so mutations reach the parsers.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let cfg = UserNetConfig {
        outbound: false,
        ..UserNetConfig::default()
    };
    let Ok(mut net) = UserNet::new(cfg) else {
        return;
    };
    let mut buf = vec![0u8; 2048];
    let mut rest = data;
    let mut sent = 0usize;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (frame, tail) = tail.split_at(len);
        let _ = net.send(frame);
        rest = tail;
        sent += 1;
        if sent % 8 == 0 {
            let _ = net.poll();
            while let Ok(Some(_)) = net.recv(&mut buf) {}
        }
    }
    let _ = net.poll();
    let _ = net.next_timeout();
    while let Ok(Some(_)) = net.recv(&mut buf) {}
}
