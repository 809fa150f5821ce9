//! virtio-blk driver (virtio 1.x, section 5.2): synchronous reads and writes of 512-byte
//! sectors and flushes through one request queue, one request at a time.
//!
//! A request is a descriptor chain: the 16-byte header (type, reserved, sector), the data
//! (device-writable for reads) and the 1-byte status the device writes. The data is one
//! physically contiguous buffer, described by as few descriptors as the device's limits allow:
//! a single one unless the device offers VIRTIO_BLK_F_SIZE_MAX (then segments of at most
//! `size_max` bytes). A device without VIRTIO_BLK_F_SEG_MAX gets one data descriptor per
//! request (as Linux does), one with it at most `seg_max`; and a chain never takes more than
//! the queue's descriptors. A buffer larger than one request can carry is moved in several
//! requests, one after another.
//!
//! The guest waits for completion by spinning on the used ring for a short while (a disk
//! request on a VMM takes microseconds, and spinning at CPL3 costs nothing on PVM hosts), then
//! by sleeping until the device's interrupt, or with a short timeout when its line is not one
//! of the 8259's.

use crate::arena;
use crate::clock;
use crate::irq;

/// How long to spin for a request's completion before sleeping until its interrupt.
const SPIN_US: u64 = 2_000;
use crate::virtio::{Mmio, Queue};

