//! The appliance's update artifact (a `.cup` file) and the small typed files the updater and
//! the agent both read: which root slot a box booted from, and what the last update did.
//!
//! ```text
//! offset  size  field
//! 0       8     magic   "CLDUPDT\0"
//! 8       4     version (u32 LE) = 1
//! 12      4     header length H (u32 LE), at most MAX_HEADER (64 KiB)
//! 16      32    SHA-256 of the H header bytes
//! 48      H     header: postcard `UpdateHeader` (board, generation, version, created, parts)
//! 48+H    ...   payload: the parts, each one zstd stream, back to back; a part's `offset` is
//!               relative to 48+H and equals the sum of the `stored_len` of the parts before it
//! ```
//!
//! Each part records its compressed length (`stored_len`), its decompressed length (`len`) and
//! the SHA-256 of its decompressed bytes. [`read_header`] checks, in order: magic, version,
//! header length, header hash, then decodes the header and checks its parts (one of each kind
//! at most, back to back). [`PartReader`] decompresses one part, never yields more than its
//! `len` bytes, and fails at its end when the length or the hash differ, so a consumer
//! streaming a part into a partition learns of corruption before it activates anything.
//!
//! The typed files: [`Slot`] (root slot A or B), [`Booted`] (the slot and generation on the
//! kernel command line, `cloudlet.slot=` and `cloudlet.generation=`, see [`parse_cmdline`]) and
//! [`UpdateRecord`] (`DATA/updates/last.json`, JSON with `"v": 1`), from which
//! [`UpdateState::of`] says whether the box runs the last update, rolled back from it, or
//! failed to apply it.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::le_u32;

/// First bytes of an update artifact.
pub const MAGIC: &[u8; 8] = b"CLDUPDT\0";
/// Layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before the header.
pub const PREFIX_LEN: usize = 48;
/// Largest header accepted.
pub const MAX_HEADER: u32 = 64 * 1024;
/// zstd level of every part.
pub const ZSTD_LEVEL: i32 = 3;
/// The last update's record, relative to the agent's data directory.
pub const RECORD_PATH: &str = "updates/last.json";
/// Where the agent drops a verified artifact for the updater, relative to the data directory.
pub const PENDING_PATH: &str = "updates/pending.cup";
/// Version of [`UpdateRecord`]'s JSON.
pub const RECORD_VERSION: u32 = 1;

mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const HEADER_LEN: Range<usize> = 12..16;
    pub const HEADER_SHA: Range<usize> = 16..48;
}

/// Why an artifact, a part or a record was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Reading or writing failed.
    #[error("update artifact I/O failed")]
    Io(#[source] io::Error),
    /// The file ends before the prefix or the header does.
    #[error("update artifact is truncated: it ends inside its {0}")]
    Truncated(&'static str),
    /// Wrong magic.
    #[error("not an update artifact (bad magic; a .cup file starts with \"CLDUPDT\")")]
    Magic,
    /// Another layout version.
    #[error("update artifact version {0} is not supported (this updater reads version {VERSION})")]
    Version(u32),
    /// Header length beyond [`MAX_HEADER`].
    #[error(
        "update artifact header of {0} bytes is larger than {MAX_HEADER}: not a valid artifact"
    )]
    HeaderTooLong(u32),
    /// The header's SHA-256 differs from the prefix's.
    #[error("update artifact header is corrupt (SHA-256 mismatch): download it again")]
    HeaderHash,
    /// The header does not decode.
    #[error("update artifact header does not decode")]
    HeaderDecode(#[source] postcard::Error),
    /// The header decodes with bytes left over.
    #[error("update artifact header has {0} bytes left over after decoding")]
    HeaderLeftOver(usize),
    /// The parts list is inconsistent.
    #[error("update artifact header is inconsistent: {0}")]
    Parts(String),
    /// The artifact lacks a part.
    #[error("update artifact has no {0:?} part")]
    MissingPart(PartKind),
    /// The payload ends inside a part.
    #[error(
        "update artifact is truncated: its {kind:?} part has {have} of {stored_len} stored bytes"
    )]
    PartTruncated {
        /// Which part.
        kind: PartKind,
        /// Stored bytes present.
        have: u64,
        /// Stored bytes the header gives.
        stored_len: u64,
    },
    /// A part does not decompress.
    #[error("update artifact's {kind:?} part is corrupt (it does not decompress)")]
    PartDecompress {
        /// Which part.
        kind: PartKind,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// A part decompresses to another length than its header says.
    #[error(
        "update artifact's {kind:?} part is corrupt: {got} bytes decompressed, {len} expected"
    )]
    PartLength {
        /// Which part.
        kind: PartKind,
        /// Decompressed bytes seen (at least; counting stops at `len + 1`).
        got: u64,
        /// Length the header gives.
        len: u64,
    },
    /// A part's SHA-256 differs from its header's.
    #[error("update artifact's {0:?} part is corrupt (SHA-256 mismatch): download it again")]
    PartHash(PartKind),
    /// The header does not encode (a field too long).
    #[error("update header does not encode")]
    Encode(#[source] postcard::Error),
    /// A record is not JSON of the expected shape.
    #[error("update record does not parse")]
    Record(#[source] serde_json::Error),
    /// A record of another version.
    #[error("update record version {0} is not supported (this build reads {RECORD_VERSION})")]
    RecordVersion(u32),
}

impl From<io::Error> for UpdateError {
    /// Unwraps an [`UpdateError`] carried through `io::Error` (as [`PartReader`] returns
    /// them), else wraps the I/O error.
    fn from(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|i| i.is::<UpdateError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(u) = inner.downcast::<UpdateError>() {
                    return *u;
                }
            }
            unreachable!("checked above that the inner error is an UpdateError");
        }
        UpdateError::Io(e)
    }
}

