//! The handoff stream: a running VM moving from one appliance (the source) to the next (the
//! target) over one TCP connection.
//!
//! ```text
//! source → target   preamble (84 bytes), then frames
//!
//! preamble:  0   8   magic "CLDHANDO"
//!            8   2   version (u16 LE), currently 1
//!           10   2   reserved, 0
//!           12  32   base content id (SHA-256): the target refuses a base it does not hold
//!           44  32   session token: handed to the source by the target's agent for this one
//!                    handoff (a replayed or foreign stream does not carry it)
//!           76   8   XXH3-64 of bytes 0..76
//!
//! frame:     0   4   body length on the wire (u32 LE, ≤ MAX_BODY)
//!            4   1   kind (see `Kind`)
//!            5   1   codec of the body: 0 raw, 1 zstd
//!            6   2   reserved, 0
//!            8   4   body length once decoded (u32 LE, ≤ MAX_BODY; = wire length when raw)
//!           12   4   sequence number (u32 LE): 0 for each side's first frame, then +1
//!           16   len body
//!       16+len   8   XXH3-64 of bytes 0..16+len
//! ```
//!
//! Order of phases (source frames; the target answers on the same connection):
//!
//! ```text
//! source: preamble, Start ─────────────▶ target: Accept | Refuse (foreign base, version,
//!                                                 token, memory size)
//! source: Pages (round 0: the RAM δ against the base, while the VM runs)
//!         Pages (round 1..n: pages dirtied meanwhile), Disk (δ blocks written meanwhile)
//!         — the VM pauses —
//!         Pages (last round), Disk (tail), State, Complete ─▶ target restores and resumes
//!                                                 ◀─ Resumed | Failed
//! either side may send Abandon (source) / Failed (target) at any point: nothing is kept.
//! ```
//!
//! A `Pages` body is `u32 LE` length of the run list, the run list (postcard `Vec<PageRun>`),
//! then the data of every `Fill::Data` run, whole 4 KiB pages in run order. A `Disk` body is a
//! sequence of records `block number (u64 LE) + 4096 bytes`. A `State` body is a state file
//! (`crate::state`, kind Machine). The other bodies are postcard encodings of their struct.
//!
//! Reading checks, in order: length bounds, kind, codec, reserved bytes, checksum, sequence,
//! then decodes; nothing is trusted before its checksum matches, and parsing never panics.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::{le_u32, le_u64, PAGE_SIZE};

/// Preamble magic.
pub const MAGIC: &[u8; 8] = b"CLDHANDO";
/// Stream format version.
pub const VERSION: u16 = 1;
/// Bytes of the preamble.
pub const PREAMBLE_LEN: usize = 84;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Bytes after a frame's body.
pub const FRAME_TRAILER_LEN: usize = 8;
/// Largest body, on the wire or decoded (a batch of 1024 pages and its run list fit).
pub const MAX_BODY: u32 = 8 << 20;
/// Bytes of a disk δ block.
pub const DISK_BLOCK: usize = 4096;
/// Bytes of one `Disk` record.
pub const DISK_RECORD: usize = 8 + DISK_BLOCK;

