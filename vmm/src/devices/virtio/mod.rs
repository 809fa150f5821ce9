//! virtio devices over the virtio-mmio transport.
//!
//! - [`mmio`]: the virtio-mmio (version 2) register window — feature negotiation, the status
//!   state machine, split virtqueues, interrupts, save/restore — around any [`VirtioDevice`];
//! - [`block`] over [`disk`]: virtio-blk on a copy-on-write disk (read-only raw base plus a
//!   per-VM δ of 4 KiB blocks);
//! - [`net`]: virtio-net on a [`netback::NetBackend`];
//! - [`console`]: virtio-console, one port, for the VMM's standard input and output (far fewer
//!   VM exits per byte than the 16550): output in one write per queue notification, host input
//!   in a bounded buffer until the guest posts receive buffers;
//! - `queue`: descriptor chains popped once, copied, and checked before a device looks at them.
//!
//! # Wiring a device into the VMM
//!
//! For device `i` (window `base = VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE`, line
//! `gsi = VIRTIO_IRQ_BASE + i`, see [`crate::arch::layout`]):
//!
//! 1. `irq = Interrupt::Line(vm.irq_line(gsi)?)` (an eventfd registered as a KVM irqfd works
//!    too, but KVM injects those from a kernel worker: one more wake-up per interrupt);
//!    `t = MmioTransport::new(device, mem.clone(), irq)` (or, from a saved state,
//!    `MmioTransport::restore((device, mem.clone(), irq), &state)`: [`crate::persist::Persist`]);
//! 2. for each `(q, evt)` in `t.queue_events().iter().enumerate()`: register `evt` with KVM as an
//!    ioeventfd at `base + NOTIFY_OFFSET` (4 bytes) with datamatch `q as u32`, and add it to the
//!    event loop's epoll set; when it fires call `t.process_queue_event(q)`;
//! 3. if `t.host_event_fd()` is `Some(fd)` add `fd` (level-triggered, readable) to epoll and
//!    call `t.process_host_event()` when it fires *or* when `t.next_timeout()` elapses. After
//!    every call into the transport, watch `fd` only while `t.host_events_wanted()` (e.g.
//!    `EPOLL_CTL_MOD` between `EPOLLIN` and 0): a TAP fd stays readable while the guest has no
//!    receive buffer, and must not spin the loop. Interest returns through a queue event
//!    (the guest posting buffers, or activation, which signals every queue event once);
//! 4. put `Arc<Mutex<MmioTransport<_>>>` on the MMIO bus at `[base, base + VIRTIO_MMIO_SIZE)`,
//!    and give the guest `virtio_mmio.device=4K@0x<base>:<gsi>` on its command line;
//! 5. host input for a console goes in with [`MmioTransport::host_input`] from whichever thread
//!    has it, under the transport's lock (no hop through the device thread); when it takes
//!    fewer bytes than offered, keep the rest and offer it again once the console's input-room
//!    eventfd (given to [`console::Console::new`]) is written.
//!
//! Snapshots: `t.save()` ([`crate::persist::Persist`]) gives a plain serde [`MmioState`]; restore builds a fresh device
//! (same disk/backend) and calls `MmioTransport::restore`. A block device's disk δ is saved
//! separately, through [`disk::Delta::delta_blocks`] (or by flushing a file-backed δ) — under
//! the same lock as `save`, so state and disk agree. A received frame still waiting for a
//! guest buffer is not saved (a lost frame, which networks tolerate); a console's pending input
//! is.

pub mod block;
pub mod console;
pub mod disk;
#[doc(hidden)]
pub mod fuzz;
pub mod mmio;
pub mod net;
mod queue;
pub mod slot;
#[cfg(test)]
pub(crate) mod testing;
pub mod worker;

use std::os::fd::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use block::{Block, BlockState};
pub use console::{Console, ConsoleState};
pub use disk::{CowDisk, Delta, DiskError};
pub use mmio::{MmioState, MmioTransport, QueueSnapshot, NOTIFY_OFFSET};
pub use net::{Net, NetState};
pub use queue::QueueIo;

/// Feature bit 32: the device and driver follow virtio 1.x (required from every driver).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Most queues a device may have.
pub const MAX_QUEUES: usize = 8;

