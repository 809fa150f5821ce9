//! A minimal userfaultfd: the few ioctls lazy synthesis needs (register missing-page faults on
//! anonymous ranges, read fault events, fill pages by copy or with zeros, wake).
//!
//! Written by hand: the `userfaultfd` crate needs libclang at build time for its bindings,
//! and the kernel ABI used here is six fixed ioctls and three structs (linux/userfaultfd.h).
//! Faults raised inside the kernel on the VMM's behalf (KVM touching guest memory) are only
//! delivered without `UFFD_USER_MODE_ONLY`, which needs root (or CAP_SYS_PTRACE) while
//! `vm.unprivileged_userfaultfd` is 0, or access to the device node `/dev/userfaultfd`
//! (Linux 6.1+; its file mode is the gate): a vmm launched without root is given that node
//! (a group that may open it, or the node in its mount namespace) and lazy synthesis keeps
//! working. Callers fall back to eager application when neither is allowed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// `UFFD_API`.
const API: u64 = 0xaa;
/// The device node that hands out userfaultfds to whoever may open it.
pub const DEVICE: &str = "/dev/userfaultfd";
/// `_IO(0xaa, 0x00)` on the device node: a new userfaultfd.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// `_IOWR(0xaa, 0x3f, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
/// `_IOWR(0xaa, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
/// `_IOR(0xaa, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOWR(0xaa, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xaa, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// Bits of `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE` in a registration's `ioctls`.
const NEEDED_RANGE_IOCTLS: u64 = (1 << 0x03) | (1 << 0x04);

#[repr(C)]
#[derive(Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct RegisterArg {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct ZeroArg {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// What filling a range did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// All of it was filled.
    Done,
    /// This many bytes from the start were filled, then the kernel stopped (the next page
    /// exists, or it was interrupted): go on from there.
    Partial(u64),
    /// The first page is already present; nothing was filled.
    Exists,
}

