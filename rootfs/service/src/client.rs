//! The host's client of the guest's TCP service (needs `std`): one blocking connection that
//! sends request frames and reads reply frames ([`crate::frame`]), with timeouts on connect,
//! read and write and a typed [`Error`].
//!
//! The agent's `cloudlet call`, xtask's demo and benchmarks and the end-to-end tests all talk
//! to the guest through [`Client`]; [`read_frame`] and [`write_frame`] serve anything else
//! that speaks the framing (a benchmark's host-side server, a raw stream).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::string::FromUtf8Error;
use std::time::{Duration, Instant};

use crate::frame;

/// Timeout for connecting, and for each read and write, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the guest.
#[derive(Debug)]
pub enum Error {
    /// The address names no socket address.
    Resolve {
        /// The address as given.
        addr: String,
        /// Why it did not resolve (when the resolver said).
        source: Option<io::Error>,
    },
    /// No connection to the address.
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Sending a request or reading a reply failed (a timeout is one).
    Io(io::Error),
    /// The peer closed the connection before a whole frame came.
    Closed,
    /// A frame announced more bytes than the protocol allows.
    TooLong {
        /// The announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A frame's text is not UTF-8.
    NotUtf8(FromUtf8Error),
    /// The reply is not the one expected.
    Unexpected {
        /// The request.
        request: String,
        /// The reply it got.
        got: String,
        /// The reply expected.
        want: String,
    },
    /// The service did not answer `health` in time.
    NotUp {
        /// Where.
        addr: SocketAddr,
        /// How long it was given.
        waited: Duration,
        /// The last attempt's failure.
        last: Box<Error>,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Resolve { addr, .. } => write!(f, "cannot resolve '{addr}'"),
            Error::Connect { addr, .. } => write!(f, "cannot connect to {addr}"),
            Error::Io(_) => write!(f, "the connection failed"),
            Error::Closed => write!(f, "the connection ended before a whole frame"),
            Error::TooLong { len, max } => {
                write!(f, "a frame announces {len} bytes (at most {max})")
            }
            Error::NotUtf8(_) => write!(f, "a frame is not UTF-8"),
            Error::Unexpected { request, got, want } => {
                write!(f, "`{request}` answered {got:?}, expected {want:?}")
            }
            Error::NotUp { addr, waited, .. } => {
                write!(
                    f,
                    "no service answered `health` at {addr} within {waited:?}"
                )
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Resolve {
                source: Some(e), ..
            }
            | Error::Connect { source: e, .. }
            | Error::Io(e) => Some(e),
            Error::NotUtf8(e) => Some(e),
            Error::NotUp { last, .. } => Some(last.as_ref()),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Writes `text` as one frame.
pub fn write_frame(w: &mut impl Write, text: &str) -> Result<(), Error> {
    let mut f = Vec::with_capacity(frame::HEADER + text.len());
    f.extend_from_slice(&frame::header(text.len()));
    f.extend_from_slice(text.as_bytes());
    w.write_all(&f)?;
    Ok(())
}

/// Reads one frame of at most `max` bytes; `None` when the stream ends cleanly before a frame
/// starts.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<String>, Error> {
    let mut head = [0u8; frame::HEADER];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::payload_len(head, max).map_err(|len| Error::TooLong { len, max })?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Closed,
        _ => Error::Io(e),
    })?;
    String::from_utf8(body).map(Some).map_err(Error::NotUtf8)
}

/// The value of `key=` in a reply (`field("ok scan sectors=8 us=3", "us")` is `Some("3")`).
pub fn field<'a>(reply: &'a str, key: &str) -> Option<&'a str> {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// One connection to a guest's service.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
}

impl Client {
    /// Connects to `addr` (an `IP:PORT`, or anything that resolves) within `timeout`, which
    /// then bounds every read and write too.
    pub fn connect(
        addr: impl ToSocketAddrs + fmt::Display,
        timeout: Duration,
    ) -> Result<Client, Error> {
        let resolve = |source| Error::Resolve {
            addr: addr.to_string(),
            source,
        };
        let mut last = None;
        for sa in addr.to_socket_addrs().map_err(|e| resolve(Some(e)))? {
            match TcpStream::connect_timeout(&sa, timeout) {
                Ok(stream) => return Client::from_stream(stream, timeout),
                Err(source) => last = Some(Error::Connect { addr: sa, source }),
            }
        }
        Err(last.unwrap_or_else(|| resolve(None)))
    }

