//! virtio over MMIO (virtio 1.x, "modern" transport: version register 2) with split
//! virtqueues, all driven from CPL3: the register windows are in the identity map (the MMIO
//! gap from 3 GiB is mapped user-accessible and cache-disabled), and the guest's addresses are
//! physical addresses, so buffers are handed to devices as they are.
//!
//! Register offsets are from the virtio 1.x specification, section 4.2.2.

use core::sync::atomic::{fence, Ordering};

use micro_service::cmdline::MmioDevice;

use crate::arena;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;

const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_STATUS: usize = 0x060;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_DRIVER: usize = 0x090;
const REG_QUEUE_DEVICE: usize = 0x0a0;
const REG_CONFIG_GENERATION: usize = 0x0fc;
const REG_CONFIG: usize = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// InterruptStatus bit: a queue has new used buffers.
const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration space changed.
const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x (required by this driver).
pub const F_VERSION_1: u64 = 1 << 32;

/// Device type: network card.
pub const DEVICE_NET: u32 = 1;
/// Device type: block device.
pub const DEVICE_BLOCK: u32 = 2;
/// Device type: console.
pub const DEVICE_CONSOLE: u32 = 3;

/// Most descriptors per queue this driver uses.
pub const MAX_QUEUE: u16 = 32;

/// One device's register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: usize,
    /// The interrupt line from the command line.
    pub irq: u32,
}

