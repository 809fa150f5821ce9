//! Descriptor chains as the devices see them: popped once, copied out of guest memory, and
//! checked — bounded length, properly terminated, every buffer inside guest memory, readable
//! buffers before writable ones — before any byte of a request is interpreted.
//!
//! The guest owns the rings and may rewrite them at any time; after [`QueueIo::pop`] the
//! device works only on its own copy of the chain, so what was checked is what is used.

use std::sync::atomic::Ordering;

use crate::vstate::memory::GuestMemoryMmap;
use tracing::debug;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::MAX_QUEUES;

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Buf {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChainError {
    /// No descriptor could be read (head index out of range, table outside memory).
    #[error("empty chain or head index out of range")]
    Empty,
    /// The last descriptor read still had NEXT set: a loop, a next index out of range, or an
    /// unreadable descriptor cut the chain short.
    #[error("chain is cut short (loop, bad next index or unreadable descriptor)")]
    Broken,
    /// More descriptors than the queue has entries.
    #[error("chain is longer than the queue ({0} entries)")]
    TooLong(u16),
    /// A buffer is not inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("device-readable buffer after a device-writable one")]
    Order,
}

/// A checked descriptor chain: device-readable buffers, then device-writable buffers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Chain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Buf>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Buf>,
}

/// What [`QueueIo::pop`] returns: a usable chain, or the head of a refused one (which the
/// device still has to give back through the used ring).
#[derive(Debug)]
pub(crate) enum Popped {
    /// A checked chain.
    Chain(Chain),
    /// A refused chain.
    Bad {
        /// Head index to return.
        head: u16,
        /// Why it was refused.
        error: ChainError,
    },
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

fn total(bufs: &[Buf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// The pieces `(address, length)` of bytes `[offset, offset + len)` of a buffer list. Stops
/// early if the list is shorter.
pub(crate) fn segments(
    bufs: &[Buf],
    mut offset: u64,
    mut len: u64,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while len > 0 {
            let b = bufs.get(i)?;
            i += 1;
            let blen = u64::from(b.len);
            if offset >= blen {
                offset -= blen;
                continue;
            }
            let n = (blen - offset).min(len);
            // Cannot overflow for a checked chain; ending early makes callers fail cleanly.
            let addr = b.addr.checked_add(offset)?;
            offset = 0;
            len -= n;
            // n <= u32::MAX, so it fits in usize.
            return Some((addr, n as usize));
        }
        None
    })
}

/// Copies bytes `[offset, offset + out.len())` of a buffer list into `out`. False if the
/// buffers are shorter or memory cannot be read.
pub(crate) fn read_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], offset: u64, out: &mut [u8]) -> bool {
    let mut done = 0;
    for (addr, n) in segments(bufs, offset, out.len() as u64) {
        if mem.read_slice(&mut out[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Copies `data` into bytes `[offset, offset + data.len())` of a buffer list. False if the
/// buffers are shorter or memory cannot be written.
pub(crate) fn write_bufs(mem: &GuestMemoryMmap, bufs: &[Buf], offset: u64, data: &[u8]) -> bool {
    let mut done = 0;
    for (addr, n) in segments(bufs, offset, data.len() as u64) {
        if mem.write_slice(&data[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == data.len()
}

/// A device's access to its queues while it processes them: pops checked chains, returns
/// used buffers, and records which interrupts and re-schedules the transport owes afterwards.
///
/// Each queue gives out at most one ring's worth of chains per `QueueIo`; if the guest keeps
/// adding buffers past that, the queue is marked for re-scheduling instead of being processed
/// forever, so one busy guest queue cannot starve the event loop.
pub struct QueueIo<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    popped: [u32; MAX_QUEUES],
    used: u32,
    requeue: u32,
}

impl<'a> QueueIo<'a> {
    /// Access to `queues` in `mem`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap, queues: &'a mut [Queue]) -> Self {
        QueueIo {
            mem,
            queues,
            popped: [0; MAX_QUEUES],
            used: 0,
            requeue: 0,
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// Bit `i` set: queue `i` got used buffers (the guest needs an interrupt).
    pub(crate) fn used_mask(&self) -> u32 {
        self.used
    }

    /// Bit `i` set: queue `i` still has buffers beyond this round's budget.
    pub(crate) fn requeue_mask(&self) -> u32 {
        self.requeue
    }

    /// Pops the next available chain of queue `q` and checks it; `None` when the queue is
    /// empty, not ready, out of budget, or its available index is bogus.
    pub(crate) fn pop(&mut self, q: usize) -> Option<Popped> {
        let mem = self.mem;
        let queue = self.queues.get_mut(q)?;
        if !queue.ready() || q >= MAX_QUEUES {
            return None;
        }
        let size = queue.size();
        if self.popped[q] >= u32::from(size) {
            let more = queue
                .avail_idx(mem, Ordering::Acquire)
                .map(|idx| idx.0 != queue.next_avail())
                .unwrap_or(false);
            if more {
                self.requeue |= 1 << q;
            }
            return None;
        }
        let chain = queue.pop_descriptor_chain(mem)?;
        self.popped[q] += 1;
        let head = chain.head_index();
        let mut out = Chain {
            head,
            ..Chain::default()
        };
        let mut count: u32 = 0;
        let mut last_has_next = false;
        for desc in chain {
            count += 1;
            if count > u32::from(size) {
                return Some(Popped::Bad {
                    head,
                    error: ChainError::TooLong(size),
                });
            }
            last_has_next = desc.has_next();
            let buf = Buf {
                addr: desc.addr(),
                len: desc.len(),
            };
            if buf.len > 0 && !GuestMemoryBackend::check_range(mem, buf.addr, buf.len as usize) {
                return Some(Popped::Bad {
                    head,
                    error: ChainError::OutsideMemory {
                        addr: buf.addr.raw_value(),
                        len: buf.len,
                    },
                });
            }
            if desc.is_write_only() {
                out.writable.push(buf);
            } else if out.writable.is_empty() {
                out.readable.push(buf);
            } else {
                return Some(Popped::Bad {
                    head,
                    error: ChainError::Order,
                });
            }
        }
        let error = if count == 0 {
            ChainError::Empty
        } else if last_has_next {
            ChainError::Broken
        } else {
            return Some(Popped::Chain(out));
        };
        Some(Popped::Bad { head, error })
    }

    /// Puts the last popped chain of queue `q` back (it will be popped again next time). The
    /// pop still counts against this round's budget, so pop/unpop cannot loop forever.
    pub(crate) fn unpop(&mut self, q: usize) {
        if let Some(queue) = self.queues.get_mut(q) {
            queue.go_to_previous_position();
        }
    }

    /// Marks queue `q` for re-scheduling: the device stopped before its available ring was
    /// empty (e.g. its round is full) and wants to be called again soon.
    pub(crate) fn requeue(&mut self, q: usize) {
        if q < MAX_QUEUES {
            self.requeue |= 1 << q;
        }
    }

    /// Returns chain `head` of queue `q` to the guest with `len` bytes written.
    pub(crate) fn add_used(&mut self, q: usize, head: u16, len: u32) {
        let mem = self.mem;
        let Some(queue) = self.queues.get_mut(q) else {
            return;
        };
        match queue.add_used(mem, head, len) {
            Ok(()) => self.used |= 1 << q,
            Err(e) => debug!("virtio queue {q}: cannot return descriptor {head}: {e}"),
        }
    }

    /// Returns a refused chain with nothing written, saying why at debug level.
    pub(crate) fn reject(&mut self, q: usize, head: u16, why: &dyn std::fmt::Display) {
        debug!("virtio queue {q}: refused chain {head}: {why}");
        self.add_used(q, head, 0);
    }

    /// The next well-formed chain of queue `q` whose buffers all go one way: device-writable
    /// only when `writable` (a receive chain), device-readable only otherwise (a transmit
    /// chain). Malformed chains and chains with a buffer the other way go back to the guest
    /// unused (logged). `None` when the queue has no more chains.
    pub(crate) fn pop_one_way(&mut self, q: usize, writable: bool) -> Option<Chain> {
        loop {
            let chain = match self.pop(q)? {
                Popped::Bad { head, error } => {
                    self.reject(q, head, &error);
                    continue;
                }
                Popped::Chain(c) => c,
            };
            let (wrong, why) = if writable {
                (&chain.readable, "device-readable buffer in a receive chain")
            } else {
                (
                    &chain.writable,
                    "device-writable buffer in a transmit chain",
                )
            };
            if wrong.is_empty() {
                return Some(chain);
            }
            self.reject(q, chain.head, &why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{guest_memory, GuestQueue, F_NEXT, F_WRITE};

    #[test]
    fn segments_split_across_buffers() {
        let bufs = [
            Buf {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Buf {
                addr: GuestAddress(0x2000),
                len: 8,
            },
        ];
        let s: Vec<_> = segments(&bufs, 2, 6).collect();
        assert_eq!(
            s,
            vec![(GuestAddress(0x1002), 2), (GuestAddress(0x2000), 4)]
        );
        let s: Vec<_> = segments(&bufs, 5, 100).collect();
        assert_eq!(s, vec![(GuestAddress(0x2001), 7)]);
        assert_eq!(segments(&bufs, 12, 1).count(), 0);
    }

    #[test]
    fn pops_a_good_chain_and_refuses_bad_ones() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 0x1_0000, 8);
        let good = gq.add_chain(&[(0x4_0000, 16, false), (0x4_1000, 1, true)]);
        // A loop: 0 -> 1 -> 0.
        gq.set_desc(6, 0x4_2000, 16, F_NEXT, 7);
        gq.set_desc(7, 0x4_3000, 16, F_NEXT, 6);
        gq.publish(6);
        // Outside memory.
        let outside = gq.add_chain(&[(0xffff_0000, 16, false)]);
        // Writable before readable.
        let order = gq.add_chain(&[(0x4_0000, 16, true), (0x4_1000, 1, false)]);
        // Next index out of range.
        gq.set_desc(5, 0x4_0000, 16, F_NEXT | F_WRITE, 200);
        gq.publish(5);
        // Head out of range.
        gq.publish(99);
        let mut queues = [gq.queue()];
        let mut io = QueueIo::new(&mem, &mut queues);
        match io.pop(0) {
            Some(Popped::Chain(c)) => {
                assert_eq!(c.head, good);
                assert_eq!(c.readable_len(), 16);
                assert_eq!(c.writable_len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let errors: Vec<_> = std::iter::from_fn(|| io.pop(0))
            .map(|p| match p {
                Popped::Bad { error, .. } => error,
                Popped::Chain(c) => panic!("accepted {c:?}"),
            })
            .collect();
        assert_eq!(errors[0], ChainError::Broken);
        assert!(matches!(errors[1], ChainError::OutsideMemory { .. }));
        assert_eq!(errors[2], ChainError::Order);
        assert_eq!(errors[3], ChainError::Broken);
        assert_eq!(errors[4], ChainError::Empty);
        assert_eq!(errors.len(), 5);
        let _ = (outside, order);
    }

    #[test]
    fn budget_is_one_ring_per_round_and_bogus_avail_index_is_ignored() {
        let mem = guest_memory();
        let mut gq = GuestQueue::new(&mem, 0x1_0000, 4);
        let head = gq.add_chain(&[(0x4_0000, 16, false)]);
        // The guest claims 6 entries (more than the ring holds): refused outright.
        gq.set_avail_idx(6);
        let mut queues = [gq.queue()];
        let mut io = QueueIo::new(&mem, &mut queues);
        assert!(io.pop(0).is_none());
        // Four entries, all the same head: one ring's worth, then a requeue if more follow.
        for i in 0..4 {
            gq.set_avail_entry(i, head);
        }
        gq.set_avail_idx(4);
        let mut io = QueueIo::new(&mem, &mut queues);
        for _ in 0..4 {
            assert!(matches!(io.pop(0), Some(Popped::Chain(_))));
        }
        gq.set_avail_idx(5);
        assert!(io.pop(0).is_none());
        assert_eq!(io.requeue_mask(), 1);
    }
}