    /// Connects to `addr` once its service answers `health` (`ok health`), with a fresh
    /// connection for each try (a forward or the guest's stack may not be up yet); each try
    /// waits at most `attempt` for its reply, all of them at most `timeout`. The connection
    /// returned has `timeout` on its reads and writes.
    pub fn connect_when_up(
        addr: SocketAddr,
        timeout: Duration,
        attempt: Duration,
    ) -> Result<Client, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let tried = Client::connect(addr, timeout).and_then(|mut c| {
                c.set_timeout(attempt)?;
                c.expect("health", "ok health")?;
                c.set_timeout(timeout)?;
                Ok(c)
            });
            match tried {
                Ok(c) => return Ok(c),
                Err(e @ Error::Unexpected { .. }) => return Err(e),
                Err(last) if Instant::now() >= deadline => {
                    return Err(Error::NotUp {
                        addr,
                        waited: timeout,
                        last: Box::new(last),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Wraps a connected stream: `timeout` on reads and writes, no Nagle delay.
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> Result<Client, Error> {
        stream.set_nodelay(true)?;
        let c = Client { stream };
        c.set_timeout(timeout)?;
        Ok(c)
    }

    /// Sets the timeout of each read and write from now on.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), Error> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    /// Sends one request (the guest answers one longer than [`frame::MAX_REQUEST`] with
    /// [`frame::TOO_LONG_REPLY`] and closes the connection).
    pub fn send(&mut self, request: &str) -> Result<(), Error> {
        write_frame(&mut self.stream, request)
    }

    /// Reads one reply.
    pub fn recv(&mut self) -> Result<String, Error> {
        read_frame(&mut self.stream, frame::MAX_REPLY)?.ok_or(Error::Closed)
    }

    /// Sends one request and returns its reply.
    pub fn request(&mut self, request: &str) -> Result<String, Error> {
        self.send(request)?;
        self.recv()
    }

    /// Sends one request whose reply must be `want`.
    pub fn expect(&mut self, request: &str, want: &str) -> Result<(), Error> {
        let got = self.request(request)?;
        if got == want {
            Ok(())
        } else {
            Err(Error::Unexpected {
                request: request.to_string(),
                got,
                want: want.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut wire = Vec::new();
        write_frame(&mut wire, "health").unwrap();
        assert_eq!(wire, b"\x06\0\0\0health");
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r, 16).unwrap().as_deref(), Some("health"));
        assert!(read_frame(&mut r, 16).unwrap().is_none(), "clean end");
        assert!(matches!(
            read_frame(&mut &wire[..], 5),
            Err(Error::TooLong { len: 6, max: 5 })
        ));
        assert!(matches!(
            read_frame(&mut &wire[..5], 16),
            Err(Error::Closed)
        ));
        assert!(matches!(
            read_frame(&mut &b"\x01\0\0\0\xff"[..], 16),
            Err(Error::NotUtf8(_))
        ));
        assert_eq!(field("ok scan sectors=8 us=3", "us"), Some("3"));
        assert_eq!(field("ok scan sectors=8", "sect"), None);
    }

    /// A server answering `health` and `echo` like the guest, on one connection.
    fn serve_one() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            while let Ok(Some(req)) = read_frame(&mut s, frame::MAX_REQUEST) {
                let reply = match req.strip_prefix("echo ") {
                    Some(t) => format!("ok echo {t}"),
                    None => format!("ok {req}"),
                };
                write_frame(&mut s, &reply).unwrap();
            }
        });
        addr
    }

    #[test]
    fn client_requests_and_checks_replies() {
        let addr = serve_one();
        let mut c = Client::connect_when_up(addr, DEFAULT_TIMEOUT, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(c.request("echo hi").unwrap(), "ok echo hi");
        c.expect("echo x", "ok echo x").unwrap();
        let e = c.expect("echo y", "ok echo z").unwrap_err();
        assert_eq!(
            e.to_string(),
            "`echo y` answered \"ok echo y\", expected \"ok echo z\""
        );
        assert!(matches!(
            Client::connect("not an address", DEFAULT_TIMEOUT),
            Err(Error::Resolve { .. })
        ));
    }
}