/// What a part holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PartKind {
    /// The root filesystem image (ext4), written to the target slot's partition.
    Root,
    /// The kernel, written to `ESP/cloudlet/SLOT/vmlinuz`.
    Kernel,
    /// The initrd, written to `ESP/cloudlet/SLOT/initrd.img`.
    Initrd,
}

/// One part of the payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What it holds.
    pub kind: PartKind,
    /// Start of its zstd stream, relative to the payload's start.
    pub offset: u64,
    /// Bytes of its zstd stream.
    pub stored_len: u64,
    /// Bytes once decompressed.
    pub len: u64,
    /// SHA-256 of the decompressed bytes.
    pub sha256: [u8; 32],
}

/// The artifact's header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateHeader {
    /// The board it is for (`name` in the board's TOML).
    pub board: String,
    /// Generation: a number that grows with each build (unix seconds of the build).
    pub generation: u64,
    /// The product version, for people (`0.1.0`).
    pub version: String,
    /// When the artifact was made, unix seconds.
    pub created_unix: u64,
    /// The parts, in payload order.
    pub parts: Vec<Part>,
}

impl UpdateHeader {
    /// The part of `kind`, if the artifact has one.
    pub fn part(&self, kind: PartKind) -> Option<&Part> {
        self.parts.iter().find(|p| p.kind == kind)
    }

    /// The part of `kind`, or [`UpdateError::MissingPart`].
    pub fn require(&self, kind: PartKind) -> Result<&Part, UpdateError> {
        self.part(kind).ok_or(UpdateError::MissingPart(kind))
    }

    /// Bytes of the whole payload.
    pub fn payload_len(&self) -> u64 {
        self.parts.iter().map(|p| p.stored_len).sum()
    }

    /// Checks the parts: one of each kind at most, back to back from offset 0, no overflow.
    pub fn check(&self) -> Result<(), UpdateError> {
        let mut end: u64 = 0;
        for (i, p) in self.parts.iter().enumerate() {
            if self.parts[..i].iter().any(|q| q.kind == p.kind) {
                return Err(UpdateError::Parts(format!("two {:?} parts", p.kind)));
            }
            if p.offset != end {
                return Err(UpdateError::Parts(format!(
                    "{:?} part at offset {}, expected {end} (parts are back to back)",
                    p.kind, p.offset
                )));
            }
            end = end.checked_add(p.stored_len).ok_or_else(|| {
                UpdateError::Parts(format!("{:?} part's length overflows", p.kind))
            })?;
        }
        Ok(())
    }

    /// The prefix and header bytes (everything before the payload).
    pub fn encode_head(&self) -> Result<Vec<u8>, UpdateError> {
        self.check()?;
        let header = postcard::to_stdvec(self).map_err(UpdateError::Encode)?;
        let len = u32::try_from(header.len())
            .ok()
            .filter(|l| *l <= MAX_HEADER)
            .ok_or(UpdateError::HeaderTooLong(
                header.len().min(u32::MAX as usize) as u32,
            ))?;
        let mut b = Vec::with_capacity(PREFIX_LEN + header.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&Sha256::digest(&header));
        b.extend_from_slice(&header);
        Ok(b)
    }
}

/// A checked view of the 48-byte prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Bytes of the header that follows.
    pub header_len: u32,
    /// SHA-256 the header must have.
    pub header_sha256: [u8; 32],
}

impl Prefix {
    /// Checks length, magic, version and header length.
    pub fn new_checked(b: &[u8]) -> Result<Prefix, UpdateError> {
        if b.len() < PREFIX_LEN {
            return Err(UpdateError::Truncated("48-byte prefix"));
        }
        if &b[field::MAGIC] != MAGIC {
            return Err(UpdateError::Magic);
        }
        let version = le_u32(b, field::VERSION);
        if version != VERSION {
            return Err(UpdateError::Version(version));
        }
        let header_len = le_u32(b, field::HEADER_LEN);
        if header_len > MAX_HEADER {
            return Err(UpdateError::HeaderTooLong(header_len));
        }
        let mut header_sha256 = [0u8; 32];
        header_sha256.copy_from_slice(&b[field::HEADER_SHA]);
        Ok(Prefix {
            header_len,
            header_sha256,
        })
    }
}