/// Errors of the virtio transport and devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// Creating a queue notification eventfd failed.
    #[error("failed to create a queue event")]
    EventFd(#[source] std::io::Error),
    /// The device declares more queues than [`MAX_QUEUES`].
    #[error("device declares {0} queues, at most {MAX_QUEUES} are supported")]
    TooManyQueues(usize),
    /// A queue maximum size is not a power of two in 1..=32768.
    #[error("invalid queue {index} maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The rejected size.
        size: u16,
    },
    /// Saved state belongs to another kind of device.
    #[error("saved state is for virtio device type {saved}, this device is type {device}")]
    DeviceType {
        /// Type in the state.
        saved: u32,
        /// Type of the device.
        device: u32,
    },
    /// Saved state has a different number of queues or queue sizes.
    #[error("saved queue layout does not match the device: {0}")]
    QueueLayout(String),
    /// A saved queue is not a valid queue.
    #[error("saved queue {index} is invalid")]
    QueueState {
        /// Queue index.
        index: usize,
        /// Why.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved ready queue's rings are outside guest memory.
    #[error("saved queue {0} has rings outside guest memory")]
    QueueMemory(usize),
    /// Saved status or features are inconsistent.
    #[error("saved transport state is inconsistent: {0}")]
    TransportState(String),
    /// Saved device state does not match the device it is restored into.
    #[error("saved device state does not match the device: {0}")]
    DeviceState(String),
}

/// A device behind the virtio-mmio transport. The transport owns the queues, the guest memory
/// and the interrupt; the device sees them through a [`QueueIo`] while it processes a queue.
pub trait VirtioDevice: Send {
    /// virtio device type (1 = net, 2 = block, 3 = console).
    const DEVICE_TYPE: u32;
    /// Maximum size of each queue (powers of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, [`VIRTIO_F_VERSION_1`] included.
    fn features(&self) -> u64;
    /// The device's config space as the driver reads it.
    fn config_space(&self) -> &[u8];
    /// Reads device config space at `offset` (bytes past the end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data);
    }
    /// Writes device config space; read-only fields ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK having accepted `features`; an error makes the transport set
    /// DEVICE_NEEDS_RESET.
    fn activate(&mut self, _features: u64) -> Result<(), VirtioError> {
        Ok(())
    }
    /// Processes available buffers of queue `index` (the driver notified it).
    fn process_queue(&mut self, index: usize, io: &mut QueueIo<'_>);
    /// A host-side file descriptor to poll for readability, if the device has one.
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether the host fd should be watched right now: false while the device cannot take
    /// host input (a received frame waits for a guest buffer), since a level-triggered fd
    /// would wake the event loop for nothing.
    fn host_events_wanted(&self) -> bool {
        true
    }
    /// Host-side work ([`VirtioDevice::host_event_fd`] readable or the timeout elapsed);
    /// `io` is `None` while the driver has not activated the device.
    fn process_host_event(&mut self, _io: Option<&mut QueueIo<'_>>) {}
    /// Input from the host for the guest (a console's keyboard): the device takes what it has
    /// room for and delivers what it can to posted buffers; `io` is `None` while the driver
    /// has not activated the device. Returns how many bytes it took (devices without host
    /// input take none).
    fn host_input(&mut self, _bytes: &[u8], _io: Option<&mut QueueIo<'_>>) -> usize {
        0
    }
    /// How long the event loop may sleep before calling
    /// [`VirtioDevice::process_host_event`] even if nothing is readable.
    fn next_timeout(&mut self) -> Option<Duration> {
        None
    }
    /// The driver reset the device: drop per-activation state.
    fn reset(&mut self);
    /// The device's own state, for a snapshot.
    fn save(&self) -> DeviceState;
    /// Takes a saved state back (before the transport re-activates the device).
    fn restore(&mut self, state: &DeviceState) -> Result<(), VirtioError>;
}

/// Device-specific saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// A virtio-blk device.
    Block(BlockState),
    /// A virtio-net device.
    Net(NetState),
    /// A virtio-console device.
    Console(ConsoleState),
}

/// Copies `config[offset..]` into `data`, zero-filling what lies past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