/// A userfaultfd in non-blocking mode.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// Opens a userfaultfd that also sees faults the kernel takes on our behalf (KVM): by
    /// the system call, or, where that is not allowed (no root), through [`DEVICE`].
    pub fn new() -> io::Result<Self> {
        // SAFETY: a plain syscall with flag arguments; the result is checked.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            let denied = io::Error::last_os_error();
            return match denied.raw_os_error() {
                Some(libc::EPERM) => Uffd::from_device(std::path::Path::new(DEVICE))
                    .map_err(|e| io::Error::new(e.kind(), format!("{denied}; {DEVICE}: {e}"))),
                _ => Err(denied),
            };
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Uffd::handshake(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// A userfaultfd from the device node at `node` (`/dev/userfaultfd`).
    pub fn from_device(node: &std::path::Path) -> io::Result<Self> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(node)?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_ulong;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new descriptor.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Uffd::handshake(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Agrees on the API with a new userfaultfd.
    fn handshake(fd: OwnedFd) -> io::Result<Self> {
        let uffd = Uffd { fd };
        let mut api = ApiArg {
            api: API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API with a correctly sized, initialised `uffdio_api`.
        let r = unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API, &mut api) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(uffd)
    }

    /// Registers `[start, start + len)` (page-aligned, anonymous private memory) for
    /// missing-page faults.
    pub fn register(&self, start: usize, len: usize) -> io::Result<()> {
        let mut arg = RegisterArg {
            range: Range {
                start: start as u64,
                len: len as u64,
            },
            mode: MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a correctly sized `uffdio_register`; the kernel checks
        // that the range is mapped and supports userfaultfd.
        let r = unsafe { ioctl_with_mut_ref(self, UFFDIO_REGISTER, &mut arg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if arg.ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel cannot fill this range by copy or with zero pages",
            ));
        }
        Ok(())
    }

    /// Fills `len` bytes at `dst` (page-aligned, registered, missing) with a copy of `src`,
    /// waking threads that wait on them.
    ///
    /// # Safety
    /// `src..src+len` must be readable memory.
    pub unsafe fn copy(&self, dst: usize, src: *const u8, len: usize) -> io::Result<Fill> {
        let arg = CopyArg {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `uffdio_copy`; the caller guarantees the source is
        // readable, and the kernel only writes registered, missing pages at `dst`.
        unsafe { self.fill(UFFDIO_COPY, arg, |a| a.copy) }
    }

    /// Maps zero pages at `[dst, dst + len)` (registered, missing), waking waiters.
    pub fn zero(&self, dst: usize, len: usize) -> io::Result<Fill> {
        let arg = ZeroArg {
            range: Range {
                start: dst as u64,
                len: len as u64,
            },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `uffdio_zeropage`; the kernel only maps zero pages
        // where registered pages are missing.
        unsafe { self.fill(UFFDIO_ZEROPAGE, arg, |a| a.zeropage) }
    }

    /// Issues the fill ioctl `req` with `arg`; `done` reads from it how many bytes were
    /// filled before an interruption.
    ///
    /// # Safety
    /// `arg` must be the argument struct `req` takes, naming memory the kernel may read.
    unsafe fn fill<A>(
        &self,
        req: libc::c_ulong,
        mut arg: A,
        done: fn(&A) -> i64,
    ) -> io::Result<Fill> {
        // SAFETY: the caller guarantees `arg` is what `req` expects; it lives across the call.
        let r = unsafe { ioctl_with_mut_ref(self, req, &mut arg) };
        Self::filled(r, done(&arg))
    }

    fn filled(r: i32, done: i64) -> io::Result<Fill> {
        if r >= 0 {
            return Ok(Fill::Done);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) if done > 0 => Ok(Fill::Partial(done as u64)),
            Some(libc::EEXIST) => Ok(Fill::Exists),
            _ => Err(e),
        }
    }

    /// Wakes threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let arg = Range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE with a correctly sized `uffdio_range`.
        let r = unsafe { ioctl_with_ref(self, UFFDIO_WAKE, &arg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for fault events and appends their addresses to `out`.
    pub fn read_faults(&self, timeout_ms: i32, out: &mut Vec<usize>) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(());
        }
        // `struct uffd_msg` is 32 bytes: event (u8) at 0; for page faults, the faulting
        // address (u64) at 16.
        let mut buf = [0u8; 32 * 16];
        loop {
            // SAFETY: reading into a buffer we own, of the length we pass.
            let r = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                    _ => Err(e),
                };
            }
            let r = r as usize;
            for m in buf[..r - r % 32].chunks_exact(32) {
                if m[0] == EVENT_PAGEFAULT {
                    let a = u64::from_ne_bytes(m[16..24].try_into().expect("8 bytes"));
                    out.push(a as usize);
                }
            }
            if r < buf.len() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps `pages` anonymous pages; unmapped by the caller.
    fn anon(pages: usize) -> usize {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    /// A thread touching a registered page blocks until the page is filled, then sees the
    /// filled bytes; a second fill of the same page reports it exists.
    #[test]
    fn faults_are_reported_and_filled_once() {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                panic!("userfaultfd needs root here (vm.unprivileged_userfaultfd=0): {e}")
            }
            Err(e) => panic!("userfaultfd: {e}"),
        };
        fills_once(uffd);
    }

    /// The same through the device node (how a vmm without root gets one).
    #[test]
    fn the_device_node_gives_the_same_userfaultfd() {
        let uffd = Uffd::from_device(std::path::Path::new(DEVICE))
            .unwrap_or_else(|e| panic!("{DEVICE} (Linux 6.1+, opened as root here): {e}"));
        fills_once(uffd);
    }

    fn fills_once(uffd: Uffd) {
        let base = anon(4);
        uffd.register(base, 4 * 4096).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: reading a byte of a live mapping; the fault blocks until filled.
            unsafe { std::ptr::read_volatile((base + 2 * 4096 + 8) as *const u8) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            uffd.read_faults(1000, &mut faults).unwrap();
        }
        assert_eq!(faults[0] & !0xfff, base + 2 * 4096);
        let page = [0x5au8; 4096];
        // SAFETY: `page` is a readable 4 KiB buffer.
        let r = unsafe { uffd.copy(base + 2 * 4096, page.as_ptr(), 4096) }.unwrap();
        assert_eq!(r, Fill::Done);
        assert_eq!(reader.join().unwrap(), 0x5a);
        // SAFETY: as above.
        let again = unsafe { uffd.copy(base + 4096, page.as_ptr(), 3 * 4096) }.unwrap();
        assert_eq!(again, Fill::Partial(4096));
        // SAFETY: as above.
        let exists = unsafe { uffd.copy(base + 2 * 4096, page.as_ptr(), 2 * 4096) }.unwrap();
        assert_eq!(exists, Fill::Exists);
        assert_eq!(uffd.zero(base, 4096).unwrap(), Fill::Done);
        // SAFETY: reading filled pages of a live mapping.
        unsafe {
            assert_eq!(std::ptr::read_volatile(base as *const u8), 0);
            assert_eq!(std::ptr::read_volatile((base + 4096) as *const u8), 0x5a);
            libc::munmap(base as *mut libc::c_void, 4 * 4096);
        }
    }
}
