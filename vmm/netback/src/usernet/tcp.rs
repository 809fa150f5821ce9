//! TCP relaying between a smoltcp socket (the guest's side) and a host `TcpStream`.
//!
//! A [`TcpConn`] pairs one smoltcp socket with one non-blocking host stream. Bytes move
//! directly between the socket's ring buffers and the stream (`recv`/`send` closures), so the
//! only buffering is the socket's own: when the host stops reading, the guest sees the window
//! close; when the guest stops reading, the host stream is left unread.
//!
//! Closing, either way:
//! - guest FIN (socket reports `Finished` once drained) → host `shutdown(Write)`;
//! - host EOF → `socket.close()` (FIN after the queued data);
//! - guest RST, or the socket timing out → host stream closed with SO_LINGER 0 (RST);
//! - host error (reset) → `socket.abort()` (RST to the guest).
//!
//! A connection is finished once the socket is closed (and any RST sent) or in TIME-WAIT
//! with everything delivered; the caller then removes the socket from the set.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use smoltcp::socket::tcp::{self, RecvError, State};

use super::UserNetStats;
use crate::sys;

/// Which side opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A host client of a port forward; the socket connected to the guest.
    Forward,
    /// The guest; the socket accepted its SYN.
    Outbound,
}

/// What a pump did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pump {
    /// Nothing changed.
    Idle,
    /// Bytes moved or the state changed: run the stack again.
    Progress,
    /// Finished: remove the socket.
    Done,
}

/// One relayed TCP connection.
#[derive(Debug)]
pub(crate) struct TcpConn {
    pub(crate) handle: smoltcp::iface::SocketHandle,
    pub(crate) origin: Origin,
    host: Option<TcpStream>,
    /// The host stream may have data (or EOF) to read: set by epoll, cleared on WouldBlock.
    pub(crate) readable: bool,
    /// The host stream may accept data: set by epoll, cleared on WouldBlock.
    pub(crate) writable: bool,
    /// The host sent EOF and the socket was closed for sending.
    host_eof: bool,
    /// The guest sent FIN and the host stream was shut down for writing.
    guest_eof: bool,
    /// The socket has been seen out of SYN-SENT / SYN-RECEIVED at least once.
    opened: bool,
    /// When the host side went away while the socket still had a RST to send.
    closing_since: Option<Instant>,
}

/// How long a closed connection waits for its RST to go out (the guest may be gone).
const RST_GRACE: Duration = Duration::from_secs(2);

impl TcpConn {
    pub(crate) fn new(
        handle: smoltcp::iface::SocketHandle,
        origin: Origin,
        host: TcpStream,
    ) -> Self {
        Self {
            handle,
            origin,
            host: Some(host),
            readable: true,
            writable: true,
            host_eof: false,
            guest_eof: false,
            opened: false,
            closing_since: None,
        }
    }

    /// Closes the host stream abortively (RST to the host peer).
    fn reset_host(&mut self) {
        if let Some(host) = self.host.take() {
            if let Err(e) = sys::set_linger_zero(&host) {
                tracing::debug!("cannot set SO_LINGER on a relayed stream: {e}");
            }
        }
    }

    /// The host stream failed: drop it and reset the guest's side.
    fn host_failed(&mut self, sock: &mut tcp::Socket, e: &io::Error) -> Pump {
        tracing::debug!(origin = ?self.origin, "host side of a relayed connection failed: {e}");
        self.host = None;
        sock.abort();
        Pump::Progress
    }