/// A checked header and where the payload starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactHead {
    /// The header.
    pub header: UpdateHeader,
    /// Offset of the payload in the artifact (48 + H).
    pub payload_start: u64,
}

/// Reads `len` bytes, or says which part of the artifact ends early.
fn read_full(r: &mut impl Read, len: usize, what: &'static str) -> Result<Vec<u8>, UpdateError> {
    let mut b = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut b)?;
    if b.len() < len {
        return Err(UpdateError::Truncated(what));
    }
    Ok(b)
}

/// Reads and checks the prefix and header from `r`, leaving it at the payload's start.
pub fn read_header(r: &mut impl Read) -> Result<ArtifactHead, UpdateError> {
    let prefix = Prefix::new_checked(&read_full(r, PREFIX_LEN, "48-byte prefix")?)?;
    let bytes = read_full(r, prefix.header_len as usize, "header")?;
    // Under `cfg(fuzzing)` mutated inputs get past the hash to the decoder.
    if !cfg!(fuzzing) && Sha256::digest(&bytes).as_slice() != prefix.header_sha256 {
        return Err(UpdateError::HeaderHash);
    }
    let (header, rest): (UpdateHeader, _) =
        postcard::take_from_bytes(&bytes).map_err(UpdateError::HeaderDecode)?;
    if !rest.is_empty() {
        return Err(UpdateError::HeaderLeftOver(rest.len()));
    }
    header.check()?;
    Ok(ArtifactHead {
        header,
        payload_start: (PREFIX_LEN + bytes.len()) as u64,
    })
}

/// Counts what a part's zstd stream consumed, to tell a truncated artifact from a corrupt one.
struct Stored<R> {
    inner: io::Take<R>,
    consumed: u64,
    ended: bool,
}

impl<R: Read> Read for Stored<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed += n as u64;
        if n == 0 && !buf.is_empty() {
            self.ended = true;
        }
        Ok(n)
    }
}

/// One part, decompressed while read: yields at most the part's `len` bytes, then, at its
/// end, fails with [`UpdateError::PartLength`] or [`UpdateError::PartHash`] (carried in an
/// `io::Error`; `UpdateError::from` unwraps it) if the bytes are not the ones the header
/// describes. Read it to its end (`io::copy` does) before trusting what it gave.
pub struct PartReader<R: Read> {
    part: Part,
    decoder: zstd::stream::read::Decoder<'static, BufReader<Stored<R>>>,
    hasher: Sha256,
    produced: u64,
    verified: bool,
}

impl<R: Read> PartReader<R> {
    /// A reader of `part` over `r`, which must stand at the part's first stored byte.
    pub fn new(r: R, part: &Part) -> Result<Self, UpdateError> {
        let stored = Stored {
            inner: r.take(part.stored_len),
            consumed: 0,
            ended: false,
        };
        Ok(PartReader {
            part: part.clone(),
            decoder: zstd::stream::read::Decoder::new(stored)?,
            hasher: Sha256::new(),
            produced: 0,
            verified: false,
        })
    }

    /// The part it reads.
    pub fn part(&self) -> &Part {
        &self.part
    }

    /// Decompressed bytes yielded so far.
    pub fn produced(&self) -> u64 {
        self.produced
    }

    fn truncated(&self) -> Option<UpdateError> {
        let s = self.decoder.get_ref().get_ref();
        (s.ended && s.consumed < self.part.stored_len).then_some(UpdateError::PartTruncated {
            kind: self.part.kind,
            have: s.consumed,
            stored_len: self.part.stored_len,
        })
    }

    fn fail(e: UpdateError) -> io::Error {
        io::Error::other(e)
    }

    fn read_part(&mut self, buf: &mut [u8]) -> Result<usize, UpdateError> {
        if self.verified || buf.is_empty() {
            return Ok(0);
        }
        let n = match self.decoder.read(buf) {
            Ok(n) => n,
            Err(source) => {
                return Err(self.truncated().unwrap_or(UpdateError::PartDecompress {
                    kind: self.part.kind,
                    source,
                }))
            }
        };
        if n == 0 {
            if let Some(e) = self.truncated() {
                return Err(e);
            }
            if self.produced != self.part.len {
                return Err(UpdateError::PartLength {
                    kind: self.part.kind,
                    got: self.produced,
                    len: self.part.len,
                });
            }
            if !cfg!(fuzzing) && self.hasher.clone().finalize().as_slice() != self.part.sha256 {
                return Err(UpdateError::PartHash(self.part.kind));
            }
            self.verified = true;
            return Ok(0);
        }
        if self.produced + n as u64 > self.part.len {
            return Err(UpdateError::PartLength {
                kind: self.part.kind,
                got: self.part.len + 1,
                len: self.part.len,
            });
        }
        self.hasher.update(&buf[..n]);
        self.produced += n as u64;
        Ok(n)
    }
}

