//! virtio-console driver (virtio 1.x, section 5.3): the guest's console when the VMM gives it
//! one. main.rs then sends the banner, the `micro.run=` replies and the request/reply lines
//! through it instead of COM1.
//!
//! Only VIRTIO_F_VERSION_1 is negotiated: not VIRTIO_CONSOLE_F_SIZE (the guest has no use for
//! a window size, and without it the device has no configuration change to announce), not
//! VIRTIO_CONSOLE_F_MULTIPORT (so a multi-port device such as QEMU's virtio-serial acts as a
//! single console, port 0, without control queues) and not VIRTIO_CONSOLE_F_EMERG_WRITE.
//! Queue 0 is the receiveq, queue 1 the transmitq; each descriptor owns one buffer for good
//! (no chaining).
//!
//! Every register access is a VM exit (~16 µs on PVM hosts) while the rings are plain memory,
//! so the driver touches registers only where the transport requires it:
//! - Receive: [`RX_BUFS`] device-writable buffers of [`RX_BUF`] bytes are posted at start,
//!   with one notification for all. After the device's interrupt the caller acknowledges it
//!   ([`Console::ack_interrupt`]: one InterruptStatus read and one InterruptACK write, which
//!   virtio-mmio needs to lower the line); then [`Console::read`] takes every filled buffer
//!   from the used ring (memory only; the main loop also does this on every pass, whatever
//!   woke it), and [`Console::flush`] gives them all back with one QueueNotify.
//! - Transmit: [`Console::write`] copies the bytes into one of [`TX_BUFS`] transmit buffers,
//!   used in turn, makes it available and notifies: 1 exit per write. Completions do not
//!   interrupt (the queue's NO_INTERRUPT hint); a write takes them from the used ring when it
//!   needs its buffer back, so it waits only while the device still holds the write before
//!   last. That wait reads no registers: it spins on the used ring for up to [`SPIN_US`],
//!   then asks for completion interrupts and sleeps until one (or a timer) wakes it.
//!
//! So a batch of input (one request line, usually) costs 3 exits and each reply 1, besides
//! the interrupt itself; on COM1 every input byte costs 2 and a reply a few per 16 bytes.
//!
//! The device is not trusted: used elements naming a buffer it does not hold are ignored, used
//! lengths are cut to the buffer, every loop is bounded, and a device that keeps a transmit
//! buffer for [`GIVE_UP_US`] counts as stalled: writes are then dropped, without waiting,
//! until it returns a buffer.

use crate::arena;
use crate::clock;
use crate::irq;
use crate::virtio::{Mmio, Queue};

/// Receive buffers posted (fewer when the queue is smaller): 2 KiB in all, so the longest
/// request line (1024 bytes and its `\n`) fits in one round of buffers.
const RX_BUFS: usize = 8;
/// Bytes per receive buffer (and the most one [`Console::read`] returns).
pub const RX_BUF: usize = 256;
/// Transmit buffers, used in turn (fewer when the queue is smaller).
const TX_BUFS: usize = 2;
/// Bytes per transmit buffer: a longer write takes several buffers (and notifications).
pub const TX_BUF: usize = 2048;
/// How long a write spins on the used ring for its transmit buffer before sleeping.
const SPIN_US: u64 = 2_000;
/// How long a write waits in all for its transmit buffer before the device counts as
/// stalled.
const GIVE_UP_US: u64 = 5_000_000;

/// A virtio console (port 0 of a virtio-console device).
pub struct Console {
    mmio: Mmio,
    /// Whether the device's interrupt reaches the 8259.
    irq_ok: bool,
    /// The device's interrupt line.
    irq: u32,
    /// The receiveq.
    rx: Queue,
    /// Receive buffer `i` (descriptor `i`) is `rx_bufs[i * RX_BUF..][..RX_BUF]`.
    rx_bufs: &'static mut [u8],
    /// Receive buffers in use (at most [`RX_BUFS`] and the queue size).
    rx_n: usize,
    /// Which receive buffers the device holds (the others wait for [`Console::flush`]).
    rx_posted: [bool; RX_BUFS],
    /// The transmitq.
    tx: Queue,
    /// Transmit buffer `i` (descriptor `i`) is `tx_bufs[i * TX_BUF..][..TX_BUF]`.
    tx_bufs: &'static mut [u8],
    /// Transmit buffers in use (at most [`TX_BUFS`] and the queue size).
    tx_n: usize,
    /// Which transmit buffers the device holds.
    tx_busy: [bool; TX_BUFS],
    /// The transmit buffer the next write uses.
    tx_next: usize,
    /// The device kept a transmit buffer for [`GIVE_UP_US`]: writes do not wait for it.
    stalled: bool,
}

