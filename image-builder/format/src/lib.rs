//! The on-disk formats of cloudlet images, shared by `image-builder` (which writes them) and
//! `vmm` (which synthesises VMs from them):
//!
//! - [`base`]: a base image directory and its manifest (content id, sizes);
//! - [`overlay`]: an application overlay — the RAM δ between a base and a customised VM,
//!   in independently decodable, checksummed zstd chunks with a postcard index, plus the
//!   customised VM's machine state.
//!
//! Reading untrusted files never panics; every check happens before any byte is applied.

pub mod base;
pub mod mapped;
pub mod overlay;
pub mod sources;

/// Guest page size of every image.
pub const PAGE_SIZE: usize = 4096;

/// CRC-64/XZ: the checksum of headers, indexes and chunks.
pub const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);