impl<R: Read> Read for PartReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_part(buf).map_err(Self::fail)
    }
}

/// A reader of the part of `kind` in the artifact `r` (seeks to it).
pub fn open_part<R: Read + Seek>(
    mut r: R,
    head: &ArtifactHead,
    kind: PartKind,
) -> Result<PartReader<R>, UpdateError> {
    let part = head.header.require(kind)?;
    r.seek(SeekFrom::Start(head.payload_start + part.offset))?;
    PartReader::new(r, part)
}

/// Hashes and counts what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// An unnamed scratch file (created and unlinked at once) in the temp directory.
fn scratch_file() -> io::Result<File> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "cloudlet-cup-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

/// Compresses `input` (streamed) into a scratch file: its part description (offset 0) and the
/// file, rewound.
fn compress_part(kind: PartKind, input: impl Read) -> Result<(Part, File), UpdateError> {
    let mut enc = zstd::stream::write::Encoder::new(scratch_file()?, ZSTD_LEVEL)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    if workers > 1 {
        enc.multithread(workers)?;
    }
    let mut src = Hashing {
        inner: input,
        hasher: Sha256::new(),
        len: 0,
    };
    io::copy(&mut src, &mut enc)?;
    let mut file = enc.finish()?;
    let stored_len = file.stream_position()?;
    file.rewind()?;
    Ok((
        Part {
            kind,
            offset: 0,
            stored_len,
            len: src.len,
            sha256: src.hasher.finalize().into(),
        },
        file,
    ))
}

/// Writes an artifact to `out`: each part (file at its path, streamed) zstd-compressed at
/// level 3 on every core into a scratch file (in `std::env::temp_dir()`, i.e. `$TMPDIR`,
/// unlinked at once: it needs room for the compressed part), then prefix, header and
/// payloads. Returns the header written.
pub fn write_artifact(
    out: &mut impl Write,
    board: &str,
    generation: u64,
    version: &str,
    created_unix: u64,
    parts: &[(PartKind, &Path)],
) -> Result<UpdateHeader, UpdateError> {
    let mut readers = Vec::with_capacity(parts.len());
    for (kind, path) in parts {
        readers.push((*kind, File::open(path)?));
    }
    write_artifact_from(out, board, generation, version, created_unix, readers)
}

/// [`write_artifact`] over readers instead of files.
pub fn write_artifact_from<R: Read>(
    out: &mut impl Write,
    board: &str,
    generation: u64,
    version: &str,
    created_unix: u64,
    parts: Vec<(PartKind, R)>,
) -> Result<UpdateHeader, UpdateError> {
    let mut header = UpdateHeader {
        board: board.to_owned(),
        generation,
        version: version.to_owned(),
        created_unix,
        parts: Vec::with_capacity(parts.len()),
    };
    let mut files = Vec::with_capacity(parts.len());
    for (kind, input) in parts {
        let (mut part, file) = compress_part(kind, input)?;
        part.offset = header.payload_len();
        header.parts.push(part);
        files.push(file);
    }
    out.write_all(&header.encode_head()?)?;
    for mut f in files {
        io::copy(&mut f, out)?;
    }
    out.flush()?;
    Ok(header)
}

/// A root slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A (`cloudlet-root-a`).
    A,
    /// Slot B (`cloudlet-root-b`).
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// `"a"` or `"b"`: in entry file names, ESP paths and the command line.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The GPT partition label of its root partition.
    pub fn partlabel(self) -> &'static str {
        match self {
            Slot::A => "cloudlet-root-a",
            Slot::B => "cloudlet-root-b",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// The slot labelled `s` (`"a"` or `"b"`).
    pub fn from_label(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// What the running system booted: from `cloudlet.slot=` and `cloudlet.generation=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booted {
    /// The root slot.
    pub slot: Slot,
    /// The generation of the image in it.
    pub generation: u64,
}

/// The booted slot and generation from a kernel command line (`/proc/cmdline`), when both
/// parameters are there and valid (the last of each counts, as the kernel's own do).
pub fn parse_cmdline(cmdline: &str) -> Option<Booted> {
    let mut slot = None;
    let mut generation = None;
    for arg in cmdline.split_whitespace() {
        if let Some(v) = arg.strip_prefix("cloudlet.slot=") {
            slot = Slot::from_label(v);
        } else if let Some(v) = arg.strip_prefix("cloudlet.generation=") {
            generation = v.parse().ok();
        }
    }
    Some(Booted {
        slot: slot?,
        generation: generation?,
    })
}

/// How an update attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateResult {
    /// Written to the target slot, entry in place: the next boot tries it.
    Applied,
    /// Refused or failed part way: the target slot has no boot entry.
    Failed,
}

