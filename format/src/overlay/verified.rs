//! The record of a full checksum pass over an overlay file, kept beside it so the next user of
//! the unchanged file may skip the pass.
//!
//! ```text
//! <overlay>.verified (16 bytes)
//! 0   8   magic "CLDVRFY1"
//! 8   8   XXH3-64 (LE) of: device, inode, size, mtime s, mtime ns, ctime s, ctime ns
//!         (each u64 LE, from the file's metadata), then the file's 76 header bytes
//! ```
//!
//! Any change to the file — a rewrite, a flipped bit written by any program — changes its
//! ctime, which no caller can set back, and so voids the record. The header carries the
//! index checksum. Chunks are still checked one by one when decompressed.

use std::path::PathBuf;

use xxhash_rust::xxh3::xxh3_64;

use super::reader::Body;
use super::{Overlay, HEADER_LEN};

/// First bytes of a `<overlay>.verified` record.
pub const MAGIC: &[u8; 8] = b"CLDVRFY1";
/// Bytes of a record.
pub const RECORD_LEN: usize = 16;

/// The record for a file with this metadata and header.
fn record(m: &std::fs::Metadata, header: &[u8]) -> [u8; RECORD_LEN] {
    use std::os::unix::fs::MetadataExt;
    let mut id = Vec::with_capacity(56 + HEADER_LEN);
    for v in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        id.extend_from_slice(&v.to_le_bytes());
    }
    id.extend_from_slice(header);
    let mut out = [0u8; RECORD_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..].copy_from_slice(&xxh3_64(&id).to_le_bytes());
    out
}

impl Overlay {
    /// Where the record of a full checksum pass over this file is kept: `<overlay>.verified`.
    fn verified_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".verified");
        PathBuf::from(p)
    }

    /// What identifies this file's current content (see the module doc); `None` for an
    /// overlay read from memory.
    pub fn identity(&self) -> Option<[u8; RECORD_LEN]> {
        let Body::File { file, map } = &self.body else {
            return None;
        };
        let m = file.metadata().ok()?;
        Some(record(&m, map.bytes().get(..HEADER_LEN)?))
    }

    /// True when every chunk of this very file (same inode, size, times and header) passed a
    /// full checksum pass before ([`Overlay::record_verified`]).
    pub fn verified_before(&self) -> bool {
        match (self.identity(), std::fs::read(self.verified_path())) {
            (Some(id), Ok(rec)) => rec == id,
            _ => false,
        }
    }

    /// Records that every chunk passed a full checksum pass, so later users of the unchanged
    /// file may skip it (see [`Overlay::verified_before`]). Best effort: a read-only directory
    /// just means the next user checks again.
    pub fn record_verified(&self) {
        let Some(id) = self.identity() else { return };
        let path = self.verified_path();
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        if std::fs::write(&tmp, id).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use crate::overlay::fixtures::{images, write};
    use crate::overlay::Overlay;

    /// A recorded full checksum pass holds only for the unchanged file: a byte rewritten in
    /// place (same path, same size) voids it.
    #[test]
    fn verification_records_are_void_once_the_file_changes() {
        let (base, new) = images();
        let (path, _) = write("verified", &base, &new);
        let ov = Overlay::open(&path).unwrap();
        assert!(!ov.verified_before());
        ov.verify_chunks(2).unwrap();
        ov.record_verified();
        let rec = std::fs::read(ov.verified_path()).unwrap();
        assert_eq!(rec.len(), super::RECORD_LEN);
        assert_eq!(&rec[..8], super::MAGIC);
        assert!(Overlay::open(&path).unwrap().verified_before());
        drop(ov);
        // Rewrite one byte of the first chunk in place.
        let at = Overlay::open(&path).unwrap().index().chunks[0].offset + 3;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, at).unwrap();
        drop(f);
        let ov = Overlay::open(&path).unwrap();
        assert!(
            !ov.verified_before(),
            "the record must not cover a changed file"
        );
        assert!(ov.verify_chunks(1).is_err());
    }
}