    /// Moves whatever can move between the socket and the host stream and advances the
    /// close handshake.
    pub(crate) fn pump(&mut self, sock: &mut tcp::Socket, stats: &mut UserNetStats) -> Pump {
        let state = sock.state();
        if state == State::Listen {
            // An accepted SYN that the guest then reset returns the socket to LISTEN; a
            // listener that never saw its SYN is useless too.
            self.reset_host();
            sock.abort();
            return Pump::Done;
        }
        if !self.opened && matches!(state, State::SynSent | State::SynReceived) {
            return Pump::Idle;
        }
        self.opened = true;
        let Some(host) = self.host.as_mut() else {
            // The host side is gone; wait (a little) until the RST, if any, has been sent.
            let since = *self.closing_since.get_or_insert_with(Instant::now);
            let rst_pending = state == State::Closed && sock.remote_endpoint().is_some();
            return if rst_pending && since.elapsed() < RST_GRACE {
                Pump::Idle
            } else {
                Pump::Done
            };
        };
        let mut progress = false;

        // Guest → host.
        while self.writable && sock.can_recv() {
            let res = sock.recv(|buf| match host.write(buf) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match res {
                Ok(Ok(0)) => {
                    let e = io::Error::from(io::ErrorKind::WriteZero);
                    return self.host_failed(sock, &e);
                }
                r => match relayed(r, &mut stats.tcp_bytes_from_guest, &mut self.writable) {
                    Step::Moved => progress = true,
                    Step::Again => {}
                    Step::Stop => break,
                    Step::Fail(e) => return self.host_failed(sock, &e),
                },
            }
        }
        if !self.guest_eof && !sock.can_recv() && sock.recv(|_| (0, ())) == Err(RecvError::Finished)
        {
            self.guest_eof = true;
            progress = true;
            if let Err(e) = host.shutdown(Shutdown::Write) {
                tracing::debug!("cannot half-close a relayed host stream: {e}");
            }
        }

        // Host → guest.
        while !self.host_eof && self.readable && sock.can_send() {
            let res = sock.send(|buf| match host.read(buf) {
                Ok(n) => (n, Ok(if buf.is_empty() { usize::MAX } else { n })),
                Err(e) => (0, Err(e)),
            });
            match res {
                Ok(Ok(usize::MAX)) => break,
                Ok(Ok(0)) => {
                    self.host_eof = true;
                    progress = true;
                    sock.close();
                }
                r => match relayed(r, &mut stats.tcp_bytes_to_guest, &mut self.readable) {
                    Step::Moved => progress = true,
                    Step::Again => {}
                    Step::Stop => break,
                    Step::Fail(e) => return self.host_failed(sock, &e),
                },
            }
        }

        match sock.state() {
            State::Closed if !self.guest_eof || !self.host_eof => {
                // Reset by the guest, or timed out.
                tracing::debug!(origin = ?self.origin, "guest side of a relayed connection reset");
                self.reset_host();
                Pump::Progress
            }
            State::Closed | State::TimeWait if !sock.can_recv() => {
                // Both FINs exchanged and everything delivered: a graceful close.
                self.host = None;
                Pump::Done
            }
            _ if progress => Pump::Progress,
            _ => Pump::Idle,
        }
    }

    /// The socket's 4-tuple as (guest side, gateway side), once it has one.
    pub(crate) fn tuple(sock: &tcp::Socket) -> Option<(SocketAddrV4, SocketAddrV4)> {
        let (local, remote) = (sock.local_endpoint()?, sock.remote_endpoint()?);
        let v4 = |ep: smoltcp::wire::IpEndpoint| match ep.addr {
            smoltcp::wire::IpAddress::Ipv4(a) => Some(SocketAddrV4::new(a, ep.port)),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        Some((v4(remote)?, v4(local)?))
    }
}

/// What the relay loop does after one host read or write (see [`relayed`]).
enum Step {
    /// Data moved.
    Moved,
    /// Nothing moved: the host would block, or the call was interrupted.
    Again,
    /// The socket refused the call: leave the loop.
    Stop,
    /// The host side failed.
    Fail(io::Error),
}

/// Accounts one relay step in either direction: `n` bytes moved add to `bytes`; a host that
/// would block clears `ready` (its readiness flag for the direction).
fn relayed<E>(res: Result<io::Result<usize>, E>, bytes: &mut u64, ready: &mut bool) -> Step {
    match res {
        Ok(Ok(n)) => {
            *bytes += n as u64;
            Step::Moved
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            *ready = false;
            Step::Again
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
        Ok(Err(e)) => Step::Fail(e),
        Err(_) => Step::Stop,
    }
}

/// An outbound connection whose host connect is in progress. The guest's SYN is held back
/// until the outcome is known: on success it is handed to a fresh listening socket (so the
/// guest's connect succeeds only when the host's did), on failure to the stack without a
/// listener, which answers with a RST (the guest sees "connection refused").
#[derive(Debug)]
pub(crate) struct PendingConnect {
    pub(crate) stream: TcpStream,
    /// The guest's address and port.
    pub(crate) guest: SocketAddrV4,
    /// The destination the guest asked for (what the listening socket binds to).
    pub(crate) dst: SocketAddrV4,
    /// The guest's SYN frame.
    pub(crate) syn: Vec<u8>,
    pub(crate) deadline: Instant,
    /// Epoll reported the stream writable or failed: check the outcome.
    pub(crate) ready: bool,
}

/// The outcome of a pending connect.
#[derive(Debug)]
pub(crate) enum ConnectOutcome {
    /// Still connecting.
    Waiting,
    /// Connected.
    Connected,
    /// Failed (refused, unreachable, timed out).
    Failed(io::Error),
}

impl PendingConnect {
    pub(crate) fn outcome(&mut self, now: Instant) -> ConnectOutcome {
        if self.ready {
            match self.stream.take_error() {
                Ok(Some(e)) | Err(e) => return ConnectOutcome::Failed(e),
                Ok(None) => {}
            }
            match self.stream.peer_addr() {
                Ok(_) => return ConnectOutcome::Connected,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => self.ready = false,
                Err(e) => return ConnectOutcome::Failed(e),
            }
        }
        if now >= self.deadline {
            ConnectOutcome::Failed(io::ErrorKind::TimedOut.into())
        } else {
            ConnectOutcome::Waiting
        }
    }
}
