//! virtio-net driver (virtio 1.x, section 5.1) as a smoltcp `Device`.
//!
//! Queue 0 receives, queue 1 transmits; each descriptor owns one 2 KiB buffer for good (no
//! chaining): a 12-byte `virtio_net_hdr_v1` (all zero on transmit: no offloads are
//! negotiated) followed by one Ethernet frame of at most 1514 bytes. Features: VERSION_1 is
//! required, MAC is taken when offered (else a locally administered address is made up); no
//! checksum or segmentation offload, no mergeable receive buffers, no control queue.
//!
//! Received buffers go back to the device as soon as smoltcp has read them; the device is
//! notified once per poll ([`Net::flush`]). Transmit completions do not interrupt (the queue's
//! NO_INTERRUPT hint) unless every transmit buffer is in flight.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::arena;
use crate::irq;
use crate::virtio::{Mmio, Queue, MAX_QUEUE};

/// VIRTIO_NET_F_MAC: the device has a MAC address in its configuration space.
const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1` (with `num_buffers`), as VERSION_1 requires.
const HDR: usize = 12;
/// Bytes per packet buffer.
const BUF: usize = 2048;
/// Largest Ethernet frame (without FCS) sent or expected.
pub const MAX_FRAME: usize = 1514;

/// The receive side: descriptor `i` is buffer `i`.
struct Rx {
    q: Queue,
    bufs: &'static mut [u8],
}

/// The transmit side: descriptor `i` is buffer `i`; `free` lists the idle ones.
struct Tx {
    q: Queue,
    bufs: &'static mut [u8],
    free: [u16; MAX_QUEUE as usize],
    nfree: usize,
    /// Whether completions currently interrupt (only while every buffer is in flight).
    irq_on: bool,
    /// Where frames go that find no free buffer (they are dropped; TCP resends).
    scratch: &'static mut [u8],
}

/// A virtio-net device.
pub struct Net {
    mmio: Mmio,
    /// Whether the device's interrupt reaches the 8259.
    pub irq_ok: bool,
    /// The device's interrupt line.
    pub irq: u32,
    /// The interface's MAC address.
    pub mac: [u8; 6],
    rx: Rx,
    tx: Tx,
}

impl Net {
    /// Initialises the device behind `mmio`, with all receive buffers posted.
    pub fn new(mmio: Mmio, seed: u64) -> Result<Net, &'static str> {
        let features = mmio.negotiate(0, F_MAC)?;
        let mut rxq = mmio.queue(0)?;
        let mut txq = mmio.queue(1)?;
        let mac = if features & F_MAC != 0 {
            core::array::from_fn(|i| mmio.config_u8(i))
        } else {
            // Locally administered, unicast.
            let b = seed.to_le_bytes();
            [0x02, b[0], b[1], b[2], b[3], b[4]]
        };
        let rx_bufs = arena::bytes(usize::from(rxq.size) * BUF, 4096);
        for i in 0..rxq.size {
            let addr = rx_bufs.as_ptr() as usize + usize::from(i) * BUF;
            rxq.set_desc(i, addr, BUF as u32, true, None);
            rxq.push(i);
        }
        let tx_bufs = arena::bytes(usize::from(txq.size) * BUF, 4096);
        let mut free = [0u16; MAX_QUEUE as usize];
        for (i, f) in free.iter_mut().enumerate().take(usize::from(txq.size)) {
            *f = i as u16;
        }
        txq.suppress_interrupts(true);
        mmio.driver_ok();
        let mut net = Net {
            irq_ok: irq::enable_line(mmio.irq),
            irq: mmio.irq,
            mmio,
            mac,
            rx: Rx {
                q: rxq,
                bufs: rx_bufs,
            },
            tx: Tx {
                nfree: usize::from(txq.size),
                irq_on: false,
                q: txq,
                bufs: tx_bufs,
                free,
                scratch: arena::bytes(BUF, 16),
            },
        };
        net.flush();
        Ok(net)
    }

    /// Notifies the device of buffers made available since the last call.
    pub fn flush(&mut self) {
        self.mmio.notify(&mut self.rx.q);
        self.mmio.notify(&mut self.tx.q);
    }

    /// Acknowledges the device's interrupt causes (before looking for work, so that later
    /// work raises the line again).
    pub fn ack_interrupt(&self) {
        self.mmio.ack_interrupt();
    }

    /// True when received frames are waiting.
    pub fn rx_pending(&self) -> bool {
        self.rx.q.has_used()
    }
}

impl Tx {
    /// Takes back the buffers the device has sent; true when one is free.
    fn reclaim(&mut self) -> bool {
        while let Some((id, _)) = self.q.pop_used() {
            if usize::from(id) < usize::from(self.q.size) && self.nfree < self.free.len() {
                self.free[self.nfree] = id;
                self.nfree += 1;
            }
        }
        if self.nfree > 0 {
            if self.irq_on {
                self.irq_on = false;
                self.q.suppress_interrupts(true);
            }
            return true;
        }
        if self.irq_on {
            return false;
        }
        // All in flight: ask for an interrupt when one completes, then look once more (a
        // completion between the look above and the request would not interrupt).
        self.irq_on = true;
        self.q.suppress_interrupts(false);
        self.q.has_used() && self.reclaim()
    }
}

/// A received frame (receive buffer `id`, `len` bytes written by the device).
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: u32,
}

/// Permission to send one frame.
pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let id = self.id;
        let start = usize::from(id) * BUF;
        let len = (self.len as usize).clamp(HDR, BUF);
        let r = f(&self.rx.bufs[start + HDR..start + len]);
        self.rx.q.push(id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        if len > BUF - HDR || !tx.reclaim() {
            return f(&mut tx.scratch[..len.min(BUF)]);
        }
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        let start = usize::from(id) * BUF;
        let buf = &mut tx.bufs[start..start + HDR + len];
        buf[..HDR].fill(0);
        let r = f(&mut buf[HDR..]);
        let addr = buf.as_ptr() as usize;
        tx.q.set_desc(id, addr, (HDR + len) as u32, false, None);
        tx.q.push(id);
        r
    }
}

impl phy::Device for Net {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (id, len) = self.rx.q.pop_used()?;
        let id = id % self.rx.q.size;
        Some((
            RxToken {
                rx: &mut self.rx,
                id,
                len,
            },
            TxToken { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim().then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(usize::from(self.tx.q.size));
        caps
    }
}
