//! The TCP protocol: length-prefixed frames over one connection.
//!
//! A frame is a `u32` little-endian length followed by that many bytes of UTF-8 text. The
//! client sends request frames whose text is one request of the serial protocol (without the
//! `\n`: `primes 1000`, `get 7`, …, see [`crate::request`]); the guest answers each with one
//! reply frame whose text is the reply line (without the `\n`: `ok primes N=1000 count=168
//! us=12`). Requests on one connection are answered in order; several connections are served
//! side by side. A request longer than [`MAX_REQUEST`] bytes is answered with
//! [`TOO_LONG_REPLY`] and the guest then closes the connection (it does not read the rest).
//!
//! Everything here is `no_std`, so the guest and the host share it: the host's blocking
//! client (`client`, with the `std` feature) frames its requests and reads replies with it.

/// Bytes of the length prefix.
pub const HEADER: usize = 4;
/// Longest request text the guest accepts (as for a serial line).
pub const MAX_REQUEST: usize = 1024;
/// Longest reply text the guest sends.
pub const MAX_REPLY: usize = MAX_REQUEST + 64;
/// The reply to a request longer than [`MAX_REQUEST`].
pub const TOO_LONG_REPLY: &[u8] = b"err request too long (at most 1024 bytes)";

/// The length prefix of a frame carrying `len` bytes.
pub fn header(len: usize) -> [u8; HEADER] {
    (len as u32).to_le_bytes()
}

/// The payload length a frame header announces, or `Err(length)` when it exceeds `max`.
pub fn payload_len(header: [u8; HEADER], max: usize) -> Result<usize, u64> {
    let len = u64::from(u32::from_le_bytes(header));
    if len > max as u64 {
        Err(len)
    } else {
        Ok(len as usize)
    }
}

/// Writes the frame of `payload` into `out`; returns the frame's length, or `None` when `out`
/// is too small or the payload does not fit a `u32` length.
pub fn encode(payload: &[u8], out: &mut [u8]) -> Option<usize> {
    let total = payload.len().checked_add(HEADER)?;
    if u32::try_from(payload.len()).is_err() || out.len() < total {
        return None;
    }
    out[..HEADER].copy_from_slice(&header(payload.len()));
    out[HEADER..total].copy_from_slice(payload);
    Some(total)
}

/// What the start of a byte stream holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole frame yet: at least this many bytes in all are needed.
    Incomplete(usize),
    /// A whole frame: its payload is `buf[HEADER..HEADER + len]`; it takes `HEADER + len`
    /// bytes of the stream.
    Frame(usize),
    /// The length prefix announces more than the limit given to [`decode`].
    TooLong(u64),
}

/// Looks at the start of `buf` for a frame whose payload is at most `max` bytes.
pub fn decode(buf: &[u8], max: usize) -> Decoded {
    let Some(prefix) = buf.get(..HEADER) else {
        return Decoded::Incomplete(HEADER);
    };
    let len = match payload_len([prefix[0], prefix[1], prefix[2], prefix[3]], max) {
        Ok(len) => len,
        Err(len) => return Decoded::TooLong(len),
    };
    if buf.len() < HEADER + len {
        Decoded::Incomplete(HEADER + len)
    } else {
        Decoded::Frame(len)
    }
}

/// The payload of the frame at the start of `buf`, and the bytes the frame takes; `None`
/// when `buf` does not start with a whole frame of at most `max` payload bytes.
pub fn payload(buf: &[u8], max: usize) -> Option<(&[u8], usize)> {
    match decode(buf, max) {
        Decoded::Frame(len) => Some((&buf[HEADER..HEADER + len], HEADER + len)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_round_trip() {
        let mut out = [0u8; 32];
        let n = encode(b"primes 1000", &mut out).unwrap();
        assert_eq!(n, 15);
        assert_eq!(&out[..4], &[11, 0, 0, 0]);
        assert_eq!(decode(&out[..n], MAX_REQUEST), Decoded::Frame(11));
        assert_eq!(
            payload(&out[..n], MAX_REQUEST),
            Some((&b"primes 1000"[..], 15))
        );
        // Two frames back to back: the first is found, its size says where the next starts.
        let mut two = Vec::new();
        two.extend_from_slice(&out[..n]);
        let m = encode(b"stats", &mut out).unwrap();
        two.extend_from_slice(&out[..m]);
        let (p, used) = payload(&two, MAX_REQUEST).unwrap();
        assert_eq!(p, b"primes 1000");
        assert_eq!(payload(&two[used..], MAX_REQUEST), Some((&b"stats"[..], 9)));
        // Empty payloads are frames too.
        assert_eq!(encode(b"", &mut out), Some(4));
        assert_eq!(decode(&[0, 0, 0, 0], 0), Decoded::Frame(0));
    }

    #[test]
    fn incomplete_too_long_and_small_buffers() {
        assert_eq!(decode(b"", 10), Decoded::Incomplete(4));
        assert_eq!(decode(&[5, 0], 10), Decoded::Incomplete(4));
        assert_eq!(decode(&[5, 0, 0, 0, b'a'], 10), Decoded::Incomplete(9));
        assert_eq!(decode(&[11, 0, 0, 0], 10), Decoded::TooLong(11));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], MAX_REQUEST),
            Decoded::TooLong(u64::from(u32::MAX))
        );
        assert_eq!(payload(&[5, 0, 0, 0, b'a'], 10), None);
        let mut small = [0u8; 6];
        assert_eq!(encode(b"abc", &mut small), None);
        assert_eq!(header(0x0102_0304), [4, 3, 2, 1]);
        assert_eq!(payload_len([4, 1, 0, 0], MAX_REQUEST), Ok(260));
        assert_eq!(payload_len([1, 4, 0, 0], MAX_REQUEST), Err(1025));
        assert!(TOO_LONG_REPLY.len() <= MAX_REPLY);
    }
}
