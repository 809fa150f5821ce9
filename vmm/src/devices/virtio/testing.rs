//! Test helpers: a driver's view of a split virtqueue, written straight into guest memory.

use std::io::Write;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Descriptor flag: the chain continues at `next`.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// 1 MiB of guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

/// The driver side of one split queue: descriptor table at `base`, available ring after it,
/// used ring after that (4-byte aligned).
pub struct GuestQueue {
    mem: GuestMemoryMmap,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl GuestQueue {
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = GuestQueue {
            mem: mem.clone(),
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        };
        // Rings may deliberately lie outside memory; then there is nothing to clear.
        let _ = q.mem.write_obj(0u16, GuestAddress(avail + 2));
        let _ = q.mem.write_obj(0u16, GuestAddress(used + 2));
        q
    }

    /// A ready queue pointing at these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a chain `(addr, len, device-writable)` into the next free descriptors and
    /// publishes it; returns its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let last = k + 1 == bufs.len();
            let flags = if last { 0 } else { F_NEXT } | if writable { F_WRITE } else { 0 };
            self.set_desc(i, addr, len, flags, self.next_desc);
        }
        self.publish(head);
        head
    }

    /// Puts `head` in the next available-ring slot and bumps the index.
    pub fn publish(&mut self, head: u16) {
        self.set_avail_entry(self.avail_idx % self.size, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes available-ring slot `slot`.
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        let at = self.avail + 4 + 2 * u64::from(slot);
        self.mem.write_obj(head, GuestAddress(at)).unwrap();
    }

    /// Writes the available index.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used-ring element `i`: (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// Guest memory with a receive queue (0x1_0000) and a transmit queue (0x2_0000) of 8
/// entries: the layout the net and console tests share.
pub struct RxTx {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device side of both queues.
    pub queues: [Queue; 2],
    /// The driver side of the receive queue.
    pub rx: GuestQueue,
    /// The driver side of the transmit queue.
    pub tx: GuestQueue,
}

impl RxTx {
    /// Both queues, empty.
    pub fn new() -> Self {
        let mem = guest_memory();
        let rx = GuestQueue::new(&mem, 0x1_0000, 8);
        let tx = GuestQueue::new(&mem, 0x2_0000, 8);
        RxTx {
            queues: [rx.queue(), tx.queue()],
            mem,
            rx,
            tx,
        }
    }
}

/// A writer (a device's output sink) that records its bytes and counts its `write` calls.
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        g.0.extend_from_slice(b);
        g.1 += 1;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().0.clone()
    }

    /// How many `write` calls it took.
    pub fn writes(&self) -> usize {
        self.0.lock().unwrap().1
    }
}
