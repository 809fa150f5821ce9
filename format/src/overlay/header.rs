//! The fixed header at the start of an overlay file (drawn in the [module doc](super)): a
//! checked view over its bytes ([`Header`]) and its parsed form ([`HeaderRepr`]).
//!
//! ```text
//! 0       8     magic "CLDOVRLY"
//! 8       2     version (u16 LE)
//! 10      2     reserved, 0
//! 12      32    base id
//! 44      8     index offset (u64 LE)
//! 52      8     index length (u64 LE)
//! 60      8     CRC-64/XZ of the index
//! 68      8     CRC-64/XZ of bytes 0..68
//! ```

use std::ops::Range;

use super::{CHECK_CRC, HEADER_LEN, MAGIC, MAX_INDEX, VERSION};
use crate::{le_u64, CRC64};

/// Byte ranges of the header's fields.
mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..10;
    pub const RESERVED: Range<usize> = 10..12;
    pub const BASE_ID: Range<usize> = 12..44;
    pub const INDEX_OFFSET: Range<usize> = 44..52;
    pub const INDEX_LEN: Range<usize> = 52..60;
    pub const INDEX_CRC: Range<usize> = 60..68;
    pub const CHECKSUM: Range<usize> = 68..76;
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("truncated ({0} bytes)")]
    Truncated(u64),
    /// Not an overlay.
    #[error("bad magic")]
    BadMagic,
    /// Another format version.
    #[error("format version {0} (this build reads {VERSION})")]
    Version(u16),
    /// The header's own checksum does not match.
    #[error("header checksum mismatch")]
    Checksum,
    /// The index does not lie at the end of the file.
    #[error("index at {offset}+{len} does not end the {file_len}-byte file (truncated?)")]
    IndexBounds {
        /// Index offset.
        offset: u64,
        /// Index length.
        len: u64,
        /// File length.
        file_len: u64,
    },
}

