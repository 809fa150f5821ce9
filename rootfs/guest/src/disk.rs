//! The service's table on the virtio disk (format in `micro_service::table`): `get` reads an
//! entry through a small cache of 4 KiB blocks, `put` writes one entry's sector through to
//! the disk and flushes. `scan` reads a range of the disk sequentially in requests of a given
//! size into its own buffer, past the cache (which it neither uses nor changes).

use micro_service::scan::{self, Checksum, Chunks};
use micro_service::table::{self, Header, TableError};

use crate::arena;
use crate::blk::{Blk, BlkError, SECTOR};

/// Bytes per cached block (8 sectors: reads are 4 KiB requests).
const BLOCK: usize = 4096;
/// Cached blocks (direct-mapped by block number).
const LINES: usize = 16;
/// Bytes of the scan buffer: the largest scan request.
const SCAN_BUF: usize = scan::MAX_REQ_KIB as usize * 1024;

/// Why `get`/`put` failed.
pub enum DiskError {
    /// The disk holds no usable table.
    Table(TableError),
    /// The entry is beyond the table.
    Range {
        /// The table's entry count.
        entries: u64,
    },
    /// The device failed.
    Blk(BlkError),
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskError::Table(e) => write!(f, "{e}"),
            DiskError::Range { entries } => write!(f, "beyond the disk table ({entries} entries)"),
            DiskError::Blk(e) => write!(f, "{e}"),
        }
    }
}

/// A cached block: its number (`u64::MAX` when empty) and its bytes.
struct Line {
    block: u64,
    data: &'static mut [u8],
}

/// The disk and its table.
pub struct Disk {
    blk: Blk,
    header: Result<Header, TableError>,
    lines: [Line; LINES],
    /// Where `scan` reads to.
    scan_buf: &'static mut [u8],
}

impl Disk {
    /// Reads the table header from sector 0 of `blk`.
    pub fn new(mut blk: Blk) -> Disk {
        let lines = core::array::from_fn(|_| Line {
            block: u64::MAX,
            data: arena::bytes(BLOCK, BLOCK),
        });
        let mut s0 = [0u8; SECTOR];
        let header = match blk.read(0, &mut s0) {
            Ok(()) => Header::parse(&s0, blk.sectors),
            Err(_) => Err(TableError::Short),
        };
        Disk {
            blk,
            header,
            lines,
            scan_buf: arena::bytes(SCAN_BUF, 4096),
        }
    }

    /// Reads `sectors` sectors from `first` in order, `req_kib` KiB per request (a valid
    /// `micro_service::scan` size), and returns the checksum of the bytes read. Nothing is
    /// cached.
    pub fn scan(&mut self, first: u64, sectors: u64, req_kib: u64) -> Result<u64, BlkError> {
        if !scan::valid_req_kib(req_kib) || (req_kib as usize) * 1024 > SCAN_BUF {
            return Err(BlkError::OutOfRange);
        }
        if !scan::in_range(first, sectors, self.blk.sectors) {
            return Err(BlkError::OutOfRange);
        }
        let mut sum = Checksum::default();
        for (at, n) in Chunks::new(first, sectors, req_kib) {
            let buf = &mut self.scan_buf[..n as usize * SECTOR];
            self.blk.read(at, buf)?;
            sum.add(buf);
        }
        Ok(sum.0)
    }

    /// (sectors, read-only, table header).
    pub fn describe(&self) -> (u64, bool, Result<Header, TableError>) {
        (self.blk.sectors, self.blk.read_only, self.header)
    }

    /// Cache line and byte offset in it of entry `i`, reading its block if needed.
    fn locate(&mut self, i: u64) -> Result<(usize, usize), DiskError> {
        let h = self.header.map_err(DiskError::Table)?;
        if i >= h.entries {
            return Err(DiskError::Range { entries: h.entries });
        }
        let byte = table::entry_offset(i);
        let block = byte / BLOCK as u64;
        let line = (block % LINES as u64) as usize;
        if self.lines[line].block != block {
            self.lines[line].block = u64::MAX;
            let first = block * (BLOCK / SECTOR) as u64;
            let n = (self.blk.sectors - first).min((BLOCK / SECTOR) as u64) as usize;
            let data = &mut self.lines[line].data[..n * SECTOR];
            self.blk.read(first, data).map_err(DiskError::Blk)?;
            self.lines[line].block = block;
        }
        Ok((line, (byte % BLOCK as u64) as usize))
    }

    /// Entry `i` of the table.
    pub fn get(&mut self, i: u64) -> Result<u64, DiskError> {
        let (line, off) = self.locate(i)?;
        let mut v = [0u8; 8];
        v.copy_from_slice(&self.lines[line].data[off..off + 8]);
        Ok(u64::from_le_bytes(v))
    }

    /// Sets entry `i` to `v`, on the disk (written and flushed) and in the cache.
    pub fn put(&mut self, i: u64, v: u64) -> Result<(), DiskError> {
        if self.blk.read_only {
            return Err(DiskError::Blk(BlkError::ReadOnly));
        }
        let (line, off) = self.locate(i)?;
        let l = &mut self.lines[line];
        l.data[off..off + 8].copy_from_slice(&v.to_le_bytes());
        let sector_start = off / SECTOR * SECTOR;
        let sector = l.block * (BLOCK / SECTOR) as u64 + (off / SECTOR) as u64;
        let r = self
            .blk
            .write(sector, &l.data[sector_start..sector_start + SECTOR])
            .and_then(|()| self.blk.flush());
        if let Err(e) = r {
            // The cache may now differ from the disk: forget the block.
            self.lines[line].block = u64::MAX;
            return Err(DiskError::Blk(e));
        }
        Ok(())
    }
}