/// Why a stream was refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Reading or writing the connection failed (link cut, peer gone, timeout).
    #[error("handoff connection I/O failed")]
    Io(#[from] std::io::Error),
    /// Not a handoff stream.
    #[error("not a handoff stream (bad magic)")]
    BadMagic,
    /// Another stream version.
    #[error("handoff stream version {0} is not supported (this build speaks version {VERSION})")]
    Version(u16),
    /// The preamble's or a frame's checksum does not match.
    #[error("handoff {0} is corrupt (checksum mismatch)")]
    Checksum(&'static str),
    /// A length field out of bounds.
    #[error("handoff frame body of {0} bytes exceeds the limit of {MAX_BODY}")]
    TooLarge(u64),
    /// A field that must be zero is not, or an unknown kind or codec.
    #[error("malformed handoff frame: {0}")]
    Malformed(&'static str),
    /// A frame out of order (replayed, dropped or reordered).
    #[error("handoff frame {found} arrived where frame {expected} was due")]
    Sequence {
        /// The sequence number due.
        expected: u32,
        /// The one received.
        found: u32,
    },
    /// The body does not decode.
    #[error("handoff {0} body does not decode")]
    Decode(&'static str, #[source] postcard::Error),
    /// The zstd body does not decompress to its stated length.
    #[error("handoff frame body does not decompress")]
    Decompress(#[source] std::io::Error),
    /// Page runs and page data disagree.
    #[error("handoff page batch is inconsistent: {0}")]
    Pages(&'static str),
}

/// The preamble's parsed form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preamble {
    /// Content id of the base both appliances hold.
    pub base_id: [u8; 32],
    /// The session token the target's agent issued.
    pub token: [u8; 32],
}

impl Preamble {
    /// The preamble's bytes.
    pub fn emit(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[12..44].copy_from_slice(&self.base_id);
        b[44..76].copy_from_slice(&self.token);
        let sum = xxh3_64(&b[..76]);
        b[76..84].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses a preamble: magic, version, reserved, checksum in that order.
    pub fn parse(b: &[u8; PREAMBLE_LEN]) -> Result<Self, HandoffError> {
        if &b[0..8] != MAGIC {
            return Err(HandoffError::BadMagic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(HandoffError::Version(version));
        }
        if b[10..12] != [0, 0] {
            return Err(HandoffError::Malformed(
                "reserved preamble bytes are not zero",
            ));
        }
        let sum = le_u64(b, 76..84);
        if sum != xxh3_64(&b[..76]) && !cfg!(fuzzing) {
            return Err(HandoffError::Checksum("preamble"));
        }
        Ok(Preamble {
            base_id: b[12..44].try_into().expect("32 bytes"),
            token: b[44..76].try_into().expect("32 bytes"),
        })
    }
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source: the VM's shape.
    Start = 1,
    /// Source: a batch of guest pages.
    Pages = 2,
    /// Source: disk δ blocks.
    Disk = 3,
    /// Source: the machine state (vCPUs, VM, devices) of the paused VM.
    State = 4,
    /// Source: everything was sent.
    Complete = 5,
    /// Source: the handoff is called off; the target discards everything.
    Abandon = 6,
    /// Target: the preamble and Start are acceptable; send the rest.
    Accept = 16,
    /// Target: refused before anything was transferred.
    Refuse = 17,
    /// Target: the VM runs here now; the source may release it.
    Resumed = 18,
    /// Target: failed after accepting; the source keeps (or resumes) the VM.
    Failed = 19,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Start,
            2 => Kind::Pages,
            3 => Kind::Disk,
            4 => Kind::State,
            5 => Kind::Complete,
            6 => Kind::Abandon,
            16 => Kind::Accept,
            17 => Kind::Refuse,
            18 => Kind::Resumed,
            19 => Kind::Failed,
            _ => return None,
        })
    }
}

/// The VM's shape, sent first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// Guest RAM, MiB (the target's base must have the same).
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Size of the VM's disk in bytes (0: no disk).
    pub disk_bytes: u64,
}

/// Where the pages of a run come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fill {
    /// Their bytes follow in the batch's data, in run order.
    Data,
    /// Zero pages.
    Zero,
    /// The base's pages at the same place (a page the VM wrote back to its base content).
    Base,
    /// The base's pages starting at this page (dedup against the base).
    BaseAt(u64),
    /// Pages already sent in this stream, starting at this page (dedup within the VM).
    Copy(u64),
}

/// `count` guest pages from `first` on, filled as `fill` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First image page.
    pub first: u64,
    /// Pages in the run (≥ 1).
    pub count: u32,
    /// Their source.
    pub fill: Fill,
}

impl PageRun {
    /// `count` pages from `first` on, filled as `fill` says.
    pub const fn new(first: u64, count: u32, fill: Fill) -> Self {
        PageRun { first, count, fill }
    }
}

/// A batch of guest pages, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pages {
    /// The runs, in order.
    pub runs: Vec<PageRun>,
    /// The data of the `Fill::Data` runs.
    pub data: Vec<u8>,
}

impl Pages {
    /// Checks runs against data and against `mem_pages` guest pages: every run in bounds and
    /// non-empty, data exactly as long as the data runs, sources in bounds.
    pub fn check(&self, mem_pages: u64) -> Result<(), HandoffError> {
        let mut data_pages = 0u64;
        for r in &self.runs {
            let end = r.first.checked_add(u64::from(r.count));
            if r.count == 0 || end.is_none_or(|e| e > mem_pages) {
                return Err(HandoffError::Pages("a run lies outside guest memory"));
            }
            match r.fill {
                Fill::Data => data_pages += u64::from(r.count),
                Fill::BaseAt(s) | Fill::Copy(s) => {
                    if s.checked_add(u64::from(r.count))
                        .is_none_or(|e| e > mem_pages)
                    {
                        return Err(HandoffError::Pages("a copy source lies outside memory"));
                    }
                }
                Fill::Zero | Fill::Base => {}
            }
        }
        if data_pages.checked_mul(PAGE_SIZE as u64) != Some(self.data.len() as u64) {
            return Err(HandoffError::Pages("the data does not match the data runs"));
        }
        Ok(())
    }