/// `DATA/updates/last.json`: what the last update attempt did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateRecord {
    /// Record version ([`RECORD_VERSION`]).
    pub v: u32,
    /// The artifact's generation.
    pub generation: u64,
    /// The artifact's version.
    pub version: String,
    /// The slot it was written to.
    pub slot: Slot,
    /// When the attempt ended, unix seconds.
    pub applied_unix: u64,
    /// How it ended.
    pub result: UpdateResult,
    /// Why it failed.
    pub error: Option<String>,
}

impl UpdateRecord {
    /// Parses and checks a record's JSON.
    pub fn parse(s: &str) -> Result<UpdateRecord, UpdateError> {
        let r: UpdateRecord = serde_json::from_str(s).map_err(UpdateError::Record)?;
        if r.v != RECORD_VERSION {
            return Err(UpdateError::RecordVersion(r.v));
        }
        Ok(r)
    }

    /// The record's JSON (pretty, one trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a record always serialises");
        s.push('\n');
        s
    }
}

/// Where the box stands with its last update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum UpdateState {
    /// No update recorded, or the record says nothing about the running system.
    None,
    /// Applied during this boot: the next boot tries it.
    Pending {
        /// Its generation.
        generation: u64,
    },
    /// The box runs the last update's generation.
    Running,
    /// The last update was applied, but the box booted the other slot's older generation:
    /// the new one did not come up healthy and boot counting fell back.
    RolledBack {
        /// The generation that was tried.
        attempted: u64,
    },
    /// The last update was refused or failed while being written.
    Failed {
        /// Why.
        error: String,
    },
}

impl UpdateState {
    /// The state from what the box booted and the last record. `booted_at_unix` (the boot
    /// time, `btime` in `/proc/stat`), when given, tells an update applied during this boot
    /// ([`UpdateState::Pending`]) from one this boot fell back from.
    pub fn of(
        booted: Option<&Booted>,
        record: Option<&UpdateRecord>,
        booted_at_unix: Option<u64>,
    ) -> UpdateState {
        let Some(r) = record else {
            return UpdateState::None;
        };
        if r.result == UpdateResult::Failed {
            return UpdateState::Failed {
                error: r.error.clone().unwrap_or_else(|| "unknown error".into()),
            };
        }
        let Some(b) = booted else {
            return UpdateState::None;
        };
        if b.generation == r.generation {
            return UpdateState::Running;
        }
        if r.generation > b.generation && r.slot != b.slot {
            if booted_at_unix.is_some_and(|t| r.applied_unix >= t) {
                return UpdateState::Pending {
                    generation: r.generation,
                };
            }
            return UpdateState::RolledBack {
                attempted: r.generation,
            };
        }
        UpdateState::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> UpdateHeader {
        UpdateHeader {
            board: "pc".into(),
            generation: 300,
            version: "0.1".into(),
            created_unix: 5,
            parts: vec![
                Part {
                    kind: PartKind::Root,
                    offset: 0,
                    stored_len: 10,
                    len: 200,
                    sha256: [0xAA; 32],
                },
                Part {
                    kind: PartKind::Kernel,
                    offset: 10,
                    stored_len: 3,
                    len: 4,
                    sha256: [0xBB; 32],
                },
            ],
        }
    }

    #[test]
    fn golden_bytes() {
        let b = sample_header().encode_head().unwrap();
        let mut header = vec![2, b'p', b'c', 0xAC, 0x02, 3, b'0', b'.', b'1', 5, 2];
        header.extend_from_slice(&[0, 0, 10, 0xC8, 0x01]);
        header.extend_from_slice(&[0xAA; 32]);
        header.extend_from_slice(&[1, 10, 3, 4]);
        header.extend_from_slice(&[0xBB; 32]);
        let mut want = Vec::new();
        want.extend_from_slice(b"CLDUPDT\0");
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&(header.len() as u32).to_le_bytes());
        want.extend_from_slice(&Sha256::digest(&header));
        want.extend_from_slice(&header);
        assert_eq!(b, want);
        let head = read_header(&mut &b[..]).unwrap();
        assert_eq!(head.header, sample_header());
        assert_eq!(head.payload_start, 48 + header.len() as u64);
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        // Mostly zeros with some structure, like a filesystem image.
        (0..len)
            .map(|i| {
                if i % 4096 < 64 {
                    (i as u8).wrapping_mul(seed)
                } else {
                    0
                }
            })
            .collect()
    }

    fn artifact() -> (Vec<u8>, Vec<Vec<u8>>) {
        let parts = vec![data(1 << 20, 7), data(5000, 3), data(300, 11)];
        let mut out = Vec::new();
        write_artifact_from(
            &mut out,
            "pc",
            1765000000,
            "0.1.0",
            1765000001,
            vec![
                (PartKind::Root, &parts[0][..]),
                (PartKind::Kernel, &parts[1][..]),
                (PartKind::Initrd, &parts[2][..]),
            ],
        )
        .unwrap();
        (out, parts)
    }

