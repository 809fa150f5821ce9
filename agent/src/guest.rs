//! The micro guest's TCP protocol, as the agent speaks it. The blocking client and the
//! reference values live in `micro_service` ([`micro_service::client`],
//! [`micro_service::oracle`]), shared with xtask and the tests; here they keep their agent
//! names, beside the one async request the supervisor's health checks send.

use std::io;
use std::net::SocketAddr;

use micro_service::frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use micro_service::client::{Client as GuestConn, Error};
pub use micro_service::oracle::{model_entry, table_image, table_value};

/// One request on a fresh async connection (used by the supervisor's health checks).
pub async fn request_async(addr: SocketAddr, request: &str) -> io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut out = Vec::with_capacity(frame::HEADER + request.len());
    out.extend_from_slice(&frame::header(request.len()));
    out.extend_from_slice(request.as_bytes());
    s.write_all(&out).await?;
    let mut head = [0u8; frame::HEADER];
    s.read_exact(&mut head).await?;
    let len = frame::payload_len(head, frame::MAX_REPLY).map_err(|len| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            Error::TooLong {
                len,
                max: frame::MAX_REPLY,
            },
        )
    })?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    String::from_utf8(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
