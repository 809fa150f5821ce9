//! The frames a vmm speaks with its supervisor and operators, on two channels:
//!
//! - the control socket (`vmm run --api-sock PATH`): a Unix stream socket, one request
//!   ([`ApiRequest`], client → vmm) and one answer ([`ApiResponse`]) per connection;
//! - the report channel (`--report-fd N`): a stream the supervisor hands the vmm at spawn
//!   (one end of a socket pair). The vmm writes a [`Report`] on it — [`Ready`] once the VM
//!   runs and its control socket and port forwards listen, or [`Failed`] with why it could not
//!   start; after `Ready`, `Exited` as soon as the VM has stopped — and keeps it open until the
//!   process exits, so the supervisor sees the exit as end of file.
//!
//! Every message travels in the same frame:
//!
//! ```text
//!  0          4          6                              4 + len
//!  +----------+----------+------------------------------+
//!  | len      | version  | body                         |
//!  | u32 LE   | u16 LE   | postcard encoding of the     |
//!  |          |          | message                      |
//!  +----------+----------+------------------------------+
//!  len:     bytes after the length field (2 + body), 2 ..= MAX_FRAME
//!  version: PROTOCOL_VERSION (1); no checksum: both channels are local streams
//! ```
//!
//! Version 1: the control requests and answers below, and the reports. A frame with another
//! version is answered with `ApiResponse::Error` naming both versions; a malformed or
//! oversized frame closes the connection without affecting the VM.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Protocol version carried in every frame.
pub const API_VERSION: u16 = 1;
/// Largest frame accepted (the value of its length field).
pub const MAX_FRAME: u32 = 64 * 1024;
/// Bytes before the body: length and version.
pub const HEADER_LEN: usize = 6;
/// How long either side waits for the other.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Is it running or paused?
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Write a snapshot into `dir`; afterwards resume (`resume`) or stay paused.
    Snapshot {
        /// Snapshot directory (created if needed).
        dir: String,
        /// Resume after the snapshot.
        resume: bool,
    },
    /// Stop the VM; `vmm` exits with status 0.
    Stop,
    /// Hand the running VM to the `vmm receive` listening at `to` (see `format::handoff`),
    /// within a pause of about `downtime_ms`. Answered when the handoff has ended:
    /// [`ApiResponse::HandedOff`] (the VM runs on the target; this vmm then exits with status
    /// 0) or [`ApiResponse::Error`] (the VM still runs here, with all its state). Progress is
    /// reported on the report channel ([`Report::Handoff`]).
    Handoff {
        /// The target vmm's listening address ("IP:PORT").
        to: String,
        /// The session token the target's agent issued for this handoff.
        token: [u8; 32],
        /// The pause the source aims for, milliseconds.
        downtime_ms: u32,
    },
}

/// What the VMM answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiResponse {
    /// Done.
    Ok,
    /// Current state.
    Status {
        /// True while the vCPUs are paused.
        paused: bool,
        /// Number of vCPUs.
        vcpus: u32,
        /// Guest RAM in MiB.
        mem_mib: u64,
    },
    /// Snapshot written.
    Snapshot {
        /// Bytes of the state file.
        state_bytes: u64,
        /// Non-zero bytes of RAM written.
        memory_bytes_written: u64,
        /// Microseconds the vCPUs were paused for it.
        paused_us: u64,
    },
    /// The request failed; the message says why.
    Error(String),
    /// The VM now runs on the handoff's target.
    HandedOff(HandoffStats),
}

/// What a handoff cost, as the source measured it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffStats {
    /// Rounds of pages sent (round 0 is the δ against the base).
    pub rounds: u32,
    /// Bytes on the wire, both directions, preamble and frame headers included.
    pub bytes: u64,
    /// Guest pages sent (data, zero and base references).
    pub pages: u64,
    /// Disk δ blocks sent.
    pub disk_blocks: u64,
    /// Microseconds from the source's pause to the target's `Resumed`.
    pub downtime_us: u64,
    /// Microseconds from the request to the target's `Resumed`.
    pub total_us: u64,
    /// Microseconds the target took from `Complete` to running vCPUs.
    pub target_restore_us: u64,
}