impl Console {
    /// Initialises the device behind `mmio`, with every receive buffer posted.
    pub fn new(mmio: Mmio) -> Result<Console, &'static str> {
        // VERSION_1 only: without MULTIPORT, queues 0 and 1 are port 0's.
        mmio.negotiate(0, 0)?;
        let mut rx = mmio.queue(0)?;
        let mut tx = mmio.queue(1)?;
        let rx_n = RX_BUFS.min(usize::from(rx.size));
        let tx_n = TX_BUFS.min(usize::from(tx.size));
        let rx_bufs = arena::bytes(RX_BUFS * RX_BUF, 64);
        for i in 0..rx_n {
            let addr = rx_bufs.as_ptr() as usize + i * RX_BUF;
            rx.set_desc(i as u16, addr, RX_BUF as u32, true, None);
            rx.push(i as u16);
        }
        let tx_bufs = arena::bytes(TX_BUFS * TX_BUF, 64);
        // Writes find their completions in the used ring when they need them.
        tx.suppress_interrupts(true);
        mmio.driver_ok();
        let mut console = Console {
            irq_ok: irq::enable_line(mmio.irq),
            irq: mmio.irq,
            mmio,
            rx,
            rx_bufs,
            rx_n,
            rx_posted: core::array::from_fn(|i| i < rx_n),
            tx,
            tx_bufs,
            tx_n,
            tx_busy: [false; TX_BUFS],
            tx_next: 0,
            stalled: false,
        };
        // One notification for all the receive buffers.
        console.mmio.notify(&mut console.rx);
        Ok(console)
    }

    /// The device's interrupt line when it reaches the 8259 (else the main loop polls).
    pub fn irq(&self) -> Option<u32> {
        self.irq_ok.then_some(self.irq)
    }

    /// Acknowledges the device's interrupt (2 exits), after its line fired and before
    /// [`Console::read`] looks at the ring: input arriving later raises the line again.
    pub fn ack_interrupt(&self) {
        self.mmio.ack_interrupt_once();
    }

    /// Copies the bytes of the next buffer the device has filled into `out` and returns how
    /// many there are (0: nothing more has arrived). Memory only, no exits; the buffer goes
    /// back to the device at the next [`Console::flush`].
    pub fn read(&mut self, out: &mut [u8; RX_BUF]) -> usize {
        // At most a ring's worth of used elements per call: a device publishing elements for
        // buffers it does not hold (ignored below) cannot keep this loop going.
        for _ in 0..self.rx.size {
            let Some((id, len)) = self.rx.pop_used() else {
                return 0;
            };
            let i = usize::from(id);
            if i >= self.rx_n || !self.rx_posted[i] {
                continue;
            }
            self.rx_posted[i] = false;
            // The device cannot have written more than the buffer holds.
            let n = (len as usize).min(RX_BUF);
            out[..n].copy_from_slice(&self.rx_bufs[i * RX_BUF..][..n]);
            if n > 0 {
                return n;
            }
        }
        0
    }

    /// Gives the buffers [`Console::read`] has emptied back to the device, with one
    /// notification for all of them (none when there are none, or when the device asked not
    /// to be notified).
    pub fn flush(&mut self) {
        for i in 0..self.rx_n {
            if !self.rx_posted[i] {
                self.rx_posted[i] = true;
                self.rx.push(i as u16);
            }
        }
        self.mmio.notify(&mut self.rx);
    }

    /// Writes `bytes`: copies them into the next transmit buffer, makes it available and
    /// notifies the device (1 exit; more when `bytes` is longer than [`TX_BUF`] and needs
    /// several buffers). Waits only while the device still holds that buffer; drops the bytes
    /// when the device is stalled (see the module comment).
    pub fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(TX_BUF) {
            let i = self.tx_next;
            if !self.wait_tx(i) {
                break;
            }
            let buf = &mut self.tx_bufs[i * TX_BUF..][..chunk.len()];
            buf.copy_from_slice(chunk);
            let addr = buf.as_ptr() as usize;
            self.tx
                .set_desc(i as u16, addr, chunk.len() as u32, false, None);
            self.tx_busy[i] = true;
            self.tx.push(i as u16);
            self.tx_next = (i + 1) % self.tx_n;
        }
        self.mmio.notify(&mut self.tx);
    }

    /// Waits (as a write does, so bounded) until the device has returned every transmit
    /// buffer, i.e. everything written has left the guest: before powering off.
    pub fn drain(&mut self) {
        for i in 0..self.tx_n {
            if !self.wait_tx(i) {
                return;
            }
        }
    }

    /// Takes back the transmit buffers the device has finished with (memory only).
    fn reclaim(&mut self) {
        // At most a ring's worth, as in `read`; elements for unknown buffers are ignored.
        for _ in 0..self.tx.size {
            let Some((id, _)) = self.tx.pop_used() else {
                return;
            };
            if let Some(busy) = self.tx_busy.get_mut(usize::from(id)) {
                *busy = false;
            }
        }
    }

    /// Waits until the device has returned transmit buffer `i`, looking only at the used
    /// ring: spinning for up to [`SPIN_US`], then sleeping until the device's interrupt
    /// (asked for only now) or a timer. Returns false, and marks the device stalled, when the
    /// buffer is not back after [`GIVE_UP_US`]; a stalled device is not waited for at all
    /// until it returns a buffer.
    fn wait_tx(&mut self, i: usize) -> bool {
        self.reclaim();
        if !self.tx_busy[i] {
            self.stalled = false;
            return true;
        }
        if self.stalled {
            return false;
        }
        // The device can only finish what it has been told about.
        self.mmio.notify(&mut self.tx);
        let start = clock::micros();
        let elapsed = || clock::micros().saturating_sub(start);
        while elapsed() < SPIN_US {
            core::hint::spin_loop();
            self.reclaim();
            if !self.tx_busy[i] {
                return true;
            }
        }
        self.tx.suppress_interrupts(false);
        let done = loop {
            // Acknowledge before looking, so a completion after the look raises the line
            // again (input that arrived meanwhile is found by the main loop's next `read`).
            if self.irq_ok && irq::take(irq::bit(self.irq)) != 0 {
                self.mmio.ack_interrupt_once();
            }
            // Looking after asking for interrupts also catches a completion that came
            // before the request.
            self.reclaim();
            if !self.tx_busy[i] {
                break true;
            }
            if elapsed() >= GIVE_UP_US {
                self.stalled = true;
                break false;
            }
            irq::sleep(Some(if self.irq_ok { 20_000 } else { 500 }));
        };
        self.tx.suppress_interrupts(true);
        done
    }
}