    fn emit(&self) -> Vec<u8> {
        let runs = postcard::to_stdvec(&self.runs).expect("runs always encode");
        let mut out = Vec::with_capacity(4 + runs.len() + self.data.len());
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        out.extend_from_slice(&runs);
        out.extend_from_slice(&self.data);
        out
    }

    fn parse(body: Vec<u8>) -> Result<Self, HandoffError> {
        let short = HandoffError::Pages("the run list is truncated");
        let len = body.get(..4).ok_or(short)?;
        let len = le_u32(len, 0..4) as usize;
        let runs_bytes = body
            .get(4..4usize.saturating_add(len))
            .ok_or(HandoffError::Pages("the run list is truncated"))?;
        let runs: Vec<PageRun> =
            postcard::from_bytes(runs_bytes).map_err(|e| HandoffError::Decode("page runs", e))?;
        let mut data = body;
        data.drain(..4 + len);
        Ok(Pages { runs, data })
    }
}

/// Totals of the whole stream, sent last for the target to cross-check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Complete {
    /// Page batches sent.
    pub page_batches: u64,
    /// Disk blocks sent.
    pub disk_blocks: u64,
}

/// Why the target refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseKind {
    /// It does not hold the base the stream names.
    ForeignBase,
    /// The session token is not the one it issued.
    Token,
    /// The VM does not fit the base (memory size, disk size).
    Shape,
    /// Anything else.
    Other,
}

/// A refusal or failure, with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Its class.
    pub kind: RefuseKind,
    /// What went wrong, for people.
    pub reason: String,
}

/// The target runs the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// Microseconds from `Complete` received to the vCPUs running.
    pub restore_us: u64,
}

/// A frame's parsed form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Kind::Start`].
    Start(Start),
    /// See [`Kind::Pages`].
    Pages(Pages),
    /// See [`Kind::Disk`]: `(block number, 4096 bytes)`.
    Disk(Vec<(u64, Vec<u8>)>),
    /// See [`Kind::State`]: a state file.
    State(Vec<u8>),
    /// See [`Kind::Complete`].
    Complete(Complete),
    /// See [`Kind::Abandon`]: why.
    Abandon(String),
    /// See [`Kind::Accept`].
    Accept,
    /// See [`Kind::Refuse`].
    Refuse(Refusal),
    /// See [`Kind::Resumed`].
    Resumed(Resumed),
    /// See [`Kind::Failed`].
    Failed(Refusal),
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("handoff messages always encode")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &'static str, b: &[u8]) -> Result<T, HandoffError> {
    let (v, rest) = postcard::take_from_bytes(b).map_err(|e| HandoffError::Decode(what, e))?;
    if !rest.is_empty() {
        return Err(HandoffError::Malformed("trailing bytes after a message"));
    }
    Ok(v)
}

