//! Input from stdin for the guest: its virtio console when it has one, else COM1, buffered
//! in the VMM while the device has no room.

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::devices::serial::SerialDevice;
use crate::devices::virtio::slot::Slot;

/// Most input for the guest buffered in the VMM (beyond what its serial port or console holds)
/// before it stops reading stdin.
const PENDING_INPUT_MAX: usize = 64 * 1024;

/// The event loop's epoll token for stdin.
pub(crate) const TOKEN_STDIN: u64 = 1;

/// Gives `bytes` to the guest: to `console` when there is one, else to COM1's receive FIFO;
/// returns how many were taken.
pub fn deliver_input(serial: &Mutex<SerialDevice>, console: Option<&Slot>, bytes: &[u8]) -> usize {
    match console {
        Some(slot) => slot.lock().host_input(bytes),
        None => serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .enqueue_input(bytes),
    }
}

/// Input from stdin for the guest (its console, or its serial port), buffered in the VMM while
/// the device cannot take it: COM1's 64-byte FIFO is full, or the console holds as much
/// pending input as it may. The device writes the "input drained" eventfd when it has room
/// again, and the event loop offers the rest then.
#[derive(Debug, Default)]
pub struct SerialInput {
    pending: VecDeque<u8>,
    /// stdin is in the epoll set.
    polling: bool,
    /// stdin reached end of file (or cannot be read).
    pub(crate) eof: bool,
}

impl SerialInput {
    fn stdin_fd() -> RawFd {
        std::io::stdin().as_raw_fd()
    }

    /// Input from stdin, with what stdin already holds given to `deliver` now (the guest's
    /// serial port or console; it returns how many bytes it took). Called before the vCPUs
    /// start: a request written while the VM was being built (a restore or synthesis takes
    /// milliseconds) is there, interrupt raised, when the guest first runs, instead of waiting
    /// for the event loop to start.
    pub fn primed(deliver: &dyn Fn(&[u8]) -> usize) -> Self {
        let mut input = SerialInput::default();
        let mut pfd = libc::pollfd {
            fd: Self::stdin_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without waiting.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) } == 1 && pfd.revents & libc::POLLIN != 0;
        if ready {
            if input.read_once() {
                input.push_to(deliver);
            } else {
                input.eof = true;
            }
        }
        input
    }

    /// Reads what stdin has (one `read`) into `pending`; false at end of input or on error.
    fn read_once(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: reads at most `buf.len()` bytes into `buf` from stdin, which poll or epoll
        // reported readable; std's Stdin would add its own buffering, which we do not want.
        let n = unsafe { libc::read(Self::stdin_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return n < 0
                && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
        }
        self.pending.extend(&buf[..n as usize]);
        true
    }

    /// Gives `deliver` as much of `pending` as it takes.
    fn push_to(&mut self, deliver: &dyn Fn(&[u8]) -> usize) {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let len = front.len();
            let took = deliver(front).min(len);
            self.pending.drain(..took);
            if took < len {
                break;
            }
        }
    }

    pub(crate) fn attach_stdin(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        let ev = EpollEvent::new(EventSet::IN, TOKEN_STDIN);
        match epoll.ctl(ControlOperation::Add, Self::stdin_fd(), ev) {
            Ok(()) => {
                self.polling = true;
                Ok(())
            }
            // A regular file (or /dev/null) cannot be polled: it is always readable, so read
            // it up to the buffer bound now.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(PENDING_INPUT_MAX as u64)
                    .read_to_end(&mut buf)?;
                self.pending.extend(buf);
                self.eof = true;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn set_polling(&mut self, epoll: &Epoll, on: bool) -> std::io::Result<()> {
        if on == self.polling || self.eof {
            return Ok(());
        }
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        epoll.ctl(
            op,
            Self::stdin_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STDIN),
        )?;
        self.polling = on;
        Ok(())
    }

    pub(crate) fn read_stdin(
        &mut self,
        epoll: &Epoll,
        deliver: &dyn Fn(&[u8]) -> usize,
    ) -> std::io::Result<()> {
        if !self.read_once() {
            self.set_polling(epoll, false)?;
            self.eof = true;
            return Ok(());
        }
        self.feed(epoll, deliver)
    }

    pub(crate) fn feed(
        &mut self,
        epoll: &Epoll,
        deliver: &dyn Fn(&[u8]) -> usize,
    ) -> std::io::Result<()> {
        self.push_to(deliver);
        self.set_polling(epoll, self.pending.len() < PENDING_INPUT_MAX)
    }
}