impl Mmio {
    /// The window of `dev`, if it holds a virtio 1.x device; returns it with its device type
    /// (0 for an empty transport). Legacy devices (version 1) are refused.
    pub fn probe(dev: &MmioDevice) -> Result<(Mmio, u32), &'static str> {
        // Below 4 GiB (our identity map) and big enough for the registers and some config.
        if dev.size < 0x200
            || dev.base.saturating_add(dev.size) > 1 << 32
            || !dev.base.is_multiple_of(4)
        {
            return Err("virtio-mmio window too small, unaligned or above 4 GiB");
        }
        let m = Mmio {
            base: dev.base as usize,
            irq: dev.irq,
        };
        if m.read(REG_MAGIC) != MAGIC {
            return Err("no virtio-mmio magic in the window");
        }
        match m.read(REG_VERSION) {
            2 => Ok((m, m.read(REG_DEVICE_ID))),
            1 => Err("legacy virtio-mmio device (version 1); only version 2 is supported"),
            _ => Err("unknown virtio-mmio version"),
        }
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio window named by the command line, identity-mapped
        // and user-accessible; `off` is a register offset inside it; device registers are
        // read with aligned 32-bit accesses as the specification requires.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as for `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    /// A byte of the device-specific configuration space.
    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: as for `read`; 8-bit fields are read with 8-bit accesses.
        unsafe { ((self.base + REG_CONFIG + off) as *const u8).read_volatile() }
    }

    /// A 32-bit configuration field.
    pub fn config_u32(&self, off: usize) -> u32 {
        self.read(REG_CONFIG + off)
    }

    /// A 64-bit configuration field, read as two 32-bit halves under the configuration
    /// generation counter (so both halves are from the same generation).
    pub fn config_u64(&self, off: usize) -> u64 {
        loop {
            let g = self.read(REG_CONFIG_GENERATION);
            let lo = self.read(REG_CONFIG + off);
            let hi = self.read(REG_CONFIG + off + 4);
            if self.read(REG_CONFIG_GENERATION) == g {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }

    /// Resets the device and negotiates features: `required` must all be offered (and
    /// VIRTIO_F_VERSION_1 always is required), `wanted` are taken when offered. Returns the
    /// negotiated set; the device is then ready for [`Mmio::queue`] and [`Mmio::driver_ok`].
    pub fn negotiate(&self, required: u64, wanted: u64) -> Result<u64, &'static str> {
        self.write(REG_STATUS, 0);
        while self.read(REG_STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read(REG_DEVICE_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        let required = required | F_VERSION_1;
        if offered & required != required {
            self.fail();
            return Err("device lacks a required feature");
        }
        let features = offered & (required | wanted);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, features as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, s);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err("device refused the features");
        }
        Ok(features)
    }

    /// Sets up queue `index` with at most [`MAX_QUEUE`] descriptors (its ring memory comes
    /// from the arena).
    pub fn queue(&self, index: u16) -> Result<Queue, &'static str> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        if self.read(REG_QUEUE_READY) != 0 {
            self.fail();
            return Err("queue already in use");
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            self.fail();
            return Err("queue not available");
        }
        // A power of two no larger than either limit.
        let mut size = u32::from(MAX_QUEUE);
        while size > max {
            size /= 2;
        }
        let q = Queue::new(index, size as u16);
        self.write(REG_QUEUE_NUM, size);
        let addr = |reg: usize, p: usize| {
            self.write(reg, p as u32);
            self.write(reg + 4, (p as u64 >> 32) as u32);
        };
        addr(REG_QUEUE_DESC, q.desc as usize);
        addr(REG_QUEUE_DRIVER, q.avail as usize);
        addr(REG_QUEUE_DEVICE, q.used as usize);
        self.write(REG_QUEUE_READY, 1);
        Ok(q)
    }

    /// Tells the device the driver is ready (after its queues are set up).
    pub fn driver_ok(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Sets FAILED: the driver gives up on the device.
    pub fn fail(&self) {
        let s = self.read(REG_STATUS);
        self.write(REG_STATUS, s | STATUS_FAILED);
    }

    /// Tells the device that queue `q` has new available buffers, unless the device asked
    /// not to be notified.
    pub fn notify(&self, q: &mut Queue) {
        if q.pending_notify {
            q.pending_notify = false;
            // The device may set NO_NOTIFY while it polls; read it only after our avail
            // index store is visible (a full barrier, virtio 1.x section 2.7.7.2).
            fence(Ordering::SeqCst);
            if q.used_flags() & USED_F_NO_NOTIFY == 0 {
                self.write(REG_QUEUE_NOTIFY, u32::from(q.index));
            }
        }
    }

    /// Acknowledges every pending interrupt cause; afterwards a new cause raises the line
    /// again (what an edge-triggered interrupt controller needs). Returns whether any was
    /// pending.
    pub fn ack_interrupt(&self) -> bool {
        let mut any = false;
        loop {
            let s = self.read(REG_INTERRUPT_STATUS);
            if s == 0 {
                return any;
            }
            any = true;
            self.write(REG_INTERRUPT_ACK, s);
        }
    }

    /// Acknowledges the pending interrupt causes with one read of InterruptStatus and, when
    /// that is not 0, one write to InterruptACK: at most 2 VM exits (where
    /// [`Mmio::ack_interrupt`] takes 3 or more when a cause is pending, as it reads the status
    /// again until it is 0). The write acknowledges both defined causes, not only those read: a
    /// cause raised between the read and the write is then cleared too, so a level line cannot
    /// stay high without a new edge. That loses nothing as long as the caller looks at its used
    /// rings afterwards (a used buffer published before the write is seen there, one published
    /// after raises the line again) and ignores configuration changes. Returns the status read.
    pub fn ack_interrupt_once(&self) -> u32 {
        let s = self.read(REG_INTERRUPT_STATUS);
        if s != 0 {
            self.write(REG_INTERRUPT_ACK, INT_VRING | INT_CONFIG);
        }
        s
    }
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// A split virtqueue: descriptor table, available (driver) ring and used (device) ring in one
/// zeroed 4 KiB page from the arena (descriptors at 0, available ring at 0x200, used ring at
/// 0x400: aligned as the specification requires for up to 32 entries).
pub struct Queue {
    index: u16,
    /// Number of descriptors.
    pub size: u16,
    desc: *mut u8,
    avail: *mut u16,
    used: *mut u8,
    next_avail: u16,
    last_used: u16,
    pending_notify: bool,
}

impl Queue {
    fn new(index: u16, size: u16) -> Queue {
        let page = arena::bytes(4096, 4096).as_mut_ptr();
        Queue {
            index,
            size,
            desc: page,
            // SAFETY: offsets inside the 4 KiB page just allocated.
            avail: unsafe { page.add(0x200) }.cast(),
            // SAFETY: as above.
            used: unsafe { page.add(0x400) },
            next_avail: 0,
            last_used: 0,
            pending_notify: false,
        }
    }

    /// Fills descriptor `i`: a buffer at `addr` of `len` bytes, device-writable when
    /// `device_writes`, chained to `next` when given.
    pub fn set_desc(
        &mut self,
        i: u16,
        addr: usize,
        len: u32,
        device_writes: bool,
        next: Option<u16>,
    ) {
        assert!(i < self.size);
        let mut flags = if device_writes { DESC_F_WRITE } else { 0 };
        if next.is_some() {
            flags |= DESC_F_NEXT;
        }
        // SAFETY: descriptor i (16 bytes at 16 i) lies in the queue's page (i < size ≤ 32);
        // the device reads it only after it is made available.
        unsafe {
            let d = self.desc.add(16 * usize::from(i));
            d.cast::<u64>().write_volatile(addr as u64);
            d.add(8).cast::<u32>().write_volatile(len);
            d.add(12).cast::<u16>().write_volatile(flags);
            d.add(14).cast::<u16>().write_volatile(next.unwrap_or(0));
        }
    }

    /// Makes the descriptor chain starting at `head` available to the device (the caller
    /// notifies the device later, through [`Mmio::notify`]).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: avail ring entry `slot` (u16 at 4 + 2 slot) is inside the page; the index
        // (offset 2) is written after the entry and after a release fence, so the device
        // sees the entry (and the descriptors) before the new index.
        unsafe {
            self.avail.add(2 + slot).write_volatile(head);
            fence(Ordering::Release);
            self.next_avail = self.next_avail.wrapping_add(1);
            self.avail.add(1).write_volatile(self.next_avail);
        }
        self.pending_notify = true;
    }

    /// The next buffer the device has finished with: (head descriptor, bytes it wrote).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring's index (u16 at offset 2) is inside the page; the device
        // writes it, hence the volatile read.
        let idx = unsafe { self.used.add(2).cast::<u16>().read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // Read the element only after seeing the index that publishes it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: used element `slot` (8 bytes at 4 + 8 slot) lies inside the page.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot);
            (
                e.cast::<u32>().read_volatile(),
                e.add(4).cast::<u32>().read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// True when the device has finished buffers not yet taken with [`Queue::pop_used`].
    pub fn has_used(&self) -> bool {
        // SAFETY: as in `pop_used`.
        unsafe { self.used.add(2).cast::<u16>().read_volatile() != self.last_used }
    }

    /// Asks the device not to interrupt for this queue (`true`) or to interrupt again.
    /// Only a hint for the device; callers re-check the used ring after enabling.
    pub fn suppress_interrupts(&mut self, suppress: bool) {
        let flags = if suppress { AVAIL_F_NO_INTERRUPT } else { 0 };
        // SAFETY: the available ring's flags (u16 at offset 0) are inside the page.
        unsafe { self.avail.write_volatile(flags) };
        fence(Ordering::SeqCst);
    }

    fn used_flags(&self) -> u16 {
        // SAFETY: the used ring's flags (u16 at offset 0) are inside the page.
        unsafe { self.used.cast::<u16>().read_volatile() }
    }
}
