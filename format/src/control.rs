//! The control socket of a running `vmm` (`vmm run --api-sock PATH`): a Unix stream socket,
//! one request and one response per connection.
//!
//! ```text
//! frame:  u32 LE  length of what follows (≤ 64 KiB)
//!         u16 LE  protocol version (1)
//!         …       postcard encoding of an ApiRequest (client → vmm) or ApiResponse (back)
//! ```
//!
//! A frame with another version is answered with `ApiResponse::Error` naming both versions;
//! a malformed or oversized frame closes the connection without affecting the VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Protocol version carried in every frame.
pub const API_VERSION: u16 = 1;
/// Largest frame accepted.
pub const MAX_FRAME: u32 = 64 * 1024;
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
}

/// Errors on the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Socket I/O failed.
    #[error("control socket I/O failed")]
    Io(#[from] std::io::Error),
    /// A frame was malformed.
    #[error("malformed control message: {0}")]
    Frame(String),
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ApiError> {
    let body = postcard::to_stdvec(msg).map_err(|e| ApiError::Frame(e.to_string()))?;
    let len = u32::try_from(body.len() + 2).map_err(|_| ApiError::Frame("too large".into()))?;
    let mut frame = Vec::with_capacity(body.len() + 6);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&API_VERSION.to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    Ok(())
}

/// Reads one frame: `Ok(Err(version))` when it carries another protocol version.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> Result<Result<T, u16>, ApiError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(ApiError::Frame(format!("frame length {len} out of range")));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    let version = u16::from_le_bytes([buf[0], buf[1]]);
    if version != API_VERSION {
        return Ok(Err(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes(&buf[2..]).map_err(|e| ApiError::Frame(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ApiError::Frame("trailing bytes".into()));
    }
    Ok(Ok(msg))
}

/// Sends `req` to the VMM listening on `socket` and returns its answer.
pub fn request(socket: &Path, req: &ApiRequest) -> Result<ApiResponse, ApiError> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write_frame(&mut s, req)?;
    match read_frame(&mut s)? {
        Ok(r) => Ok(r),
        Err(v) => Err(ApiError::Frame(format!(
            "the vmm answered with protocol version {v}"
        ))),
    }
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
        }
    }
}
