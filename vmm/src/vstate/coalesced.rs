//! Coalesced port writes: KVM queues guest writes to chosen ports in a ring instead of exiting
//! to the VMM for each one; the VMM replays them, in order, before it handles the next exit.
//!
//! Used for the serial transmit register: a guest printing a line costs one exit per 16550
//! FIFO burst (its LSR read) instead of one per byte; on PVM hosts an exit to the VMM costs
//! ~27 µs. Order is kept because every exit, of any vCPU, first drains the ring, and the event
//! loop drains it periodically for guests that write without ever reading a register.
//!
//! The ring is mapped here rather than read through `VcpuFd::coalesced_mmio_read`: that needs
//! `&mut VcpuFd`, which a pending `VcpuExit` still borrows when the ring must be drained, and
//! the event loop (which owns no vCPU) must drain it too.
//!
//! Ring layout (`struct kvm_coalesced_mmio_ring`, one page at page offset
//! `KVM_CAP_COALESCED_MMIO` of a vCPU mapping): `u32 first`, `u32 last`, then entries of
//! 24 bytes: `u64 phys_addr`, `u32 len`, `u32 pio`, `u8 data[8]`. KVM produces at `last`;
//! the VMM consumes from `first`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;

use crate::devices::bus::Bus;

const PAGE: usize = 4096;
const ENTRY: usize = 24;
const ENTRIES: u32 = ((PAGE - 8) / ENTRY) as u32;

/// The mapped ring, shared by every vCPU thread and the event loop.
#[derive(Debug)]
pub struct CoalescedRing {
    page: *mut u8,
    lock: Mutex<()>,
}

// SAFETY: the ring page stays mapped for the value's lifetime and every access to the
// consumer side happens under `lock`; KVM writes the producer side concurrently by design,
// read here with volatile loads and fences.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the ring of the VM that `vcpu_fd` belongs to; `page_offset` is the value of
    /// `KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO)`.
    pub fn map(vcpu_fd: &impl AsRawFd, page_offset: usize) -> std::io::Result<Self> {
        // SAFETY: mapping one page of a KVM vCPU fd at the offset KVM reported for the ring;
        // the result is checked and owned by the returned value.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                (page_offset * PAGE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(CoalescedRing {
            page: p.cast(),
            lock: Mutex::new(()),
        })
    }

    fn load(&self, off: usize) -> u32 {
        // SAFETY: `off` is 0 or 4, inside the mapped page; KVM updates these words, so they
        // are read volatile.
        unsafe { std::ptr::read_volatile(self.page.add(off).cast::<u32>()) }
    }

    /// True when writes are waiting.
    pub fn pending(&self) -> bool {
        self.load(0) != self.load(4)
    }

    /// Replays queued writes to `io_bus` (port writes) or `mmio_bus`, oldest first.
    pub fn drain(&self, io_bus: &Bus, mmio_bus: &Bus) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = self.load(0);
        loop {
            let last = self.load(4);
            // A corrupt index (KVM never writes one) would otherwise read past the page.
            if first >= ENTRIES || last >= ENTRIES {
                tracing::warn!(first, last, "coalesced write ring indexes out of range");
                return;
            }
            if first == last {
                return;
            }
            fence(Ordering::Acquire);
            let mut e = [0u8; ENTRY];
            // SAFETY: entry `first` < ENTRIES lies inside the mapped page.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.page.add(8 + first as usize * ENTRY),
                    e.as_mut_ptr(),
                    ENTRY,
                )
            };
            let addr = u64::from_ne_bytes(e[0..8].try_into().expect("8 bytes"));
            let len = (u32::from_ne_bytes(e[8..12].try_into().expect("4 bytes")) as usize).min(8);
            let pio = u32::from_ne_bytes(e[12..16].try_into().expect("4 bytes")) != 0;
            let data = &e[16..16 + len];
            if pio {
                io_bus.write(addr, data);
            } else {
                mmio_bus.write(addr, data);
            }
            first = (first + 1) % ENTRIES;
            fence(Ordering::Release);
            // SAFETY: the `first` word of the mapped ring; only the VMM writes it, under lock.
            unsafe { std::ptr::write_volatile(self.page.cast::<u32>(), first) };
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        // SAFETY: unmapping the page this value mapped; no reference outlives it.
        unsafe { libc::munmap(self.page.cast(), PAGE) };
    }
}