/// Where a handoff is, as the source reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoffPhase {
    /// Connecting and being accepted.
    Connecting,
    /// Sending the δ against the base while the VM runs.
    Delta,
    /// Sending the pages dirtied meanwhile, round after round.
    Rounds,
    /// The VM is paused; the last pages, disk blocks and the machine state go out.
    Paused,
    /// The target runs the VM.
    Done,
    /// The handoff failed; the VM runs here.
    Failed,
}

/// A handoff's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffProgress {
    /// The phase entered.
    pub phase: HandoffPhase,
    /// The round (0: the δ).
    pub round: u32,
    /// Bytes on the wire so far.
    pub bytes: u64,
    /// Pages dirtied during the last round.
    pub dirty_pages: u64,
    /// Link bandwidth measured so far, bytes per second (0 until known).
    pub bandwidth_bps: u64,
}

/// What a vmm writes on its report channel: first [`Report::Ready`] or [`Report::Failed`];
/// after `Ready`, [`Report::Exited`] once the VM has stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Report {
    /// The VM runs; its control socket and port forwards listen.
    Ready(Ready),
    /// The VM could not be started; the vmm exits with status 1.
    Failed(Failed),
    /// The VM has stopped: its vCPUs are gone and its host ports (forwards) closed. The vmm
    /// exits with `code` once it has released the rest, and the channel then reaches end of
    /// file.
    Exited {
        /// The exit status the vmm will have.
        code: i32,
    },
    /// `vmm receive` listens for a handoff at this address.
    Listening {
        /// The bound address (port 0 resolved).
        addr: SocketAddr,
    },
    /// A handoff from this vmm (the source) progressed.
    Handoff(HandoffProgress),
}

/// A vmm that is up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    /// Where the time of a synthesis went (`vmm synthesize` only).
    pub synthesis: Option<SynthesisTimes>,
    /// The port forwards, with the host address actually bound (port 0 resolved).
    pub forwards: Vec<BoundForward>,
}

/// Where a synthesis spent its time, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthesisTimes {
    /// From the vmm's start of work to running vCPUs.
    pub total_us: u64,
    /// Checking the base, overlay and machine state.
    pub check_us: u64,
    /// Verifying the overlay's chunks.
    pub verify_us: u64,
    /// The overlay had been verified before (a cache hit).
    pub verified_before: bool,
    /// Mapping the base's memory.
    pub map_us: u64,
    /// Applying the overlay, or starting its lazy fill.
    pub apply_us: u64,
    /// The overlay is filled on first touch.
    pub lazy: bool,
    /// The service's shared RAM image was mapped (`format::ram_image`): nothing was applied.
    pub shared: bool,
    /// Overlay chunks.
    pub chunks: u64,
    /// Overlay data, bytes.
    pub data_bytes: u64,
    /// Restoring the machine state and starting the vCPUs.
    pub restore_us: u64,
}

impl SynthesisTimes {
    /// The total, in milliseconds.
    pub fn total_ms(&self) -> f64 {
        self.total_us as f64 / 1e3
    }
}

/// A host → guest TCP port forward as bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundForward {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The guest's TCP port.
    pub guest_port: u16,
}

/// A vmm that could not start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// What a supervisor can act on.
    pub kind: FailureKind,
    /// The error and its causes, outermost first.
    pub chain: Vec<String>,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.chain.join(": "))
    }
}

/// The class of a start failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// A port forward's host address is taken by another socket.
    AddressInUse,
    /// A port forward's host address is not one of this host's.
    AddressNotAvailable,
    /// A file (base, overlay, kernel, KVM device) does not exist.
    NotFound,
    /// Not allowed (KVM device, TAP device, files).
    PermissionDenied,
    /// Anything else (bad images, KVM errors …).
    Other,
}

