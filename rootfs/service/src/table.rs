//! The table the micro guest keeps on its disk (virtio-blk), read by `get I` and written by
//! `put I V`.
//!
//! Layout, in 512-byte sectors, all integers little-endian:
//!
//! | bytes of sector 0 | field |
//! | --- | --- |
//! | 0..8 | magic `CLDTABLE` |
//! | 8..12 | `u32` version, 1 |
//! | 12..16 | `u32` reserved, 0 |
//! | 16..24 | `u64` entry count C |
//! | 24..512 | zero (ignored) |
//!
//! Entry `i` (`i < C`) is a `u64` at byte `512 + 8 i`: sector `1 + i / 64`, offset
//! `(i % 64) * 8`. A disk of S sectors holds at most `(S - 1) * 64` entries; a header whose
//! count exceeds that is refused. The guest never changes the header; `put` overwrites one
//! existing entry.

/// Bytes per sector.
pub const SECTOR: usize = 512;
/// The magic at the start of sector 0.
pub const MAGIC: [u8; 8] = *b"CLDTABLE";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Entries per sector.
pub const ENTRIES_PER_SECTOR: u64 = (SECTOR / 8) as u64;

/// The table header (sector 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// Number of entries.
    pub entries: u64,
}

/// Why sector 0 does not describe a usable table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Fewer than 24 bytes given.
    Short,
    /// Sector 0 does not start with [`MAGIC`].
    NoMagic,
    /// A version other than [`VERSION`].
    Version(u32),
    /// More entries than the disk holds.
    TooManyEntries {
        /// The header's count.
        entries: u64,
        /// What the disk holds.
        max: u64,
    },
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TableError::Short => write!(f, "table header is short"),
            TableError::NoMagic => write!(f, "the disk holds no table (no CLDTABLE magic)"),
            TableError::Version(v) => write!(f, "table version {v} is not supported (want 1)"),
            TableError::TooManyEntries { entries, max } => {
                write!(f, "table claims {entries} entries, the disk holds {max}")
            }
        }
    }
}

impl Header {
    /// Parses sector 0 of a disk of `sectors` sectors.
    pub fn parse(sector0: &[u8], sectors: u64) -> Result<Header, TableError> {
        let h = sector0.get(..24).ok_or(TableError::Short)?;
        if h[..8] != MAGIC {
            return Err(TableError::NoMagic);
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(TableError::Version(version));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&h[16..24]);
        let entries = u64::from_le_bytes(count);
        let max = max_entries(sectors);
        if entries > max {
            return Err(TableError::TooManyEntries { entries, max });
        }
        Ok(Header { version, entries })
    }

    /// Sector 0 for this header.
    pub fn to_sector(&self) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        s[..8].copy_from_slice(&MAGIC);
        s[8..12].copy_from_slice(&self.version.to_le_bytes());
        s[16..24].copy_from_slice(&self.entries.to_le_bytes());
        s
    }
}

/// Most entries a disk of `sectors` sectors holds.
pub fn max_entries(sectors: u64) -> u64 {
    sectors.saturating_sub(1).saturating_mul(ENTRIES_PER_SECTOR)
}

/// Byte offset of entry `i` on the disk.
pub fn entry_offset(i: u64) -> u64 {
    SECTOR as u64 + i * 8
}

/// Sector holding entry `i`, and the entry's byte offset inside it.
pub fn entry_sector(i: u64) -> (u64, usize) {
    (
        1 + i / ENTRIES_PER_SECTOR,
        ((i % ENTRIES_PER_SECTOR) * 8) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_refusals() {
        let h = Header {
            version: VERSION,
            entries: 1000,
        };
        let s = h.to_sector();
        assert_eq!(&s[..8], b"CLDTABLE");
        assert_eq!(&s[8..12], &[1, 0, 0, 0]);
        assert_eq!(&s[16..24], &1000u64.to_le_bytes());
        assert_eq!(Header::parse(&s, 2048), Ok(h));
        assert_eq!(
            Header::parse(&s, 10),
            Err(TableError::TooManyEntries {
                entries: 1000,
                max: 576
            })
        );
        assert_eq!(Header::parse(&[0u8; 512], 2048), Err(TableError::NoMagic));
        assert_eq!(Header::parse(&s[..10], 2048), Err(TableError::Short));
        let mut v2 = s;
        v2[8] = 2;
        assert_eq!(Header::parse(&v2, 2048), Err(TableError::Version(2)));
        assert!(format!("{}", TableError::NoMagic).contains("no table"));
    }

    #[test]
    fn entry_positions() {
        assert_eq!(entry_offset(0), 512);
        assert_eq!(entry_offset(65), 512 + 520);
        assert_eq!(entry_sector(0), (1, 0));
        assert_eq!(entry_sector(63), (1, 504));
        assert_eq!(entry_sector(64), (2, 0));
        for i in [0u64, 1, 63, 64, 1000, 123_456] {
            let (sector, off) = entry_sector(i);
            assert_eq!(sector * 512 + off as u64, entry_offset(i));
        }
        assert_eq!(max_entries(0), 0);
        assert_eq!(max_entries(1), 0);
        assert_eq!(max_entries(2), 64);
    }
}