/// A view of an overlay header's bytes (the first [`HEADER_LEN`] bytes of `buffer`).
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// A view without any check: accessors panic if `buffer` is shorter than a header.
    pub const fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// A view of `buffer` once length, magic, version and checksum hold.
    pub fn new_checked(buffer: T) -> Result<Self, HeaderError> {
        let h = Self::new_unchecked(buffer);
        h.check()?;
        Ok(h)
    }

    /// Checks, in order: length, magic, version, checksum.
    pub fn check(&self) -> Result<(), HeaderError> {
        let b = self.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Truncated(b.len() as u64));
        }
        if &b[field::MAGIC] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if self.version() != VERSION {
            return Err(HeaderError::Version(self.version()));
        }
        if CHECK_CRC && self.checksum() != self.computed_checksum() {
            return Err(HeaderError::Checksum);
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn u64_at(&self, r: Range<usize>) -> u64 {
        le_u64(self.buffer.as_ref(), r)
    }

    /// Format version.
    pub fn version(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::VERSION];
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Id of the base the overlay applies to.
    pub fn base_id(&self) -> [u8; 32] {
        let mut id = [0u8; 32];
        id.copy_from_slice(&self.buffer.as_ref()[field::BASE_ID]);
        id
    }

    /// File offset of the index.
    pub fn index_offset(&self) -> u64 {
        self.u64_at(field::INDEX_OFFSET)
    }

    /// Length of the index.
    pub fn index_len(&self) -> u64 {
        self.u64_at(field::INDEX_LEN)
    }

    /// CRC-64/XZ of the index.
    pub fn index_crc(&self) -> u64 {
        self.u64_at(field::INDEX_CRC)
    }

    /// The stored checksum of the header.
    pub fn checksum(&self) -> u64 {
        self.u64_at(field::CHECKSUM)
    }

    /// The checksum the header's bytes have.
    pub fn computed_checksum(&self) -> u64 {
        CRC64.checksum(&self.buffer.as_ref()[..field::CHECKSUM.start])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn set_u64(&mut self, r: Range<usize>, v: u64) {
        self.buffer.as_mut()[r].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes magic, version and a zero reserved field.
    pub fn set_preamble(&mut self) {
        let b = self.buffer.as_mut();
        b[field::MAGIC].copy_from_slice(MAGIC);
        b[field::VERSION].copy_from_slice(&VERSION.to_le_bytes());
        b[field::RESERVED].fill(0);
    }

    /// Sets the base id.
    pub fn set_base_id(&mut self, id: &[u8; 32]) {
        self.buffer.as_mut()[field::BASE_ID].copy_from_slice(id);
    }

    /// Sets the index offset.
    pub fn set_index_offset(&mut self, v: u64) {
        self.set_u64(field::INDEX_OFFSET, v);
    }

    /// Sets the index length.
    pub fn set_index_len(&mut self, v: u64) {
        self.set_u64(field::INDEX_LEN, v);
    }

    /// Sets the index checksum.
    pub fn set_index_crc(&mut self, v: u64) {
        self.set_u64(field::INDEX_CRC, v);
    }

    /// Computes and stores the header checksum (last, after every other field).
    pub fn fill_checksum(&mut self) {
        let crc = self.computed_checksum();
        self.set_u64(field::CHECKSUM, crc);
    }
}

/// A parsed overlay header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderRepr {
    /// Id of the base the overlay applies to.
    pub base_id: [u8; 32],
    /// File offset of the index.
    pub index_offset: u64,
    /// Length of the index.
    pub index_len: u64,
    /// CRC-64/XZ of the index.
    pub index_crc: u64,
}

impl HeaderRepr {
    /// Parses a header, checking it first.
    pub fn parse<T: AsRef<[u8]>>(h: &Header<T>) -> Result<Self, HeaderError> {
        h.check()?;
        Ok(HeaderRepr {
            base_id: h.base_id(),
            index_offset: h.index_offset(),
            index_len: h.index_len(),
            index_crc: h.index_crc(),
        })
    }

    /// Bytes of an emitted header.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }

    /// Writes every field and the checksum into `h`.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, h: &mut Header<T>) {
        h.set_preamble();
        h.set_base_id(&self.base_id);
        h.set_index_offset(self.index_offset);
        h.set_index_len(self.index_len);
        h.set_index_crc(self.index_crc);
        h.fill_checksum();
    }

    /// Fails unless the index lies after the header, is at most [`MAX_INDEX`] bytes and ends
    /// a file of `file_len` bytes.
    pub fn check_file_len(&self, file_len: u64) -> Result<(), HeaderError> {
        let (offset, len) = (self.index_offset, self.index_len);
        if offset < HEADER_LEN as u64
            || len > MAX_INDEX
            || offset.checked_add(len) != Some(file_len)
        {
            return Err(HeaderError::IndexBounds {
                offset,
                len,
                file_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HeaderRepr {
        HeaderRepr {
            base_id: [0xab; 32],
            index_offset: 0x1234,
            index_len: 0x56,
            index_crc: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn golden_bytes() {
        let mut h = Header::new_unchecked([0u8; HEADER_LEN]);
        sample().emit(&mut h);
        let b = h.into_inner();
        let mut want = Vec::new();
        want.extend_from_slice(b"CLDOVRLY");
        want.extend_from_slice(&[2, 0, 0, 0]);
        want.extend_from_slice(&[0xab; 32]);
        want.extend_from_slice(&[0x34, 0x12, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x56, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
        want.extend_from_slice(&GOLDEN_CRC);
        assert_eq!(&b[..], &want[..]);
        let view = Header::new_checked(&b[..]).unwrap();
        assert_eq!(HeaderRepr::parse(&view), Ok(sample()));
    }

    /// CRC-64/XZ of the golden header's first 68 bytes (computed independently of this crate).
    const GOLDEN_CRC: [u8; 8] = [49, 193, 24, 231, 201, 255, 213, 69];

    #[test]
    fn every_damage_is_refused() {
        let mut h = Header::new_unchecked([0u8; HEADER_LEN]);
        sample().emit(&mut h);
        let good = h.into_inner();
        for cut in 0..HEADER_LEN {
            assert_eq!(
                Header::new_checked(&good[..cut]).unwrap_err(),
                HeaderError::Truncated(cut as u64)
            );
        }
        for i in 0..HEADER_LEN {
            let mut b = good;
            b[i] ^= 0x10;
            assert!(Header::new_checked(&b[..]).is_err(), "flip at {i}");
        }
        let mut v3 = good;
        v3[8] = 3;
        assert_eq!(
            Header::new_checked(&v3[..]).unwrap_err(),
            HeaderError::Version(3)
        );
        let mut magic = good;
        magic[0] = b'X';
        assert_eq!(
            Header::new_checked(&magic[..]).unwrap_err(),
            HeaderError::BadMagic
        );
    }

    #[test]
    fn the_index_must_end_the_file() {
        let r = sample();
        r.check_file_len(0x1234 + 0x56).unwrap();
        for len in [0, 0x1234 + 0x55, 0x1234 + 0x57, u64::MAX] {
            assert!(r.check_file_len(len).is_err(), "{len}");
        }
        let wrapping = HeaderRepr {
            index_offset: u64::MAX,
            ..r
        };
        assert!(wrapping.check_file_len(u64::MAX).is_err());
        let inside_header = HeaderRepr {
            index_offset: 10,
            index_len: 10,
            ..r
        };
        assert!(inside_header.check_file_len(20).is_err());
    }
}