impl FailureKind {
    /// The kind of an I/O error, when it is one a supervisor acts on.
    pub fn of_io(e: &std::io::Error) -> Option<FailureKind> {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::AddrInUse => Some(FailureKind::AddressInUse),
            K::AddrNotAvailable => Some(FailureKind::AddressNotAvailable),
            K::NotFound => Some(FailureKind::NotFound),
            K::PermissionDenied => Some(FailureKind::PermissionDenied),
            _ => None,
        }
    }
}

/// Errors on the control socket and the report channel.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Socket I/O failed.
    #[error("control socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The length field is out of range.
    #[error("frame length {0} is out of range (2 ..= {MAX_FRAME})")]
    Length(u32),
    /// Fewer bytes than the length field announces.
    #[error("frame truncated: {have} of {want} bytes")]
    Truncated {
        /// Bytes there.
        have: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// The body does not decode as the message expected.
    #[error("malformed control message")]
    Decode(#[source] postcard::Error),
    /// The body has bytes after the message.
    #[error("malformed control message: trailing bytes")]
    Trailing,
    /// A message does not encode.
    #[error("cannot encode a control message")]
    Encode(#[source] postcard::Error),
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {0}; this side speaks {API_VERSION}")]
    Version(u16),
}

/// A checked view of one frame's bytes (smoltcp style: [`Frame::new_checked`] validates the
/// length once; the accessors then never panic).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    bytes: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Views `bytes` (the whole frame, length field included) after checking that the length
    /// is in range and every byte it announces is there. Extra bytes after it are ignored.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Frame<'a>, ApiError> {
        let want = Self::total_len(bytes.get(..4).and_then(|b| b.try_into().ok()).ok_or(
            ApiError::Truncated {
                have: bytes.len(),
                want: 4,
            },
        )?)?;
        if bytes.len() < want {
            return Err(ApiError::Truncated {
                have: bytes.len(),
                want,
            });
        }
        Ok(Frame {
            bytes: &bytes[..want],
        })
    }

    /// The length of a whole frame whose first four bytes are `len_field`.
    pub fn total_len(len_field: [u8; 4]) -> Result<usize, ApiError> {
        let len = u32::from_le_bytes(len_field);
        if !(2..=MAX_FRAME).contains(&len) {
            return Err(ApiError::Length(len));
        }
        Ok(4 + len as usize)
    }

    /// The protocol version.
    pub fn version(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }

    /// The encoded message.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The message, when the frame carries this protocol version: `Ok(Err(version))` when it
    /// carries another.
    pub fn message<T: for<'de> Deserialize<'de>>(&self) -> Result<Result<T, u16>, ApiError> {
        if self.version() != API_VERSION {
            return Ok(Err(self.version()));
        }
        let (msg, rest) = postcard::take_from_bytes(self.body()).map_err(ApiError::Decode)?;
        if !rest.is_empty() {
            return Err(ApiError::Trailing);
        }
        Ok(Ok(msg))
    }
}

/// One message as a whole frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ApiError> {
    let mut frame = vec![0u8; HEADER_LEN];
    frame[4..6].copy_from_slice(&API_VERSION.to_le_bytes());
    let mut frame = postcard::to_extend(msg, frame).map_err(ApiError::Encode)?;
    let len = u32::try_from(frame.len() - 4)
        .ok()
        .filter(|l| *l <= MAX_FRAME)
        .ok_or(ApiError::Length(u32::MAX))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ApiError> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Reads one frame: `Ok(Err(version))` when it carries another protocol version.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Result<T, u16>, ApiError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let total = Frame::total_len(len)?;
    let mut buf = vec![0u8; total];
    buf[..4].copy_from_slice(&len);
    r.read_exact(&mut buf[4..])?;
    Frame::new_checked(&buf)?.message()
}

