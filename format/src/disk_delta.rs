//! The disk δ file: a VM's copy-on-write disk layer on the host, as a crash-safe log of 4 KiB
//! blocks over a read-only base disk (the log itself is `vmm`'s `devices::virtio::disk`).
//!
//! ```text
//! offset 0      header copy A (64 bytes), zero-padded to 512
//! offset 512    header copy B (64 bytes), zero-padded to 512
//! offset 1024   record 0, record 1, …  (RECORD_LEN = 4120 bytes each)
//!
//! header:  0  8  magic "CLDDELTA"
//!          8  4  version (u32 LE) = 1
//!         12  4  block size (u32 LE) = 4096
//!         16  8  disk size in bytes (a multiple of 512)
//!         24  8  sequence number: of two valid copies the higher one is current
//!         32  8  committed: records 0..committed are durable (fsynced before this header)
//!         40 16  reserved, zero
//!         56  8  CRC-64/XZ of bytes 0..56
//! record:  0  4  magic "DBLK"
//!          4  4  reserved, zero
//!          8  8  block number (< disk size / 4096, rounded up)
//!         16  8  CRC-64/XZ of record bytes 0..16 followed by the data
//!         24 4096 block data
//! ```
//!
//! All integers are little-endian. A header copy is written to slot `seq % 2`, so a torn
//! header write leaves the other copy valid. [`Header::new_checked`] and
//! [`Record::new_checked`] check length, magic and checksum; version, block size, disk size
//! and block range are the reader's to judge (it first picks the current header copy).

use crate::{le_u32, le_u64, CRC64};

/// File magic (header).
pub const MAGIC: &[u8; 8] = b"CLDDELTA";
/// Format version.
pub const VERSION: u32 = 1;
/// Bytes of a δ block.
pub const BLOCK_SIZE: usize = 4096;
/// Bytes of a header copy.
pub const HEADER_LEN: usize = 64;
/// Bytes reserved for each header copy.
pub const HEADER_SLOT: u64 = 512;
/// File offset of record 0.
pub const RECORDS_START: u64 = 2 * HEADER_SLOT;
/// Record magic.
pub const RECORD_MAGIC: &[u8; 4] = b"DBLK";
/// Bytes of a record before its data.
pub const RECORD_HEADER_LEN: usize = 24;
/// Bytes of a record.
pub const RECORD_LEN: usize = RECORD_HEADER_LEN + BLOCK_SIZE;

/// File offset of the header copy with sequence number `seq`.
pub const fn header_offset(seq: u64) -> u64 {
    (seq % 2) * HEADER_SLOT
}

/// File offset of record `slot`.
pub const fn record_offset(slot: u64) -> u64 {
    RECORDS_START + slot * RECORD_LEN as u64
}

/// File offset of record `slot`'s block data.
pub const fn record_data_offset(slot: u64) -> u64 {
    record_offset(slot) + RECORD_HEADER_LEN as u64
}

/// Why a header copy or record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// Not the length of a header or record.
    #[error("{0} bytes is not a whole header or record")]
    Length(usize),
    /// Wrong magic.
    #[error("bad magic")]
    BadMagic,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
}

mod hfield {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const BLOCK_SIZE: Range<usize> = 12..16;
    pub const DISK_SIZE: Range<usize> = 16..24;
    pub const SEQ: Range<usize> = 24..32;
    pub const COMMITTED: Range<usize> = 32..40;
    pub const RESERVED: Range<usize> = 40..56;
    pub const CHECKSUM: Range<usize> = 56..64;
}

