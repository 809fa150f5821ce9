//! Every byte layout the cloudlet appliance reads or writes, in one crate with no KVM and no
//! I/O beyond files and `Read`/`Write`. Each module draws its layout at the top (magic,
//! version, checksum) and parses untrusted bytes without panicking:
//!
//! - [`base`]: a base image directory and its manifest (content id, sizes);
//! - [`overlay`]: an application overlay — the RAM δ between a base and a customised VM,
//!   in independently decodable, checksummed zstd chunks with a postcard index, plus the
//!   customised VM's machine state and its disk δ;
//! - [`state`]: the state file container (snapshots, an overlay's VM state);
//! - [`control`]: the frames a vmm speaks: its control socket (requests, answers) and the
//!   reports to its supervisor (ready with timings and bound ports, failed, exited);
//! - [`disk_delta`]: a VM's copy-on-write disk layer on the host (a crash-safe block log);
//! - [`disk_file`]: where a customisation places a file on a guest's disk (its path form);
//! - [`handoff`]: the stream that moves a running VM to another appliance;
//! - [`ram_image`]: a service's RAM image (base + overlay, made once, shared copy-on-write by
//!   its instances) and the id saying what it was made from;
//! - [`pairing`]: the messages a phone and the appliance exchange to pair (USB or claim code);
//! - [`progress`]: the progress stream of a long build (`image-builder overlay --progress
//!   json`), read by the agent instead of logs;
//! - [`update`]: the appliance's A/B update artifact (`.cup`), the booted slot on the kernel
//!   command line and the last update's record;
//!
//! and what reading them needs: [`mapped`] (read-only file mappings) and [`sources`] (where
//! each guest page of a synthesised VM comes from).
//!
//! Data flows one way: `image-builder` writes these formats, `vmm` reads them, the agent
//! speaks the control frames; this crate depends on none of them.

pub mod base;
pub mod control;
pub mod disk_delta;
pub mod disk_file;
pub mod handoff;
pub mod mapped;
pub mod overlay;
pub mod pairing;
pub mod progress;
pub mod ram_image;
pub mod sources;
pub mod state;
pub mod update;

/// Guest page size of every image.
pub const PAGE_SIZE: usize = 4096;

/// CRC-64/XZ: the checksum of headers, indexes and chunks.
pub const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_XZ);

/// The little-endian `u64` at `at` (8 bytes) of `b`; callers check lengths first.
pub(crate) fn le_u64(b: &[u8], at: std::ops::Range<usize>) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at]);
    u64::from_le_bytes(v)
}

/// The little-endian `u16` at `at` (2 bytes) of `b`; callers check lengths first.
pub(crate) fn le_u16(b: &[u8], at: std::ops::Range<usize>) -> u16 {
    let mut v = [0u8; 2];
    v.copy_from_slice(&b[at]);
    u16::from_le_bytes(v)
}

/// The little-endian `u32` at `at` (4 bytes) of `b`; callers check lengths first.
pub(crate) fn le_u32(b: &[u8], at: std::ops::Range<usize>) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at]);
    u32::from_le_bytes(v)
}
