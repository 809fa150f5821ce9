//! The micro guest's TCP protocol, as a client (docs/micro-guest.md,
//! rootfs/service/src/frame.rs): each request and each reply is a `u32` little-endian length
//! followed by that many bytes of UTF-8 text, the serial console's request (`health`,
//! `query 5`, `get 7`, …) and reply line (`ok health`), without the newline.
//!
//! Also the two reference values a client can check answers against, computed here
//! independently of the guest: [`model_entry`] (`query I`) and [`table_value`] (`get I` on a
//! table disk written by [`table_image`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest reply accepted (the guest's limit is 1088 bytes).
pub const MAX_REPLY: usize = 4096;

/// One request frame.
pub fn encode(request: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + request.len());
    v.extend_from_slice(&(request.len() as u32).to_le_bytes());
    v.extend_from_slice(request.as_bytes());
    v
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A blocking connection to a guest's service.
pub struct GuestConn {
    s: TcpStream,
}

impl GuestConn {
    /// Connects to `addr` ("IP:PORT").
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<GuestConn> {
        let sa: SocketAddr = addr
            .parse()
            .map_err(|_| bad(format!("'{addr}' is not IP:PORT")))?;
        let s = TcpStream::connect_timeout(&sa, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(GuestConn { s })
    }

    /// Sends one request and returns the reply's text.
    pub fn request(&mut self, request: &str) -> std::io::Result<String> {
        self.s.write_all(&encode(request))?;
        let mut h = [0u8; 4];
        self.s.read_exact(&mut h)?;
        let n = u32::from_le_bytes(h) as usize;
        if n > MAX_REPLY {
            return Err(bad(format!("reply of {n} bytes is too long")));
        }
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|_| bad("reply is not UTF-8".into()))
    }
}

/// One request on a fresh async connection (used by the supervisor's health checks).
pub async fn request_async(addr: SocketAddr, request: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&encode(request)).await?;
    let mut h = [0u8; 4];
    s.read_exact(&mut h).await?;
    let n = u32::from_le_bytes(h) as usize;
    if n > MAX_REPLY {
        return Err(bad(format!("reply of {n} bytes is too long")));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    String::from_utf8(b).map_err(|_| bad("reply is not UTF-8".into()))
}

/// Entry `i` of the sample service's model table (`load N`, `query I`): SplitMix64's
/// finaliser of `i + 1`, masked with `0x0f0f…` (rootfs/service/src/model.rs, written again
/// here so the check is independent).
pub fn model_entry(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 0x0f0f_0f0f_0f0f_0f0f
}

/// The value [`table_image`] stores in entry `i` (as `microclient.py mkdisk` does).
pub fn table_value(i: u64) -> u64 {
    (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A disk image of `bytes` bytes (whole 4 KiB blocks) holding a table of `entries` entries
/// (rootfs/service/src/table.rs): sector 0 = `CLDTABLE`, u32 version 1, u32 0, u64 count;
/// entry `i` is a u64 LE at byte 512 + 8 i.
pub fn table_image(entries: u64, bytes: usize) -> Vec<u8> {
    let mut img = vec![0u8; bytes];
    img[..8].copy_from_slice(b"CLDTABLE");
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[16..24].copy_from_slice(&entries.to_le_bytes());
    for i in 0..entries {
        let at = 512 + 8 * i as usize;
        img[at..at + 8].copy_from_slice(&table_value(i).to_le_bytes());
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values() {
        assert_eq!(encode("health"), b"\x06\0\0\0health");
        assert_eq!(model_entry(0), 0x0200_0809_0b0d_0d0f);
        assert_eq!(model_entry(5), 219_285_551_139_652_106);
        assert_eq!(table_value(7), 17_418_742_259_747_381_416);
        let img = table_image(5000, 1 << 20);
        assert_eq!(&img[..8], b"CLDTABLE");
        assert_eq!(&img[512 + 56..512 + 64], &table_value(7).to_le_bytes());
    }
}