/// A view of one header copy's bytes (the first [`HEADER_LEN`] bytes of `buffer`).
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// A view without any check: accessors panic if `buffer` is shorter than a header.
    pub const fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// A view of `buffer` once length, magic and checksum hold.
    pub fn new_checked(buffer: T) -> Result<Self, DeltaError> {
        let h = Self::new_unchecked(buffer);
        let b = h.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(DeltaError::Length(b.len()));
        }
        if &b[hfield::MAGIC] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        if le_u64(b, hfield::CHECKSUM) != CRC64.checksum(&b[..hfield::CHECKSUM.start]) {
            return Err(DeltaError::Checksum);
        }
        Ok(h)
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Format version.
    pub fn version(&self) -> u32 {
        le_u32(self.buffer.as_ref(), hfield::VERSION)
    }

    /// Block size.
    pub fn block_size(&self) -> u32 {
        le_u32(self.buffer.as_ref(), hfield::BLOCK_SIZE)
    }

    /// Size of the disk, in bytes.
    pub fn disk_size(&self) -> u64 {
        le_u64(self.buffer.as_ref(), hfield::DISK_SIZE)
    }

    /// Sequence number.
    pub fn seq(&self) -> u64 {
        le_u64(self.buffer.as_ref(), hfield::SEQ)
    }

    /// Records this copy commits.
    pub fn committed(&self) -> u64 {
        le_u64(self.buffer.as_ref(), hfield::COMMITTED)
    }
}

/// A parsed header copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Format version.
    pub version: u32,
    /// Block size.
    pub block_size: u32,
    /// Size of the disk, in bytes.
    pub disk_size: u64,
    /// Sequence number: of two valid copies the higher one is current.
    pub seq: u64,
    /// Records 0..committed are durable.
    pub committed: u64,
}

impl HeaderRepr {
    /// The fields of a checked header copy.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Self {
        HeaderRepr {
            version: h.version(),
            block_size: h.block_size(),
            disk_size: h.disk_size(),
            seq: h.seq(),
            committed: h.committed(),
        }
    }

    /// Writes every field, zero reserved bytes and the checksum into `h`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) {
        let b = &mut h.buffer.as_mut()[..HEADER_LEN];
        b[hfield::MAGIC].copy_from_slice(MAGIC);
        b[hfield::VERSION].copy_from_slice(&self.version.to_le_bytes());
        b[hfield::BLOCK_SIZE].copy_from_slice(&self.block_size.to_le_bytes());
        b[hfield::DISK_SIZE].copy_from_slice(&self.disk_size.to_le_bytes());
        b[hfield::SEQ].copy_from_slice(&self.seq.to_le_bytes());
        b[hfield::COMMITTED].copy_from_slice(&self.committed.to_le_bytes());
        b[hfield::RESERVED].fill(0);
        let crc = CRC64.checksum(&b[..hfield::CHECKSUM.start]);
        b[hfield::CHECKSUM].copy_from_slice(&crc.to_le_bytes());
    }

    /// The header copy's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = Header::new_unchecked([0u8; HEADER_LEN]);
        self.emit(&mut h);
        h.into_inner()
    }
}

mod rfield {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..4;
    pub const RESERVED: Range<usize> = 4..8;
    pub const BLOCK: Range<usize> = 8..16;
    pub const CHECKSUM: Range<usize> = 16..24;
}

/// A view of one record's bytes (exactly [`RECORD_LEN`]).
#[derive(Debug, Clone)]
pub struct Record<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Record<T> {
    /// A view without any check: accessors panic if `buffer` is not a record's length.
    pub const fn new_unchecked(buffer: T) -> Self {
        Record { buffer }
    }

    /// A view of `buffer` once length, magic and checksum hold.
    pub fn new_checked(buffer: T) -> Result<Self, DeltaError> {
        let r = Self::new_unchecked(buffer);
        let b = r.buffer.as_ref();
        if b.len() != RECORD_LEN {
            return Err(DeltaError::Length(b.len()));
        }
        if &b[rfield::MAGIC] != RECORD_MAGIC {
            return Err(DeltaError::BadMagic);
        }
        if le_u64(b, rfield::CHECKSUM) != r.computed_checksum() {
            return Err(DeltaError::Checksum);
        }
        Ok(r)
    }