/// VIRTIO_BLK_F_SIZE_MAX: `size_max` (config offset 8, u32) bounds each data segment.
const F_SIZE_MAX: u64 = 1 << 1;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` (config offset 12, u32) bounds the data segments.
const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO: the device is read-only.
const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH: the device has a write cache and takes flush requests.
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// Most data bytes per request this driver sends (larger buffers take several requests).
const MAX_REQUEST: usize = 1 << 20;

/// Why a disk request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device is read-only.
    ReadOnly,
    /// Sectors beyond the end of the disk, or a length not a multiple of 512.
    OutOfRange,
    /// The device answered VIRTIO_BLK_S_IOERR.
    Io,
    /// The device answered VIRTIO_BLK_S_UNSUPP (or something else).
    Unsupported,
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            BlkError::ReadOnly => "the disk is read-only",
            BlkError::OutOfRange => "beyond the end of the disk",
            BlkError::Io => "disk I/O error",
            BlkError::Unsupported => "request not supported by the disk",
        })
    }
}

/// A virtio-blk device.
pub struct Blk {
    mmio: Mmio,
    queue: Queue,
    /// Whether the device's interrupt reaches the 8259.
    irq_ok: bool,
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// The device is read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    flush: bool,
    /// Most bytes one data descriptor may describe.
    seg_bytes: usize,
    /// Most data descriptors one request may use.
    segs: u16,
    /// Most data bytes one request carries (whole sectors, ≥ 512).
    max_request: usize,
    /// Request header (16 bytes) and status byte (at 16), device-visible.
    req: &'static mut [u8],
}

impl Blk {
    /// Initialises the device behind `mmio`.
    pub fn new(mmio: Mmio) -> Result<Blk, &'static str> {
        let features = mmio.negotiate(0, F_RO | F_FLUSH | F_SIZE_MAX | F_SEG_MAX)?;
        let queue = mmio.queue(0)?;
        if queue.size < 4 {
            return Err("virtio-blk queue too small");
        }
        // A data segment is at most `size_max` bytes (when the device says so); a request has
        // at most `seg_max` of them (1 when the device does not say), and never more than the
        // queue holds besides the header and status descriptors.
        let seg_bytes = match mmio.config_u32(8) {
            n if features & F_SIZE_MAX != 0 && n > 0 => n as usize,
            _ => MAX_REQUEST,
        };
        let seg_max = match mmio.config_u32(12) {
            n if features & F_SEG_MAX != 0 && n > 0 => n,
            _ => 1,
        };
        let segs = seg_max.min(u32::from(queue.size - 2)) as u16;
        let max_request =
            seg_bytes.saturating_mul(usize::from(segs)).min(MAX_REQUEST) / SECTOR * SECTOR;
        if max_request == 0 {
            mmio.fail();
            return Err("virtio-blk size_max and seg_max leave no room for a sector");
        }
        mmio.driver_ok();
        let irq_ok = irq::enable_line(mmio.irq);
        Ok(Blk {
            sectors: mmio.config_u64(0),
            read_only: features & F_RO != 0,
            flush: features & F_FLUSH != 0,
            seg_bytes,
            segs,
            max_request,
            mmio,
            queue,
            irq_ok,
            req: arena::bytes(32, 16),
        })
    }

    /// Reads `buf.len() / 512` sectors from `sector` into `buf` (in one request when the
    /// device's limits allow, see the module comment).
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.check(sector, buf.len())?;
        self.transfer(T_IN, sector, buf.as_mut_ptr() as usize, buf.len(), true)
    }

    /// Writes `buf` (a multiple of 512 bytes) to the disk from `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        if self.read_only {
            return Err(BlkError::ReadOnly);
        }
        self.check(sector, buf.len())?;
        self.transfer(T_OUT, sector, buf.as_ptr() as usize, buf.len(), false)
    }

    /// Moves `len` bytes (whole sectors, checked) at `addr` in requests of at most
    /// `max_request` bytes.
    fn transfer(
        &mut self,
        kind: u32,
        mut sector: u64,
        mut addr: usize,
        len: usize,
        device_writes: bool,
    ) -> Result<(), BlkError> {
        let mut left = len;
        while left > 0 {
            let n = left.min(self.max_request);
            self.request(kind, sector, Some((addr, n, device_writes)))?;
            sector += (n / SECTOR) as u64;
            addr += n;
            left -= n;
        }
        Ok(())
    }

    /// Makes earlier writes durable (a no-op when the device has no write cache to flush).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if !self.flush {
            return Ok(());
        }
        self.request(T_FLUSH, 0, None)
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), BlkError> {
        let n = (len / SECTOR) as u64;
        if !len.is_multiple_of(SECTOR) || len == 0 || u32::try_from(len).is_err() {
            return Err(BlkError::OutOfRange);
        }
        match sector.checked_add(n) {
            Some(end) if end <= self.sectors => Ok(()),
            _ => Err(BlkError::OutOfRange),
        }
    }

    /// One request, waited for. `data` is (address, length, device writes it).
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(usize, usize, bool)>,
    ) -> Result<(), BlkError> {
        self.req[0..4].copy_from_slice(&kind.to_le_bytes());
        self.req[4..8].fill(0);
        self.req[8..16].copy_from_slice(&sector.to_le_bytes());
        self.req[16] = 0xff;
        let hdr = self.req.as_ptr() as usize;
        let (seg_bytes, segs) = (self.seg_bytes, self.segs);
        let q = &mut self.queue;
        // Descriptor 0: the header; 1..=k: the data in segments; k + 1: the status byte.
        q.set_desc(0, hdr, 16, false, Some(1));
        let mut next = 1u16;
        if let Some((addr, len, device_writes)) = data {
            let mut off = 0;
            while off < len {
                // `transfer` keeps a request within `segs` segments of `seg_bytes`.
                assert!(
                    next <= segs,
                    "virtio-blk request larger than the device takes"
                );
                let n = (len - off).min(seg_bytes);
                q.set_desc(next, addr + off, n as u32, device_writes, Some(next + 1));
                off += n;
                next += 1;
            }
        }
        q.set_desc(next, hdr + 16, 1, true, None);
        q.push(0);
        self.mmio.notify(&mut self.queue);
        self.wait();
        // SAFETY: the status byte is in our arena buffer; the device wrote it before
        // publishing the used element (which `wait` saw), so read it volatile.
        let status = unsafe { (self.req.as_ptr().add(16)).read_volatile() };
        match status {
            0 => Ok(()),
            1 => Err(BlkError::Io),
            _ => Err(BlkError::Unsupported),
        }
    }

    /// Waits for the one outstanding request to complete: spinning on the used ring (memory,
    /// no VM exits) for up to [`SPIN_US`], then sleeping.
    fn wait(&mut self) {
        let end = clock::micros() + SPIN_US;
        while clock::micros() < end {
            if self.queue.pop_used().is_some() {
                return;
            }
            core::hint::spin_loop();
        }
        loop {
            self.mmio.ack_interrupt();
            if self.queue.pop_used().is_some() {
                return;
            }
            irq::sleep(Some(if self.irq_ok { 20_000 } else { 500 }));
        }
    }
}
