//! An application overlay: what turns a base into a ready service VM.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "CLDOVRLY"
//! 8       2     version (u16 LE) = 2
//! 10      2     reserved, 0
//! 12      32    id of the base it applies to (SHA-256, see crate::base)
//! 44      8     index offset (u64 LE)
//! 52      8     index length (u64 LE)
//! 60      8     CRC-64/XZ of the index
//! 68      8     CRC-64/XZ of bytes 0..68
//! 76      …     chunks: each one zstd frame of whole 4 KiB pages, XXH3-64 in the index
//! index   …     postcard [`Index`], up to the end of the file
//! ```
//!
//! The index says, per guest page, how the customised VM's RAM differs from the base's:
//! nothing (same page at the same place — most pages), zero, a copy of another base page
//! (dedup by content against the base), data in a chunk, or a copy of a page an earlier chunk
//! wrote (dedup within the overlay). Each chunk carries its own checksum (XXH3-64; the header
//! and the index a CRC-64/XZ) and decodes on its own, so a reader can fetch and apply any
//! chunk independently (lazy start, handoff).
//!
//! Apply order: zero runs → base copies (read from the base image, never from the VM) →
//! chunks (in parallel) → overlay copies. [`Overlay::open`] (a file) and
//! [`Overlay::from_bytes`] (bytes in memory) check the header ([`Header::new_checked`]), the
//! index and every page number and chunk bound before anything is applied; [`Overlay::verify_chunks`]
//! checks every chunk's XXH3-64 checksum (a few GB/s, so a lazy start can afford it before
//! any vCPU runs), and each chunk is checked again before it is decompressed. A full pass
//! can be recorded beside the file (`<overlay>.verified`, see [`verified`]), so the next user
//! of the unchanged file skips it ([`Overlay::verified_before`]).
//!
//! The disk δ (the customised VM's copy-on-write disk layer) rides along as a second block
//! space: [`Index::disk_chunks`], chunks of whole 4 KiB disk blocks after the RAM chunks,
//! checked and decoded the same way ([`Overlay::disk_blocks`]).
//!
//! Version 2 changed the chunk checksum from CRC-64/XZ to XXH3-64 (about 10× faster here) and
//! added the disk δ.
//!
//! The parts: [`header`] (the fixed header: a checked byte view and its parsed form),
//! [`index`] (the index and its checks), [`reader`] (open, verify, apply), [`writer`]
//! (build), [`verified`] (the record of a full checksum pass).

use std::path::PathBuf;

pub mod header;
pub mod index;
pub mod reader;
pub mod verified;
pub mod writer;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;

pub use header::{Header, HeaderError, HeaderRepr};
pub use index::{Chunk, Index, IndexError, PageCopy, Run, Stats};
pub use reader::{ChunkChecks, ChunkError, Overlay, PageSink, SinkError};
pub use writer::{build, BuildError, BuildOptions, DiskDelta};

/// File magic.
pub const MAGIC: &[u8; 8] = b"CLDOVRLY";
/// Format version.
pub const VERSION: u16 = 2;
/// Header bytes.
pub const HEADER_LEN: usize = 76;
/// Most pages in one chunk (4 MiB raw).
pub const MAX_CHUNK_PAGES: u64 = 1024;
/// Largest index accepted (bytes).
pub const MAX_INDEX: u64 = 256 << 20;
/// Checksums are compared, except in fuzzing builds (`cfg(fuzzing)`, set by cargo-fuzz),
/// where they would stop every mutation at the first check.
const CHECK_CRC: bool = !cfg!(fuzzing);

/// Why an overlay was refused or could not be written or applied.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// File I/O failed.
    #[error("failed to {0} '{1}'")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// Not an overlay, or damaged.
    #[error("'{0}' is not a usable overlay")]
    Invalid(PathBuf, #[source] Malformed),
    /// Built for another base.
    #[error("overlay '{path}' applies to base {wanted}, not to base {have}")]
    WrongBase {
        /// The overlay.
        path: PathBuf,
        /// Base id the overlay names.
        wanted: String,
        /// Base id offered.
        have: String,
    },
    /// A chunk is damaged.
    #[error("chunk {chunk} of overlay '{path}' is damaged")]
    Chunk {
        /// The overlay.
        path: PathBuf,
        /// Chunk number.
        chunk: usize,
        /// What is wrong.
        #[source]
        source: ChunkError,
    },
    /// Writing into the VM failed.
    #[error("failed to apply the overlay")]
    Sink(#[source] SinkError),
    /// A decompression thread panicked.
    #[error("a decompression thread panicked")]
    Panicked,
    /// The inputs of a build disagree, or encoding failed.
    #[error("cannot build an overlay")]
    Build(#[source] BuildError),
}

/// What is wrong with an overlay's header or index.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// The header.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The index.
    #[error(transparent)]
    Index(#[from] IndexError),
}