    fn read_part(bytes: &[u8], kind: PartKind) -> Result<Vec<u8>, UpdateError> {
        let mut c = io::Cursor::new(bytes);
        let head = read_header(&mut c)?;
        let mut r = open_part(c, &head, kind)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn written_artifacts_read_back() {
        let (bytes, parts) = artifact();
        let head = read_header(&mut &bytes[..]).unwrap();
        assert_eq!(head.header.board, "pc");
        assert_eq!(head.header.generation, 1765000000);
        assert_eq!(
            head.payload_start + head.header.payload_len(),
            bytes.len() as u64
        );
        for (kind, want) in [PartKind::Root, PartKind::Kernel, PartKind::Initrd]
            .into_iter()
            .zip(&parts)
        {
            let p = head.header.part(kind).unwrap();
            assert_eq!(p.len, want.len() as u64);
            assert_eq!(p.sha256, <[u8; 32]>::from(Sha256::digest(want)));
            assert_eq!(&read_part(&bytes, kind).unwrap(), want, "{kind:?}");
        }
        // The mostly-zero root compresses well.
        assert!(head.header.part(PartKind::Root).unwrap().stored_len < 64 << 10);
    }

    #[test]
    fn written_files_read_back() {
        let dir = std::env::temp_dir().join(format!("format-update-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root.img");
        let kernel = dir.join("vmlinuz");
        std::fs::write(&root, data(300_000, 5)).unwrap();
        std::fs::write(&kernel, b"kernel").unwrap();
        let mut out = Vec::new();
        let h = write_artifact(
            &mut out,
            "b",
            2,
            "v",
            3,
            &[(PartKind::Root, &root), (PartKind::Kernel, &kernel)],
        )
        .unwrap();
        assert_eq!(read_header(&mut &out[..]).unwrap().header, h);
        assert_eq!(read_part(&out, PartKind::Kernel).unwrap(), b"kernel");
        assert!(matches!(
            read_part(&out, PartKind::Initrd),
            Err(UpdateError::MissingPart(PartKind::Initrd))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_prefixes_and_headers_are_refused() {
        let (good, _) = artifact();
        let mut b = good.clone();
        b[0] = b'X';
        let e = read_header(&mut &b[..]).unwrap_err();
        assert!(matches!(e, UpdateError::Magic), "{e}");
        assert!(e.to_string().contains("bad magic"));

        let mut b = good.clone();
        b[8] = 2;
        let e = read_header(&mut &b[..]).unwrap_err();
        assert!(matches!(e, UpdateError::Version(2)), "{e}");
        assert!(e.to_string().contains("version 2"));

        let mut b = good.clone();
        b[12..16].copy_from_slice(&(MAX_HEADER + 1).to_le_bytes());
        assert!(matches!(
            read_header(&mut &b[..]),
            Err(UpdateError::HeaderTooLong(_))
        ));

        let mut b = good.clone();
        b[PREFIX_LEN + 1] ^= 1;
        let e = read_header(&mut &b[..]).unwrap_err();
        assert!(matches!(e, UpdateError::HeaderHash), "{e}");
        assert!(e.to_string().contains("SHA-256"));

        let e = read_header(&mut &good[..30]).unwrap_err();
        assert!(e.to_string().contains("prefix"), "{e}");
        let e = read_header(&mut &good[..PREFIX_LEN + 3]).unwrap_err();
        assert!(e.to_string().contains("inside its header"), "{e}");
    }

    #[test]
    fn inconsistent_parts_are_refused() {
        let mut h = sample_header();
        h.parts[1].offset = 11;
        assert!(matches!(h.encode_head(), Err(UpdateError::Parts(_))));
        let mut h = sample_header();
        h.parts[1].kind = PartKind::Root;
        let e = h.encode_head().unwrap_err();
        assert!(e.to_string().contains("two Root parts"), "{e}");
    }

    #[test]
    fn truncated_payload_is_refused() {
        let (good, _) = artifact();
        // Cut inside the root part.
        let head = read_header(&mut &good[..]).unwrap();
        let root = head.header.part(PartKind::Root).unwrap().clone();
        let cut = (head.payload_start + root.stored_len / 2) as usize;
        let e = read_part(&good[..cut], PartKind::Root).unwrap_err();
        assert!(
            matches!(
                e,
                UpdateError::PartTruncated {
                    kind: PartKind::Root,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        // Cut off the last part entirely.
        let e = read_part(&good[..good.len() - 2], PartKind::Initrd).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn corrupt_parts_are_refused() {
        let (good, parts) = artifact();
        let head = read_header(&mut &good[..]).unwrap();
        let root = head.header.part(PartKind::Root).unwrap().clone();
        // Every flipped byte of the stored root stream is caught, by the decoder or the hash.
        let start = head.payload_start as usize;
        for at in (start..start + root.stored_len as usize).step_by(97) {
            let mut b = good.clone();
            b[at] ^= 0x10;
            let e = read_part(&b, PartKind::Root).unwrap_err();
            assert!(
                matches!(
                    e,
                    UpdateError::PartHash(PartKind::Root)
                        | UpdateError::PartDecompress {
                            kind: PartKind::Root,
                            ..
                        }
                        | UpdateError::PartLength {
                            kind: PartKind::Root,
                            ..
                        }
                ),
                "byte {at}: {e}"
            );
            assert!(e.to_string().contains("corrupt"), "{e}");
        }
        // A header whose hash does not match the content (rehashed so the header passes).
        let mut h = head.header.clone();
        h.parts[0].sha256[0] ^= 1;
        let mut b = h.encode_head().unwrap();
        b.extend_from_slice(&good[start..]);
        let e = read_part(&b, PartKind::Root).unwrap_err();
        assert!(matches!(e, UpdateError::PartHash(PartKind::Root)), "{e}");
        // A header claiming fewer bytes: the reader never yields more than `len`.
        let mut h = head.header.clone();
        h.parts[0].len = 1000;
        let mut b = h.encode_head().unwrap();
        b.extend_from_slice(&good[start..]);
        let mut c = io::Cursor::new(&b[..]);
        let head2 = read_header(&mut c).unwrap();
        let mut r = open_part(c, &head2, PartKind::Root).unwrap();
        let mut out = Vec::new();
        let e = UpdateError::from(r.read_to_end(&mut out).unwrap_err());
        assert!(
            matches!(e, UpdateError::PartLength { len: 1000, .. }),
            "{e}"
        );
        assert!(out.len() <= 1000);
        // A header claiming more bytes.
        let mut h = head.header.clone();
        h.parts[0].len = parts[0].len() as u64 + 1;
        let mut b = h.encode_head().unwrap();
        b.extend_from_slice(&good[start..]);
        let e = read_part(&b, PartKind::Root).unwrap_err();
        assert!(matches!(e, UpdateError::PartLength { .. }), "{e}");
    }

    #[test]
    fn slots() {
        assert_eq!(Slot::A.label(), "a");
        assert_eq!(Slot::B.partlabel(), "cloudlet-root-b");
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::from_label("b"), Some(Slot::B));
        assert_eq!(Slot::from_label("c"), None);
    }

    #[test]
    fn cmdlines() {
        let c = "BOOT_IMAGE=/x root=PARTLABEL=cloudlet-root-b rw cloudlet.slot=b \
                 cloudlet.generation=1765000000 console=ttyS0,115200\n";
        assert_eq!(
            parse_cmdline(c),
            Some(Booted {
                slot: Slot::B,
                generation: 1765000000
            })
        );
        assert_eq!(parse_cmdline("root=/dev/sda1 cloudlet.slot=a"), None);
        assert_eq!(parse_cmdline("cloudlet.slot=x cloudlet.generation=1"), None);
        assert_eq!(
            parse_cmdline("cloudlet.slot=a cloudlet.generation=1 cloudlet.slot=b"),
            Some(Booted {
                slot: Slot::B,
                generation: 1
            })
        );
    }

    fn record(result: UpdateResult, generation: u64, slot: Slot) -> UpdateRecord {
        UpdateRecord {
            v: 1,
            generation,
            version: "0.1.0".into(),
            slot,
            applied_unix: 100,
            result,
            error: (result == UpdateResult::Failed).then(|| "part hash".into()),
        }
    }

    #[test]
    fn records() {
        let r = record(UpdateResult::Applied, 7, Slot::B);
        let j = r.to_json();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v": 1, "generation": 7, "version": "0.1.0", "slot": "b",
                "applied_unix": 100, "result": "applied", "error": null})
        );
        assert_eq!(UpdateRecord::parse(&j).unwrap(), r);
        let e = UpdateRecord::parse(&j.replace("\"v\": 1", "\"v\": 2")).unwrap_err();
        assert!(matches!(e, UpdateError::RecordVersion(2)), "{e}");
        assert!(UpdateRecord::parse("{}").is_err());
    }

    #[test]
    fn states() {
        let on_a1 = Booted {
            slot: Slot::A,
            generation: 1,
        };
        let on_b2 = Booted {
            slot: Slot::B,
            generation: 2,
        };
        let applied_b2 = record(UpdateResult::Applied, 2, Slot::B);
        assert_eq!(UpdateState::of(Some(&on_a1), None, None), UpdateState::None);
        assert_eq!(
            UpdateState::of(Some(&on_b2), Some(&applied_b2), None),
            UpdateState::Running
        );
        assert_eq!(
            UpdateState::of(Some(&on_a1), Some(&applied_b2), Some(150)),
            UpdateState::RolledBack { attempted: 2 }
        );
        assert_eq!(
            UpdateState::of(Some(&on_a1), Some(&applied_b2), Some(100)),
            UpdateState::Pending { generation: 2 }
        );
        assert_eq!(
            UpdateState::of(Some(&on_a1), Some(&applied_b2), None),
            UpdateState::RolledBack { attempted: 2 }
        );
        assert_eq!(
            UpdateState::of(
                Some(&on_a1),
                Some(&record(UpdateResult::Failed, 2, Slot::B)),
                None
            ),
            UpdateState::Failed {
                error: "part hash".into()
            }
        );
        // An older record than what runs says nothing.
        let applied_a0 = record(UpdateResult::Applied, 0, Slot::A);
        assert_eq!(
            UpdateState::of(Some(&on_b2), Some(&applied_a0), None),
            UpdateState::None
        );
    }
}

/// What a slot's boot entry on the ESP says (systemd-boot's boot counting, in the file name:
/// `cloudlet-a.conf` good, `cloudlet-a+1.conf` or `cloudlet-a+1-0.conf` on trial with tries
/// left, `cloudlet-a+0-1.conf` bad).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EntryState {
    /// Blessed: it came up healthy (or it is the factory slot).
    Good,
    /// On trial: not blessed yet, `tries_left` boots to come up healthy.
    Trying {
        /// Boots left.
        tries_left: u32,
    },
    /// Its tries are used up: systemd-boot sorts it after the other slot.
    Bad,
}

/// Entry file names start with this, then the slot's label.
pub const ENTRY_PREFIX: &str = "cloudlet-";

/// A slot entry's file name on the ESP (`loader/entries/`), parsed:
/// `cloudlet-SLOT[+LEFT[-DONE]].conf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryName {
    /// The slot it boots.
    pub slot: Slot,
    /// Tries left (`+LEFT`), when counting.
    pub left: Option<u32>,
    /// Tries used (`-DONE`), when counting.
    pub done: Option<u32>,
}

impl EntryName {
    /// Parses `cloudlet-SLOT[+LEFT[-DONE]].conf`; `None` for any other name.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let stem = file_name
            .strip_suffix(".conf")?
            .strip_prefix(ENTRY_PREFIX)?;
        let (label, counter) = match stem.split_once('+') {
            Some((l, c)) => (l, Some(c)),
            None => (stem, None),
        };
        let slot = Slot::from_label(label)?;
        let number = |s: &str| -> Option<u32> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let (left, done) = match counter {
            None => (None, None),
            Some(c) => match c.split_once('-') {
                Some((l, d)) => (Some(number(l)?), Some(number(d)?)),
                None => (Some(number(c)?), None),
            },
        };
        Some(EntryName { slot, left, done })
    }

    /// A fresh entry for `slot` with `tries` left (plain when `tries` is 0).
    pub fn counting(slot: Slot, tries: u32) -> EntryName {
        EntryName {
            slot,
            left: (tries > 0).then_some(tries),
            done: None,
        }
    }

    /// The file name.
    pub fn file_name(&self) -> String {
        let mut s = format!("{ENTRY_PREFIX}{}", self.slot.label());
        if let Some(l) = self.left {
            s.push_str(&format!("+{l}"));
            if let Some(d) = self.done {
                s.push_str(&format!("-{d}"));
            }
        }
        s.push_str(".conf");
        s
    }

    /// Good, on trial or bad.
    pub fn state(&self) -> EntryState {
        match self.left {
            None => EntryState::Good,
            Some(0) => EntryState::Bad,
            Some(left) => EntryState::Trying { tries_left: left },
        }
    }
}

/// The slot and state of an entry file name (`cloudlet-b+0-1.conf`), or None for a file
/// that is not a slot's entry.
pub fn parse_entry_name(name: &str) -> Option<(Slot, EntryState)> {
    EntryName::parse(name).map(|e| (e.slot, e.state()))
}

#[cfg(test)]
mod entry_tests {
    use super::*;

    #[test]
    fn entry_names() {
        assert_eq!(
            parse_entry_name("cloudlet-a.conf"),
            Some((Slot::A, EntryState::Good))
        );
        assert_eq!(
            parse_entry_name("cloudlet-b+1.conf"),
            Some((Slot::B, EntryState::Trying { tries_left: 1 }))
        );
        assert_eq!(
            parse_entry_name("cloudlet-b+2-1.conf"),
            Some((Slot::B, EntryState::Trying { tries_left: 2 }))
        );
        assert_eq!(
            parse_entry_name("cloudlet-b+0-1.conf"),
            Some((Slot::B, EntryState::Bad))
        );
        for other in [
            "cloudlet-c.conf",
            "debian.conf",
            "cloudlet-a+x.conf",
            "cloudlet-a+1-.conf",
            "cloudlet-a",
        ] {
            assert_eq!(parse_entry_name(other), None, "{other}");
        }
    }
}
