//! The state file: how every saved component (vCPUs, VM, devices, the whole machine) is put on
//! disk or on the wire.
//!
//! ```text
//! offset  size  field
//! 0       8     magic   "CLDSTATE"
//! 8       2     version (u16 LE) of the payload schema = 2
//! 10      2     kind    (u16 LE): what the payload is (see [`Kind`])
//! 12      8     length  (u64 LE) of the payload
//! 20      len   payload: postcard encoding of the component's state struct
//! 20+len  8     CRC-64/XZ (u64 LE) of bytes 0 .. 20+len
//! ```
//!
//! Reading checks, in order: length of the buffer, magic, version, kind, length field against
//! the buffer, checksum, then decodes. A file that passes every check but does not decode is
//! reported as such; nothing is trusted before the checksum matches.
//!
//! Version 2 is what this build writes and reads (version 1 files are refused, not
//! converted).

use serde::{de::DeserializeOwned, Serialize};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CLDSTATE";
/// Current payload schema version.
pub const VERSION: u16 = 2;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 20;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 8;

use crate::CRC64;

/// What a state file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// A whole machine snapshot (`MachineState` in the vmm's `snapshot` module).
    Machine = 1,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Kind::Machine),
            _ => None,
        }
    }
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than header + trailer, or than its length field says.
    #[error("state file is truncated ({have} bytes, {need} needed)")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: u64,
    },
    /// Wrong magic.
    #[error("not a state file (bad magic)")]
    BadMagic,
    /// Unsupported version.
    #[error("state file version {0} is not supported (this vmm reads version {VERSION})")]
    Version(u16),
    /// Not the expected kind.
    #[error("state file holds kind {found}, expected {expected:?}")]
    WrongKind {
        /// Kind in the file.
        found: u16,
        /// Kind wanted.
        expected: Kind,
    },
    /// Bytes after the trailer.
    #[error("state file has {0} unexpected bytes after its checksum")]
    TrailingBytes(usize),
    /// Checksum mismatch.
    #[error("state file is corrupt (checksum {found:#018x}, computed {computed:#018x})")]
    Checksum {
        /// Stored.
        found: u64,
        /// Computed.
        computed: u64,
    },
    /// The payload does not decode.
    #[error("state file payload does not decode")]
    Decode(#[source] postcard::Error),
    /// The payload decodes with bytes left over.
    #[error("state file payload has {0} bytes left over")]
    LeftOver(usize),
    /// Encoding failed.
    #[error("failed to encode state")]
    Encode(#[source] postcard::Error),
}

/// A checked view of a state file's bytes.
#[derive(Debug)]
pub struct StateFile<'a> {
    kind: u16,
    payload: &'a [u8],
}

impl<'a> StateFile<'a> {
    /// Checks `bytes` (magic, version, lengths, checksum) without decoding the payload.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, StateError> {
        let min = (HEADER_LEN + TRAILER_LEN) as u64;
        if (bytes.len() as u64) < min {
            return Err(StateError::Truncated {
                have: bytes.len(),
                need: min,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let le16 = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let version = le16(8);
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let kind = le16(10);
        let len = crate::le_u64(bytes, 12..20);
        let need = len.saturating_add(min);
        if (bytes.len() as u64) < need {
            return Err(StateError::Truncated {
                have: bytes.len(),
                need,
            });
        }
        let end = HEADER_LEN + len as usize;
        if bytes.len() > end + TRAILER_LEN {
            return Err(StateError::TrailingBytes(bytes.len() - end - TRAILER_LEN));
        }
        let found = crate::le_u64(bytes, end..end + 8);
        let computed = CRC64.checksum(&bytes[..end]);
        // Fuzzing builds (cfg(fuzzing), set by cargo-fuzz) skip the comparison so mutations
        // reach the decoder.
        if found != computed && !cfg!(fuzzing) {
            return Err(StateError::Checksum { found, computed });
        }
        Ok(StateFile {
            kind,
            payload: &bytes[HEADER_LEN..end],
        })
    }

    /// The payload kind number.
    pub fn kind(&self) -> u16 {
        self.kind
    }

    /// The payload bytes.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
}

/// Encodes `value` as a state file of `kind`.
pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Result<Vec<u8>, StateError> {
    let payload = postcard::to_stdvec(value).map_err(StateError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks and decodes a state file that must be of `kind`.
pub fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, StateError> {
    let file = StateFile::new_checked(bytes)?;
    if Kind::from_u16(file.kind()) != Some(kind) {
        return Err(StateError::WrongKind {
            found: file.kind(),
            expected: kind,
        });
    }
    let (value, rest) = postcard::take_from_bytes(file.payload()).map_err(StateError::Decode)?;
    if !rest.is_empty() {
        return Err(StateError::LeftOver(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(
            Kind::Machine,
            &Sample {
                a: 300,
                b: vec![1, 2],
            },
        )
        .unwrap()
    }

    #[test]
    fn golden_bytes() {
        // postcard: varint(300) = ac 02, len 2, bytes 01 02.
        let bytes = sample();
        assert_eq!(
            &bytes[..HEADER_LEN + 5],
            &[
                b'C', b'L', b'D', b'S', b'T', b'A', b'T', b'E', 2, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0,
                0xac, 0x02, 2, 1, 2
            ]
        );
        // The CRC-64/XZ of the bytes above, computed independently of this crate.
        assert_eq!(
            &bytes[HEADER_LEN + 5..],
            &[0xe3, 0xd3, 0xc5, 0x6c, 0x3e, 0x58, 0xd1, 0x64]
        );
        // CRC-64/XZ check value.
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn round_trips() {
        let back: Sample = decode(Kind::Machine, &sample()).unwrap();
        // A payload that decodes with bytes to spare is refused.
        assert_eq!(
            decode::<u32>(Kind::Machine, &sample()),
            Err(StateError::LeftOver(3))
        );
        assert_eq!(
            back,
            Sample {
                a: 300,
                b: vec![1, 2]
            }
        );
    }

    #[test]
    fn every_corruption_is_refused() {
        let good = sample();
        for cut in 0..good.len() {
            assert!(
                decode::<Sample>(Kind::Machine, &good[..cut]).is_err(),
                "cut {cut}"
            );
        }
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode::<Sample>(Kind::Machine, &b).is_err(),
                    "flip {i}.{bit}"
                );
            }
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            decode::<Sample>(Kind::Machine, &long),
            Err(StateError::TrailingBytes(1))
        );
        let mut v3 = good.clone();
        v3[8] = 3;
        assert_eq!(
            decode::<Sample>(Kind::Machine, &v3),
            Err(StateError::Version(3))
        );
        // A huge length field must not overflow or allocate.
        let mut huge = good;
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(Kind::Machine, &huge),
            Err(StateError::Truncated { .. })
        ));
    }
}