    /// The block number.
    pub fn block(&self) -> u64 {
        le_u64(self.buffer.as_ref(), rfield::BLOCK)
    }

    /// The block data.
    pub fn data(&self) -> &[u8] {
        &self.buffer.as_ref()[RECORD_HEADER_LEN..]
    }

    fn computed_checksum(&self) -> u64 {
        let b = self.buffer.as_ref();
        let mut digest = CRC64.digest();
        digest.update(&b[..rfield::CHECKSUM.start]);
        digest.update(&b[RECORD_HEADER_LEN..]);
        digest.finalize()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Record<T> {
    /// Writes a record of block `n` holding `data` ([`BLOCK_SIZE`] bytes) into the buffer.
    ///
    /// # Panics
    /// If the buffer is not [`RECORD_LEN`] bytes or `data` not [`BLOCK_SIZE`].
    pub fn emit(&mut self, n: u64, data: &[u8]) {
        let b = self.buffer.as_mut();
        b[rfield::MAGIC].copy_from_slice(RECORD_MAGIC);
        b[rfield::RESERVED].fill(0);
        b[rfield::BLOCK].copy_from_slice(&n.to_le_bytes());
        b[RECORD_HEADER_LEN..].copy_from_slice(data);
        let crc = self.computed_checksum();
        self.buffer.as_mut()[rfield::CHECKSUM].copy_from_slice(&crc.to_le_bytes());
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_golden_bytes() {
        let h = HeaderRepr {
            version: 1,
            block_size: 4096,
            disk_size: 0x10_0000,
            seq: 2,
            committed: 5,
        };
        let b = h.to_bytes();
        let mut want = Vec::new();
        want.extend_from_slice(b"CLDDELTA");
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0x10, 0, 0]);
        want.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0; 16]);
        want.extend_from_slice(&HEADER_CRC);
        assert_eq!(&b[..], &want[..]);
        let view = Header::new_checked(&b[..]).unwrap();
        assert_eq!(HeaderRepr::parse(&view), h);
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(Header::new_checked(&bad[..]).is_err(), "flip at {i}");
        }
        assert_eq!(
            Header::new_checked(&b[..63]).unwrap_err(),
            DeltaError::Length(63)
        );
    }

    #[test]
    fn record_golden_bytes() {
        let data: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i % 251) as u8).collect();
        let mut r = Record::new_unchecked(vec![0xee; RECORD_LEN]);
        r.emit(0x0102_0304, &data);
        let b = r.into_inner();
        let mut want = Vec::new();
        want.extend_from_slice(b"DBLK");
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&[4, 3, 2, 1, 0, 0, 0, 0]);
        want.extend_from_slice(&RECORD_CRC);
        want.extend_from_slice(&data);
        assert_eq!(b, want);
        let view = Record::new_checked(&b[..]).unwrap();
        assert_eq!(view.block(), 0x0102_0304);
        assert_eq!(view.data(), &data[..]);
        for i in (0..RECORD_LEN).step_by(7) {
            let mut bad = b.clone();
            bad[i] ^= 0x20;
            assert!(Record::new_checked(&bad[..]).is_err(), "flip at {i}");
        }
        assert!(Record::new_checked(&b[..RECORD_LEN - 1]).is_err());
        assert_eq!(record_offset(2), 1024 + 2 * 4120);
        assert_eq!(record_data_offset(0), 1048);
        assert_eq!((header_offset(6), header_offset(7)), (0, 512));
    }

    /// CRC-64/XZ of the golden header's bytes 0..56 (computed independently of this crate).
    const HEADER_CRC: [u8; 8] = [250, 89, 199, 193, 211, 206, 209, 137];
    /// CRC-64/XZ of the golden record's bytes 0..16 and its data (computed independently).
    const RECORD_CRC: [u8; 8] = [255, 115, 75, 107, 152, 205, 117, 121];
}