/// Sends `req` to the VMM listening on `socket` and returns its answer.
pub fn request(socket: &Path, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write_frame(&mut s, req)?;
    read_frame(&mut s)?.map_err(ApiError::Version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frame_and_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ApiRequest::Pause).unwrap();
        // length 3 = version (2) + postcard variant index 1.
        assert_eq!(buf, [3, 0, 0, 0, 1, 0, 1]);
        let back: ApiRequest = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(back, ApiRequest::Pause);
        let snap = ApiRequest::Snapshot {
            dir: "/tmp/s".into(),
            resume: true,
        };
        buf.clear();
        write_frame(&mut buf, &snap).unwrap();
        assert_eq!(
            read_frame::<ApiRequest>(&mut buf.as_slice())
                .unwrap()
                .unwrap(),
            snap
        );
    }

    #[test]
    fn golden_report() {
        let ready = Report::Ready(Ready {
            synthesis: Some(SynthesisTimes {
                total_us: 2500,
                check_us: 100,
                verify_us: 0,
                verified_before: true,
                map_us: 200,
                apply_us: 300,
                lazy: true,
                shared: false,
                chunks: 4,
                data_bytes: 65536,
                restore_us: 900,
            }),
            forwards: vec![BoundForward {
                host: "127.0.0.1:40000".parse().unwrap(),
                guest_port: 80,
            }],
        });
        let frame = encode(&ready).unwrap();
        #[rustfmt::skip]
        let golden = [
            31, 0, 0, 0, 1, 0,            // length 31, version 1
            0,                            // Report::Ready
            1,                            // Some(SynthesisTimes)
            0xc4, 0x13,                   // total_us 2500 (varint)
            100, 0, 1,                    // check_us, verify_us, verified_before
            0xc8, 0x01,                   // map_us 200
            0xac, 0x02, 1, 0,             // apply_us 300, lazy, shared
            4, 0x80, 0x80, 0x04,          // chunks, data_bytes 65536
            0x84, 0x07,                   // restore_us 900
            1,                            // one forward
            0, 127, 0, 0, 1,              // SocketAddr::V4, its octets
            0xc0, 0xb8, 0x02,             // port 40000
            80,                           // guest_port
        ];
        assert_eq!(frame, golden, "{frame:?}");
        let back = Frame::new_checked(&frame)
            .unwrap()
            .message::<Report>()
            .unwrap();
        assert_eq!(back, Ok(ready));

        let failed = Report::Failed(Failed {
            kind: FailureKind::AddressInUse,
            chain: vec!["a".into(), "b".into()],
        });
        let frame = encode(&failed).unwrap();
        assert_eq!(frame, [9, 0, 0, 0, 1, 0, 1, 0, 2, 1, b'a', 1, b'b']);
        assert_eq!(
            Frame::new_checked(&frame)
                .unwrap()
                .message::<Report>()
                .unwrap(),
            Ok(failed)
        );
        // Exited { code: -1 }: variant 2, zigzag varint 1.
        assert_eq!(
            encode(&Report::Exited { code: -1 }).unwrap(),
            [4, 0, 0, 0, 1, 0, 2, 1]
        );
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let other_version = [3u8, 0, 0, 0, 9, 0, 1];
        assert_eq!(
            read_frame::<ApiRequest>(&mut &other_version[..]).unwrap(),
            Err(9)
        );
        for bad in [
            &[0xff, 0xff, 0xff, 0xff][..], // oversized
            &[1, 0, 0, 0, 1][..],          // shorter than a version
            &[3, 0, 0, 0, 1, 0][..],       // truncated
            &[3, 0, 0, 0, 1, 0, 77][..],   // unknown variant
            &[4, 0, 0, 0, 1, 0, 1, 0][..], // trailing byte
        ] {
            let r = read_frame::<ApiRequest>(&mut &bad[..]);
            assert!(!matches!(r, Ok(Ok(_))), "{bad:?} gave {r:?}");
            let v = Frame::new_checked(bad).and_then(|f| f.message::<Report>());
            assert!(!matches!(v, Ok(Ok(_))), "{bad:?} gave {v:?}");
        }
        for short in [&[][..], &[3, 0][..]] {
            assert!(Frame::new_checked(short).is_err());
        }
    }
}
