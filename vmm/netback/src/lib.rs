//! Network backends for service VMs: the host side of a guest's virtio-net device.
//!
//! A backend moves whole Ethernet frames (no virtio-net header) between the guest's NIC and
//! the host. Two exist: user-mode networking on smoltcp (no root, no bridge: the VMM is the
//! guest's gateway) and TAP.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

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
    /// [`NetBackend::recv`] may have frames for the guest.
    fn poll(&mut self) -> io::Result<()>;

    /// How long the caller may wait before calling [`NetBackend::poll`] again even if
    /// [`NetBackend::event_fd`] stays quiet (protocol timers); `None` for no deadline.
    fn next_timeout(&mut self) -> Option<Duration>;
}