impl Message {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Start(_) => Kind::Start,
            Message::Pages(_) => Kind::Pages,
            Message::Disk(_) => Kind::Disk,
            Message::State(_) => Kind::State,
            Message::Complete(_) => Kind::Complete,
            Message::Abandon(_) => Kind::Abandon,
            Message::Accept => Kind::Accept,
            Message::Refuse(_) => Kind::Refuse,
            Message::Resumed(_) => Kind::Resumed,
            Message::Failed(_) => Kind::Failed,
        }
    }

    /// The body's bytes, before any compression.
    pub fn body(&self) -> Vec<u8> {
        match self {
            Message::Start(s) => encode(s),
            Message::Pages(p) => p.emit(),
            Message::Disk(blocks) => {
                let mut out = Vec::with_capacity(blocks.len() * DISK_RECORD);
                for (n, data) in blocks {
                    out.extend_from_slice(&n.to_le_bytes());
                    out.extend_from_slice(data);
                }
                out
            }
            Message::State(s) => s.clone(),
            Message::Complete(c) => encode(c),
            Message::Abandon(r) => encode(r),
            Message::Accept => Vec::new(),
            Message::Refuse(r) | Message::Failed(r) => encode(r),
            Message::Resumed(r) => encode(r),
        }
    }

    /// Parses a decoded body of kind `kind`.
    pub fn parse(kind: Kind, body: Vec<u8>) -> Result<Self, HandoffError> {
        Ok(match kind {
            Kind::Start => Message::Start(decode("start", &body)?),
            Kind::Pages => Message::Pages(Pages::parse(body)?),
            Kind::Disk => {
                if body.len() % DISK_RECORD != 0 {
                    return Err(HandoffError::Malformed("a disk record is truncated"));
                }
                Message::Disk(
                    body.chunks_exact(DISK_RECORD)
                        .map(|r| {
                            let n = le_u64(r, 0..8);
                            (n, r[8..].to_vec())
                        })
                        .collect(),
                )
            }
            Kind::State => Message::State(body),
            Kind::Complete => Message::Complete(decode("complete", &body)?),
            Kind::Abandon => Message::Abandon(decode("abandon", &body)?),
            Kind::Accept if body.is_empty() => Message::Accept,
            Kind::Accept => return Err(HandoffError::Malformed("an accept with a body")),
            Kind::Refuse => Message::Refuse(decode("refusal", &body)?),
            Kind::Resumed => Message::Resumed(decode("resumed", &body)?),
            Kind::Failed => Message::Failed(decode("failure", &body)?),
        })
    }
}

/// Body codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// As is.
    Raw,
    /// zstd at this level (the level is the sender's choice; it is not on the wire).
    Zstd(i32),
}

/// A frame's header fields, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What it carries.
    pub kind: Kind,
    /// Body bytes on the wire.
    pub wire_len: u32,
    /// Body bytes once decoded.
    pub raw_len: u32,
    /// True when the body is zstd.
    pub zstd: bool,
    /// Sequence number.
    pub seq: u32,
}

impl FrameHeader {
    /// Checks the header's bytes: lengths, kind, codec, reserved bytes.
    pub fn parse(h: &[u8; FRAME_HEADER_LEN]) -> Result<Self, HandoffError> {
        let u32_at = |o: usize| le_u32(h, o..o + 4);
        let (wire_len, raw_len) = (u32_at(0), u32_at(8));
        if wire_len > MAX_BODY {
            return Err(HandoffError::TooLarge(wire_len.into()));
        }
        if raw_len > MAX_BODY {
            return Err(HandoffError::TooLarge(raw_len.into()));
        }
        let kind = Kind::from_u8(h[4]).ok_or(HandoffError::Malformed("unknown frame kind"))?;
        let zstd = match h[5] {
            0 if raw_len == wire_len => false,
            0 => return Err(HandoffError::Malformed("a raw body with two lengths")),
            1 => true,
            _ => return Err(HandoffError::Malformed("unknown body codec")),
        };
        if h[6..8] != [0, 0] {
            return Err(HandoffError::Malformed("reserved frame bytes are not zero"));
        }
        Ok(FrameHeader {
            kind,
            wire_len,
            raw_len,
            zstd,
            seq: u32_at(12),
        })
    }
}

/// Encodes `msg` as frame number `seq`, its body compressed as `codec` says (kept raw when
/// compression does not make it smaller).
pub fn encode_frame(seq: u32, msg: &Message, codec: Codec) -> Result<Vec<u8>, HandoffError> {
    let body = msg.body();
    if body.len() > MAX_BODY as usize {
        return Err(HandoffError::TooLarge(body.len() as u64));
    }
    let packed = match codec {
        Codec::Zstd(level) if !body.is_empty() => {
            Some(zstd::bulk::compress(&body, level).map_err(HandoffError::Io)?)
        }
        _ => None,
    }
    .filter(|z| z.len() < body.len());
    let (wire, zstd) = match &packed {
        Some(z) => (z.as_slice(), true),
        None => (body.as_slice(), false),
    };
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + wire.len() + FRAME_TRAILER_LEN);
    out.extend_from_slice(&(wire.len() as u32).to_le_bytes());
    out.push(msg.kind() as u8);
    out.push(u8::from(zstd));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(wire);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Decodes one whole frame (header, body, checksum) that must be number `seq`.
