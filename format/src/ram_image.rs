//! A service's RAM image: its base's memory with its overlay applied, written once, mapped
//! copy-on-write by every instance of the service, so that they share its clean pages (the
//! δ decompressed once, not once per instance). Two files beside the overlay:
//!
//! ```text
//! <overlay>.ram     the guest RAM image: regions back to back, as `format::base::MEMORY`;
//!                   sparse (zero pages are holes); exactly `ram_bytes` long
//!
//! <overlay>.ram.id  (72 bytes) what the image was made from
//!  0        8        10       12       16                       48              64       72
//!  +--------+--------+--------+--------+------------------------+---------------+--------+
//!  | magic  | version| zero   | CRC-32 | base content id        | overlay       | ram    |
//!  |"CLDRAMI1"| u16 LE| u16   | u32 LE | (32 bytes)             | identity (16) | bytes  |
//!  +--------+--------+--------+--------+------------------------+---------------+--------+
//!  CRC-32 (ISO-HDLC) covers bytes 16..72; overlay identity: `Overlay::identity` (the file's
//!  metadata and header, as its `.verified` record), so a rewritten overlay voids the image.
//! ```
//!
//! The id file is renamed into place after the image, so an id always describes a complete
//! image. A reader trusts an image whose id matches its base and overlay as it trusts the
//! base's own memory file: both live in the appliance's data directory.

use std::path::{Path, PathBuf};

use crate::{le_u16, le_u32, le_u64};

/// First bytes of a `.ram.id` file.
pub const MAGIC: &[u8; 8] = b"CLDRAMI1";
/// Layout version.
pub const VERSION: u16 = 1;
/// Bytes of a `.ram.id` file.
pub const ID_LEN: usize = 72;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Why an id file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamImageError {
    /// Not 72 bytes.
    #[error("a RAM image id has {ID_LEN} bytes, this one {0}")]
    Length(usize),
    /// Wrong magic.
    #[error("not a RAM image id (bad magic)")]
    Magic,
    /// Another layout version.
    #[error("RAM image id version {0} (this build reads {VERSION})")]
    Version(u16),
    /// Damaged.
    #[error("RAM image id checksum mismatch: it is damaged")]
    Checksum,
}

/// What a RAM image was made from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamImageId {
    /// The base's content id.
    pub base_id: [u8; 32],
    /// The overlay's identity (`Overlay::identity`).
    pub overlay: [u8; 16],
    /// The image's length: the guest's RAM, bytes.
    pub ram_bytes: u64,
}

/// A checked view of an id file's bytes.
pub struct IdView<'a>(&'a [u8]);

impl<'a> IdView<'a> {
    /// Checks length, magic, version and checksum.
    pub fn new_checked(b: &'a [u8]) -> Result<IdView<'a>, RamImageError> {
        if b.len() != ID_LEN {
            return Err(RamImageError::Length(b.len()));
        }
        if &b[..8] != MAGIC {
            return Err(RamImageError::Magic);
        }
        let v = le_u16(b, 8..10);
        if v != VERSION {
            return Err(RamImageError::Version(v));
        }
        if le_u32(b, 12..16) != CRC32.checksum(&b[16..]) {
            return Err(RamImageError::Checksum);
        }
        Ok(IdView(b))
    }

    /// The id it holds.
    pub fn id(&self) -> RamImageId {
        let mut base_id = [0u8; 32];
        base_id.copy_from_slice(&self.0[16..48]);
        let mut overlay = [0u8; 16];
        overlay.copy_from_slice(&self.0[48..64]);
        RamImageId {
            base_id,
            overlay,
            ram_bytes: le_u64(self.0, 64..72),
        }
    }
}

impl RamImageId {
    /// The id file's bytes.
    pub fn to_bytes(&self) -> [u8; ID_LEN] {
        let mut b = [0u8; ID_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[16..48].copy_from_slice(&self.base_id);
        b[48..64].copy_from_slice(&self.overlay);
        b[64..72].copy_from_slice(&self.ram_bytes.to_le_bytes());
        let crc = CRC32.checksum(&b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// `<overlay>.ram`: the image of the overlay at `overlay`.
pub fn image_path(overlay: &Path) -> PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(".ram");
    PathBuf::from(p)
}

/// `<overlay>.ram.id`: what the image was made from.
pub fn id_path(overlay: &Path) -> PathBuf {
    let mut p = overlay.as_os_str().to_owned();
    p.push(".ram.id");
    PathBuf::from(p)
}

/// The id recorded beside `overlay`, when there is a readable, valid one.
pub fn read_id(overlay: &Path) -> Option<RamImageId> {
    let b = std::fs::read(id_path(overlay)).ok()?;
    IdView::new_checked(&b).ok().map(|v| v.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RamImageId {
        RamImageId {
            base_id: [0xAB; 32],
            overlay: [0x11; 16],
            ram_bytes: 256 << 20,
        }
    }

    #[test]
    fn golden_bytes() {
        let b = sample().to_bytes();
        let mut want = Vec::new();
        want.extend_from_slice(b"CLDRAMI1");
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&CRC32.checksum(&b[16..]).to_le_bytes());
        want.extend_from_slice(&[0xAB; 32]);
        want.extend_from_slice(&[0x11; 16]);
        want.extend_from_slice(&[0, 0, 0, 0x10, 0, 0, 0, 0]);
        assert_eq!(b.to_vec(), want);
        assert_eq!(IdView::new_checked(&b).unwrap().id(), sample());
    }

    #[test]
    fn damaged_ids_are_refused() {
        let good = sample().to_bytes();
        assert_eq!(
            IdView::new_checked(&good[..71]).err(),
            Some(RamImageError::Length(71))
        );
        let mut b = good;
        b[0] = b'X';
        assert_eq!(IdView::new_checked(&b).err(), Some(RamImageError::Magic));
        let mut b = good;
        b[8] = 2;
        assert_eq!(
            IdView::new_checked(&b).err(),
            Some(RamImageError::Version(2))
        );
        for i in 16..ID_LEN {
            let mut b = good;
            b[i] ^= 1;
            assert_eq!(
                IdView::new_checked(&b).err(),
                Some(RamImageError::Checksum),
                "byte {i}"
            );
        }
    }

    #[test]
    fn paths_sit_beside_the_overlay() {
        let o = Path::new("/d/services/s/app.overlay");
        assert_eq!(image_path(o), Path::new("/d/services/s/app.overlay.ram"));
        assert_eq!(id_path(o), Path::new("/d/services/s/app.overlay.ram.id"));
    }
}
