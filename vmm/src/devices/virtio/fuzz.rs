//! Fuzzing entry point for the virtio request paths, and a scriptable network backend.
//!
//! [`fuzz_process`] turns arbitrary bytes into guest memory plus queue positions and lets the
//! block, network and console devices process whatever rings that memory describes. It must
//! never panic or hang, whatever the bytes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use netback::NetBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::Block;
use super::console::Console;
use super::disk::{CowDisk, Delta};
use super::net::Net;
use super::{QueueIo, VirtioDevice};

/// Guest memory size of a fuzz case.
const MEM_SIZE: usize = 0x1_0000;

/// A network backend that records sent frames and hands out queued ones.
#[derive(Clone)]
pub struct FakeBackend {
    /// Frames the guest sent.
    pub sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Frames waiting for the guest.
    pub inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    /// Number of `poll` calls.
    pub polls: Arc<Mutex<usize>>,
    evt: Arc<EventFd>,
}

impl FakeBackend {
    /// An empty backend.
    pub fn new() -> io::Result<Self> {
        Ok(FakeBackend {
            sent: Arc::default(),
            inbox: Arc::default(),
            polls: Arc::default(),
            evt: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Queues a frame for the guest.
    pub fn push(&self, frame: &[u8]) {
        lock(&self.inbox).push_back(frame.to_vec());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NetBackend for FakeBackend {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        lock(&self.sent).push(frame.to_vec());
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut inbox = lock(&self.inbox);
        while let Some(frame) = inbox.pop_front() {
            if frame.len() <= buf.len() {
                buf[..frame.len()].copy_from_slice(&frame);
                return Ok(Some(frame.len()));
            }
        }
        Ok(None)
    }

    fn event_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn poll(&mut self) -> io::Result<()> {
        *lock(&self.polls) += 1;
        Ok(())
    }
}

/// A ready queue with its rings at `base`, `base + 0x1000`, `base + 0x2000`.
fn queue_at(base: u64, size: u16, next_avail: u16, next_used: u16) -> Option<Queue> {
    let mut q = Queue::new(256).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_next_avail(next_avail);
    q.set_next_used(next_used);
    q.set_ready(true);
    Some(q)
}

/// Runs the block, network and console request paths over guest memory built from `data`.
///
/// Layout of `data`: byte 0 picks the queue size (`1 << (b % 9)`), bytes 1–2 and 3–4 are the
/// device's next available and next used indices, byte 5 bit 0 makes the disk read-only and
/// bits 1–7 say how many frames the backend offers (and, times 97, how many bytes of host
/// input the console gets); the rest is guest memory from address 0 (64 KiB; descriptor table
/// at 0, available ring at 0x1000, used ring at 0x2000, and for the network and console
/// receive queues the same at 0x3000).
pub fn fuzz_process(data: &[u8]) {
    let Some((head, image)) = data.split_at_checked(6) else {
        return;
    };
    let size = 1u16 << (head[0] % 9);
    let next_avail = u16::from_le_bytes([head[1], head[2]]);
    let next_used = u16::from_le_bytes([head[3], head[4]]);
    let read_only = head[5] & 1 != 0;
    let frames = usize::from(head[5] >> 1);
    let image = &image[..image.len().min(MEM_SIZE)];
    let fresh_memory = || -> Option<GuestMemoryMmap> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
        mem.write_slice(image, GuestAddress(0)).ok()?;
        Some(mem)
    };

    if let (Some(mem), Ok(delta)) = (fresh_memory(), Delta::in_memory(0x8000)) {
        if let (Ok(disk), Some(q)) = (
            CowDisk::new(None, delta),
            queue_at(0, size, next_avail, next_used),
        ) {
            let mut blk = Block::new(disk, read_only, "fuzz");
            let mut queues = [q];
            for _ in 0..2 {
                let mut io = QueueIo::new(&mem, &mut queues);
                blk.process_queue(0, &mut io);
            }
        }
    }

    if let (Some(mem), Ok(backend)) = (fresh_memory(), FakeBackend::new()) {
        for i in 0..frames {
            let start = (i * 97) % image.len().max(1);
            let len = (i * 331) % 1700;
            let end = (start + len).min(image.len());
            backend.push(image.get(start..end).unwrap_or_default());
        }
        let rx = queue_at(0x3000, size, next_avail, next_used);
        let tx = queue_at(0, size, next_avail, next_used);
        if let (Some(rx), Some(tx)) = (rx, tx) {
            let mut net = Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1]);
            let mut queues = [rx, tx];
            for index in [1, 0, 1] {
                let mut io = QueueIo::new(&mem, &mut queues);
                net.process_queue(index, &mut io);
            }
            let mut io = QueueIo::new(&mem, &mut queues);
            net.process_host_event(Some(&mut io));
        }
    }

    if let (Some(mem), Ok(room)) = (fresh_memory(), EventFd::new(EFD_NONBLOCK)) {
        let rx = queue_at(0x3000, size, next_avail, next_used);
        let tx = queue_at(0, size, next_avail, next_used);
        if let (Some(rx), Some(tx)) = (rx, tx) {
            let mut console = Console::new(Box::new(io::sink()), room);
            let input = image.get(..frames * 97).unwrap_or(image);
            console.host_input(input, None);
            let mut queues = [rx, tx];
            for index in [1, 0, 1] {
                let mut io = QueueIo::new(&mem, &mut queues);
                console.process_queue(index, &mut io);
            }
            let mut io = QueueIo::new(&mem, &mut queues);
            console.host_input(image, Some(&mut io));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random bytes.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.max(1);
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn survives_random_and_near_valid_inputs() {
        fuzz_process(&[]);
        fuzz_process(&[0; 6]);
        let mut next = rng(42);
        for case in 0..150 {
            let len = (next() % 0x4000) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if data.len() > 0x2010 && case % 2 == 0 {
                // Make the rings plausible: small avail index, head indices and lengths in range.
                data[0] = 3;
                data[1..5].fill(0);
                data[6 + 0x1002] = (next() % 9) as u8;
                data[6 + 0x1003] = 0;
                for d in 0..8 {
                    let at = 6 + d * 16;
                    data[at + 2..at + 8].fill(0);
                    data[at + 9..at + 12].fill(0);
                    data[at + 12] &= 3;
                    data[at + 13] = 0;
                    data[at + 14] %= 8;
                    data[at + 15] = 0;
                    let slot = 6 + 0x1004 + 2 * d;
                    data[slot] %= 8;
                    data[slot + 1] = 0;
                }
            }
            fuzz_process(&data);
        }
    }
}