pub fn decode_frame(frame: &[u8], seq: u32) -> Result<Message, HandoffError> {
    let header: &[u8; FRAME_HEADER_LEN] = frame
        .get(..FRAME_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(HandoffError::Malformed("a frame is truncated"))?;
    let h = FrameHeader::parse(header)?;
    let end = FRAME_HEADER_LEN + h.wire_len as usize;
    if frame.len() != end + FRAME_TRAILER_LEN {
        return Err(HandoffError::Malformed(
            "a frame's length disagrees with its header",
        ));
    }
    let sum = le_u64(frame, end..end + 8);
    if sum != xxh3_64(&frame[..end]) && !cfg!(fuzzing) {
        return Err(HandoffError::Checksum("frame"));
    }
    if h.seq != seq {
        return Err(HandoffError::Sequence {
            expected: seq,
            found: h.seq,
        });
    }
    let wire = &frame[FRAME_HEADER_LEN..end];
    let body = if h.zstd {
        let raw =
            zstd::bulk::decompress(wire, h.raw_len as usize).map_err(HandoffError::Decompress)?;
        if raw.len() != h.raw_len as usize {
            return Err(HandoffError::Malformed(
                "a body decompressed to another length",
            ));
        }
        raw
    } else {
        wire.to_vec()
    };
    Message::parse(h.kind, body)
}

/// Reads frames in order from one direction of a connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    next_seq: u32,
    /// Wire bytes read so far (headers included).
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// A reader whose first frame must be number 0.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            next_seq: 0,
            bytes: 0,
        }
    }

    /// Reads and checks the preamble (source side's first bytes).
    pub fn read_preamble(&mut self) -> Result<Preamble, HandoffError> {
        let mut b = [0u8; PREAMBLE_LEN];
        self.inner.read_exact(&mut b)?;
        self.bytes += PREAMBLE_LEN as u64;
        Preamble::parse(&b)
    }

    /// Reads the next frame.
    pub fn read(&mut self) -> Result<Message, HandoffError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.inner.read_exact(&mut header)?;
        let h = FrameHeader::parse(&header)?;
        let mut frame = vec![0u8; FRAME_HEADER_LEN + h.wire_len as usize + FRAME_TRAILER_LEN];
        frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
        self.inner.read_exact(&mut frame[FRAME_HEADER_LEN..])?;
        self.bytes += frame.len() as u64;
        let msg = decode_frame(&frame, self.next_seq)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(msg)
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Writes frames in order to one direction of a connection.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    next_seq: u32,
    /// Wire bytes written so far (headers included).
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// A writer whose first frame is number 0.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            next_seq: 0,
            bytes: 0,
        }
    }

    /// Writes the preamble.
    pub fn write_preamble(&mut self, p: &Preamble) -> Result<(), HandoffError> {
        self.inner.write_all(&p.emit())?;
        self.bytes += PREAMBLE_LEN as u64;
        Ok(())
    }

    /// Encodes and writes `msg`.
    pub fn write(&mut self, msg: &Message, codec: Codec) -> Result<(), HandoffError> {
        let frame = encode_frame(self.next_seq, msg, codec)?;
        self.write_encoded(&frame)
    }

    /// Writes a frame encoded by [`encode_frame`] with this writer's next sequence number
    /// (see [`FrameWriter::next_seq`]): lets compression run on another thread.
    pub fn write_encoded(&mut self, frame: &[u8]) -> Result<(), HandoffError> {
        self.inner.write_all(frame)?;
        self.inner.flush()?;
        self.bytes += frame.len() as u64;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(())
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preamble() -> Preamble {
        Preamble {
            base_id: [0xab; 32],
            token: [0x5a; 32],
        }
    }

    #[test]
    fn golden_preamble() {
        let b = preamble().emit();
        assert_eq!(&b[..12], b"CLDHANDO\x01\x00\x00\x00");
        assert_eq!(b[12..44], [0xab; 32]);
        assert_eq!(b[44..76], [0x5a; 32]);
        assert_eq!(b[76..], xxh3_64(&b[..76]).to_le_bytes());
        assert_eq!(Preamble::parse(&b).unwrap(), preamble());
        let mut bad = b;
        bad[8] = 2;
        assert!(matches!(
            Preamble::parse(&bad),
            Err(HandoffError::Version(2))
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(Preamble::parse(&bad), Err(HandoffError::BadMagic)));
        let mut bad = b;
        bad[50] ^= 1;
        assert!(matches!(
            Preamble::parse(&bad),
            Err(HandoffError::Checksum(_))
        ));
    }

    #[test]
    fn golden_frame() {
        let f = encode_frame(7, &Message::Accept, Codec::Raw).unwrap();
        let mut want = vec![0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0];
        let sum = xxh3_64(&want);
        want.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(f, want);
        let start = Message::Start(Start {
            mem_mib: 256,
            vcpus: 1,
            disk_bytes: 0,
        });
        let f = encode_frame(0, &start, Codec::Raw).unwrap();
        // postcard varints: 256 → [0x80, 0x02], 1, 0.
        assert_eq!(
            &f[..20],
            &[4, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0x80, 2, 1, 0]
        );
        assert_eq!(decode_frame(&f, 0).unwrap(), start);
    }

    fn sample_messages() -> Vec<Message> {
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        data[5] = 9;
        data[PAGE_SIZE * 2 + 17] = 1;
        vec![
            Message::Start(Start {
                mem_mib: 64,
                vcpus: 2,
                disk_bytes: 1 << 20,
            }),
            Message::Pages(Pages {
                runs: vec![
                    PageRun::new(3, 2, Fill::Data),
                    PageRun::new(10, 5, Fill::Zero),
                    PageRun::new(20, 1, Fill::Data),
                    PageRun::new(30, 2, Fill::Copy(3)),
                    PageRun::new(40, 1, Fill::BaseAt(0)),
                    PageRun::new(41, 1, Fill::Base),
                ],
                data,
            }),
            Message::Disk(vec![(3, vec![7u8; DISK_BLOCK]), (9, vec![0u8; DISK_BLOCK])]),
            Message::State(b"CLDSTATE...".to_vec()),
            Message::Complete(Complete {
                page_batches: 4,
                disk_blocks: 2,
            }),
            Message::Abandon("link too slow".into()),
            Message::Accept,
            Message::Refuse(Refusal {
                kind: RefuseKind::ForeignBase,
                reason: "no such base".into(),
            }),
            Message::Resumed(Resumed { restore_us: 812 }),
            Message::Failed(Refusal {
                kind: RefuseKind::Other,
                reason: "restore failed".into(),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips_raw_and_compressed() {
        for codec in [Codec::Raw, Codec::Zstd(1)] {
            let mut wire = Vec::new();
            let mut w = FrameWriter::new(&mut wire);
            w.write_preamble(&preamble()).unwrap();
            for m in sample_messages() {
                w.write(&m, codec).unwrap();
            }
            let written = w.bytes;
            let mut r = FrameReader::new(wire.as_slice());
            assert_eq!(r.read_preamble().unwrap(), preamble());
            for m in sample_messages() {
                assert_eq!(r.read().unwrap(), m);
            }
            assert_eq!(r.bytes, written);
            assert!(matches!(r.read(), Err(HandoffError::Io(_))));
        }
    }

    #[test]
    fn pages_are_checked_against_memory_and_data() {
        let Message::Pages(p) = &sample_messages()[1] else {
            unreachable!()
        };
        p.check(64).unwrap();
        assert!(p.check(41).is_err(), "run past the end");
        let mut short = p.clone();
        short.data.pop();
        assert!(short.check(64).is_err());
        let mut empty = p.clone();
        empty.runs[1].count = 0;
        assert!(empty.check(64).is_err());
        let mut far = p.clone();
        far.runs[3].fill = Fill::Copy(u64::MAX);
        assert!(far.check(64).is_err());
    }

    #[test]
    fn damaged_replayed_and_reordered_frames_are_refused() {
        let a = encode_frame(0, &Message::Accept, Codec::Raw).unwrap();
        let b = encode_frame(1, &sample_messages()[0], Codec::Raw).unwrap();
        // Replay: frame 0 twice.
        let replayed = [a.clone(), a.clone()].concat();
        let mut r = FrameReader::new(replayed.as_slice());
        r.read().unwrap();
        assert!(matches!(
            r.read(),
            Err(HandoffError::Sequence {
                expected: 1,
                found: 0
            })
        ));
        // Reorder: frame 1 first.
        let mut r = FrameReader::new(b.as_slice());
        assert!(matches!(r.read(), Err(HandoffError::Sequence { .. })));
        // Every single-bit flip and every truncation is an error, never a panic.
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(decode_frame(&bad, 1).is_err(), "flip at {i} accepted");
            assert!(
                decode_frame(&b[..i], 1).is_err(),
                "truncation at {i} accepted"
            );
        }
        // A length beyond the limit is refused before anything is allocated.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&(MAX_BODY + 1).to_le_bytes());
        let mut r = FrameReader::new(huge.as_slice());
        assert!(matches!(r.read(), Err(HandoffError::TooLarge(_))));
    }
}
