//! Where a customisation places a file on a service VM's disk: the guest path the operator
//! writes, checked the same way by the agent (before it starts a build) and by
//! `image-builder overlay --file` (which writes it).
//!
//! ```text
//! /dev/vda@OFFSET     the guest's first (raw) disk, at byte OFFSET (decimal or 0x hex);
//! /dev/vda            the same at byte 0
//!
//!  disk: | sector 0 | sector 1 | ...                               | end (disk_bytes)
//!                         ▲ OFFSET ──── content (≤ MAX_FILE_BYTES) ─┤ must end ≤ disk_bytes
//! ```
//!
//! The micro guest's disk has no file system (a table of `u64` entries from byte 512: entry
//! `i` at `512 + 8·i`, docs/micro-guest.md), so a file is named by where its bytes go on the
//! raw disk; a base with a file-system disk would add its own path form here. The bytes are
//! written into the disk's copy-on-write δ before the base is restored, so they travel in
//! the overlay's disk δ like the guest's own writes.

/// The only disk a guest has today.
pub const DEVICE: &str = "/dev/vda";
/// Largest file placed by one build step.
pub const MAX_FILE_BYTES: usize = 256 << 10;
/// Files one build places at most.
pub const MAX_FILES: usize = 16;
/// Bytes one build places at most, all files together (so a build request, with its files
/// in base64, stays well inside the API's 2 MiB body limit).
pub const MAX_TOTAL_BYTES: usize = 1 << 20;

/// A guest path that names no place on the disk, or a file that does not fit it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Not `/dev/vda[@OFFSET]`.
    #[error(
        "'{0}' is not a place on the guest's disk: the disk has no file system, write /dev/vda@OFFSET (a byte offset, e.g. /dev/vda@568 for table entry 7)"
    )]
    Syntax(String),
    /// The base has no disk.
    #[error("'{0}': this base has no disk to place files on")]
    NoDisk(String),
    /// Past the end of the disk.
    #[error("'{path}' with {len} bytes runs past the end of the disk ({disk_bytes} bytes)")]
    PastEnd {
        /// The path.
        path: String,
        /// The file's length.
        len: usize,
        /// The disk's size.
        disk_bytes: u64,
    },
    /// Too large.
    #[error("'{0}' holds {1} bytes, at most {MAX_FILE_BYTES} are placed per file")]
    TooLarge(String, usize),
    /// Empty.
    #[error("'{0}' is empty: give it some content")]
    Empty(String),
}

/// The byte offset `path` names on the guest's disk.
pub fn parse(path: &str) -> Result<u64, PathError> {
    let bad = || PathError::Syntax(path.to_string());
    let rest = path.strip_prefix(DEVICE).ok_or_else(bad)?;
    if rest.is_empty() {
        return Ok(0);
    }
    let n = rest.strip_prefix('@').ok_or_else(bad)?;
    let v = match n.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None if n.chars().all(|c| c.is_ascii_digit()) => n.parse(),
        None => return Err(bad()),
    };
    v.map_err(|_| bad())
}

/// Checks that `len` bytes at `path` fit a disk of `disk_bytes` (None: no disk); the offset.
pub fn check(path: &str, len: usize, disk_bytes: Option<u64>) -> Result<u64, PathError> {
    let offset = parse(path)?;
    if len == 0 {
        return Err(PathError::Empty(path.into()));
    }
    if len > MAX_FILE_BYTES {
        return Err(PathError::TooLarge(path.into(), len));
    }
    let disk_bytes = disk_bytes.ok_or_else(|| PathError::NoDisk(path.into()))?;
    if offset
        .checked_add(len as u64)
        .is_none_or(|end| end > disk_bytes)
    {
        return Err(PathError::PastEnd {
            path: path.into(),
            len,
            disk_bytes,
        });
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_offsets_on_the_raw_disk() {
        assert_eq!(parse("/dev/vda"), Ok(0));
        assert_eq!(parse("/dev/vda@568"), Ok(568));
        assert_eq!(parse("/dev/vda@0x238"), Ok(568));
        for bad in [
            "",
            "/etc/motd",
            "/dev/vdb@0",
            "/dev/vda@",
            "/dev/vda@-1",
            "/dev/vda@+1",
            "/dev/vda@1k",
            "/dev/vda@0x",
            "/dev/vda@99999999999999999999",
            "/dev/vda 512",
        ] {
            assert_eq!(parse(bad), Err(PathError::Syntax(bad.into())), "{bad}");
        }
    }

    #[test]
    fn files_must_fit_the_disk() {
        assert_eq!(check("/dev/vda@1016", 8, Some(1024)), Ok(1016));
        assert!(matches!(
            check("/dev/vda@1017", 8, Some(1024)),
            Err(PathError::PastEnd { .. })
        ));
        assert!(matches!(
            check(&format!("/dev/vda@{}", u64::MAX), 8, Some(1024)),
            Err(PathError::PastEnd { .. })
        ));
        assert_eq!(
            check("/dev/vda", 8, None),
            Err(PathError::NoDisk("/dev/vda".into()))
        );
        assert!(matches!(
            check("/dev/vda", MAX_FILE_BYTES + 1, Some(u64::MAX)),
            Err(PathError::TooLarge(..))
        ));
        assert!(matches!(
            check("/dev/vda", 0, Some(1024)),
            Err(PathError::Empty(..))
        ));
        let e = check("etc/x", 1, Some(1024)).unwrap_err().to_string();
        assert!(e.contains("/dev/vda@OFFSET"), "{e}");
    }
}
