//! The TAP backend: frames go to and come from a Linux tap interface.
//!
//! The tap is opened with `IFF_TAP | IFF_NO_PI` (plain Ethernet frames, no packet-info
//! prefix, no virtio-net header) and non-blocking. The tap descriptor itself is the event
//! descriptor; there is no internal work, so `poll` does nothing and there are no timers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{sys, NetBackend};

/// Largest frame a tap without offloads delivers (64 KiB IP packet plus headers).
const MAX_TAP_FRAME: usize = 65536 + 18;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or contains bad characters.
    #[error("tap name {0:?} is invalid: use 1-15 bytes without '/', ':' or whitespace")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and /dev/net/tun present?)")]
    Open(#[source] io::Error),
    /// TUNSETIFF was refused for lack of privilege.
    #[error("not permitted to attach to tap {name}: run with CAP_NET_ADMIN, or create it for this user first with `ip tuntap add {name} mode tap user $USER`")]
    NotPermitted {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// TUNSETIFF failed otherwise.
    #[error("cannot attach to tap {name} (an existing interface of another kind, or a tap with a vnet header or packet info, fails with EINVAL)")]
    Attach {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
}

/// A tap interface carrying the guest's frames.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    scratch: Vec<u8>,
    dropped: u64,
}

impl Tap {
    /// Attaches to the tap `name`, creating it (non-persistent) when it does not exist and
    /// the process has CAP_NET_ADMIN. Bring it up and address it with `ip` as usual.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bad = |c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0';
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.chars().any(bad) {
            return Err(TapError::Name(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let name =
            sys::tun_set_iff(&file, name, libc::IFF_TAP | libc::IFF_NO_PI).map_err(|source| {
                let name = name.to_owned();
                if source.raw_os_error() == Some(libc::EPERM) {
                    TapError::NotPermitted { name, source }
                } else {
                    TapError::Attach { name, source }
                }
            })?;
        tracing::info!(tap = %name, "tap attached");
        Ok(Self {
            file,
            name,
            scratch: Vec::new(),
            dropped: 0,
        })
    }

    /// Hands the existing (persistent) tap `name` to user `uid` and group `gid`, so that a
    /// process of theirs without privilege (a jailed vmm) may attach to it. Needs
    /// CAP_NET_ADMIN; a tap that does not exist yet is refused (one made here would vanish,
    /// or outlive the VM).
    pub fn hand_to(name: &str, uid: u32, gid: u32) -> Result<(), TapError> {
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Err(TapError::Attach {
                name: name.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "a jailed vmm attaches to an existing tap: create it first (`ip tuntap add NAME mode tap`)",
                ),
            });
        }
        let tap = Tap::open(name)?;
        sys::tun_set_owner(&tap.file, uid, gid).map_err(|source| TapError::Attach {
            name: name.to_owned(),
            source,
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames dropped: the tap refused them (link down, queue full) or they did not fit
    /// the caller's buffer.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // Queue full, link down, or a frame the kernel rejects: the frame is lost, the
            // device goes on.
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOBUFS)
                    ) =>
            {
                self.dropped += 1;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if buf.len() >= MAX_TAP_FRAME {
                return match self.file.read(buf) {
                    Ok(n) => Ok(Some(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                };
            }
            // A short read would silently truncate: read whole frames, drop those too big.
            self.scratch.resize(MAX_TAP_FRAME, 0);
            let n = match self.file.read(&mut self.scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            if n <= buf.len() {
                buf[..n].copy_from_slice(&self.scratch[..n]);
                return Ok(Some(n));
            }
            self.dropped += 1;
        }
    }

    fn event_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
