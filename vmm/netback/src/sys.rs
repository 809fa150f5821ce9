//! The few Linux system calls std does not wrap: epoll, eventfd, a non-blocking TCP
//! connect, an abortive close, and the TAP ioctl.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Turns a `-1` return into the OS error.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a freshly created descriptor.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: `fd` was just returned by the kernel for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An epoll instance; registrations carry a `u64` token.
#[derive(Debug)]
pub(crate) struct Epoll(OwnedFd);

impl Epoll {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes only flags and returns a new descriptor or -1.
        owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }).map(Self)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Registers `fd` for `events`; closing `fd` unregisters it.
    pub(crate) fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are valid and `ev` is a properly initialised epoll_event
        // that the kernel only reads.
        check(unsafe { libc::epoll_ctl(self.fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
    }

    /// Collects ready events without waiting; returns how many were written to `events`.
    pub(crate) fn poll(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        let max = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `events` is a valid, writable array of at least `max` entries.
            let n = unsafe { libc::epoll_wait(self.fd(), events.as_mut_ptr(), max, 0) };
            match check(n) {
                Ok(n) => return Ok(n as usize),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A non-blocking eventfd used as a level-triggered "work pending" flag.
#[derive(Debug)]
pub(crate) struct EventFd(File);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let fd = owned(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        Ok(Self(File::from(fd)))
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Makes the eventfd readable.
    pub(crate) fn signal(&self) {
        // Only fails when the counter would overflow, i.e. it is readable already.
        let _ = (&self.0).write(&1u64.to_ne_bytes());
    }

    /// Makes the eventfd unreadable again.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 8];
        // WouldBlock means it was not signalled: nothing to clear.
        let _ = (&self.0).read(&mut buf);
    }
}

/// Starts a non-blocking TCP connect to `addr`; completion shows as writability, and the
/// outcome via [`TcpStream::take_error`] / [`TcpStream::peer_addr`].
pub(crate) fn connect_nonblocking(addr: SocketAddrV4) -> io::Result<TcpStream> {
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket takes plain integers and returns a new descriptor or -1.
    let fd = owned(unsafe { libc::socket(libc::AF_INET, flags, 0) })?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `fd` is a valid socket and `sin` a sockaddr_in of the length given, which the
    // kernel only reads.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            len,
        )
    };
    match check(ret) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from(fd))
}

/// Makes closing `stream` send a RST instead of a FIN (SO_LINGER with a zero timeout).
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is a valid socket and `linger` is a `struct linger` of the size
    // given, which the kernel only reads.
    check(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags member of the union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `_IOW('T', 204, int)`, `_IOW('T', 206, int)`.
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Makes user `uid` and group `gid` the owners of the tap the open `/dev/net/tun` descriptor
/// is attached to: they may then attach to it without privilege (a persistent tap keeps it).
pub(crate) fn tun_set_owner(tun: &File, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the descriptor is an open tun device attached to a tap; both requests take an
    // integer argument.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER as _, uid as libc::c_ulong) })?;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETGROUP as _, gid as libc::c_ulong) }).map(drop)
}

/// Attaches the open `/dev/net/tun` descriptor to the tap `name` (created if missing) with
/// `flags`; returns the interface's name as the kernel reports it.
pub(crate) fn tun_set_iff(tun: &File, name: &str, flags: libc::c_int) -> io::Result<String> {
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    // The caller checked that the name fits with its terminating NUL.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the descriptor is an open tun device and `req` is an ifreq-sized, initialised
    // buffer that TUNSETIFF reads and may update (the name).
    check(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req) })?;
    let len = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    Ok(String::from_utf8_lossy(&req.name[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }

    #[test]
    fn eventfd_signals_through_epoll() {
        let ep = Epoll::new().unwrap();
        let ev = EventFd::new().unwrap();
        ep.add(ev.fd(), libc::EPOLLIN as u32, 7).unwrap();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        assert_eq!(ep.poll(&mut events).unwrap(), 0);
        ev.signal();
        ev.signal();
        assert_eq!(ep.poll(&mut events).unwrap(), 1);
        let token = events[0].u64;
        assert_eq!(token, 7);
        ev.clear();
        assert_eq!(ep.poll(&mut events).unwrap(), 0);
    }

    #[test]
    fn connect_refused_shows_in_take_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!(),
        };
        drop(listener);
        match connect_nonblocking(addr) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            Ok(s) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let err = s.take_error().unwrap().expect("connect error");
                assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
            }
        }
    }
}
