//! The vmm's side of its two control paths (frames and messages in [`format::control`]):
//! the control socket it serves (`--api-sock`) and the report channel it writes to its
//! supervisor (`--report-fd`).
//!
//! The socket serves its clients independently; only the event loop touches the machine:
//!
//! ```text
//!  client ──connect──▶ acceptor thread ──▶ reader thread, one per connection: reads one
//!                      (poll: listener,     request frame (IO_TIMEOUT); answers a wrong
//!                       stop eventfd)       version itself
//!                                              │ (request, connection) on a channel,
//!                                              ▼ then the wake eventfd raised
//!                      event loop (owns the Machine): answers, writes the frame, closes
//! ```
//!
//! A client that connects and sends nothing holds its own reader thread and nothing else.
//!
//! The report channel: [`Reporter`] writes [`Report::Ready`] (timings, bound forwards) or
//! [`Report::Failed`] (the error chain and a kind), and after `Ready`, [`Report::Exited`] as
//! soon as the vCPUs have stopped and the guest's host ports are closed. The descriptor stays open until the process
//! exits, so the supervisor sees that as end of file.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use format::control::{
    self as wire, ApiRequest, ApiResponse, BoundForward, Failed, FailureKind, Ready, Report,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::machine::{LoopHooks, Machine};

/// Most connections read at once; more are closed at once.
pub const MAX_CLIENTS: usize = 32;

/// Errors of the control paths.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control socket could not be set up.
    #[error("failed to listen on the control socket '{0}'")]
    Socket(PathBuf, #[source] std::io::Error),
    /// The report descriptor is not an open file descriptor.
    #[error("--report-fd {0} is not an open file descriptor")]
    ReportFd(RawFd, #[source] std::io::Error),
    /// Writing a report failed (the supervisor went away?).
    #[error("failed to write a report to the supervisor")]
    Report(#[source] wire::ApiError),
}

/// A request read from a client, with the connection its answer goes to.
struct Pending {
    request: ApiRequest,
    conn: UnixStream,
}

/// The control socket: an acceptor thread, a reader thread per connection, and the channel
/// that hands the requests to the event loop.
pub struct ControlSocket {
    path: PathBuf,
    requests: mpsc::Receiver<Pending>,
    /// Raised when a request is queued; the event loop watches it.
    wake: Arc<EventFd>,
    /// Raised to end the acceptor.
    stop: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
    /// Where requests may have files written (snapshots); anywhere when None.
    confine: Option<crate::confine::Confine>,
}

impl std::fmt::Debug for ControlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlSocket")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlSocket {
    /// Listens on a new Unix socket at `path` (which must not exist) and starts accepting.
    /// The socket is created readable and writable by its owner alone (mode 0600: the
    /// process's umask is narrowed while it is made, so no one else can connect, even
    /// briefly).
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let err = |e| ControlError::Socket(path.to_owned(), e);
        if path.exists() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists: another vmm may be using it; remove it or choose another",
            )));
        }
        let listener = owner_only(|| UnixListener::bind(path)).map_err(err)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(err)?);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(err)?);
        let (tx, requests) = mpsc::channel();
        let acceptor = {
            let (wake, stop) = (wake.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vmm-control".into())
                .spawn(move || accept_loop(listener, tx, wake, stop))
                .map_err(err)?
        };
        Ok(ControlSocket {
            path: path.to_owned(),
            requests,
            wake,
            stop,
            acceptor: Some(acceptor),
            confine: None,
        })
    }

    /// Refuses requests that would write outside `confine` (a snapshot elsewhere).
    pub fn confine_to(&mut self, confine: crate::confine::Confine) {
        self.confine = Some(confine);
    }

    /// Readable when requests wait for [`ControlSocket::serve`].
    pub fn event_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Answers every queued request (on the event loop's thread, which owns `machine`).
    pub fn serve(&self, machine: &Machine) {
        let _ = self.wake.read();
        while let Ok(Pending { request, mut conn }) = self.requests.try_recv() {
            tracing::debug!(?request, "control request");
            if let ApiRequest::Handoff {
                to,
                token,
                downtime_ms,
            } = request
            {
                let req = crate::handoff::send::Request {
                    to,
                    token,
                    downtime: std::time::Duration::from_millis(u64::from(downtime_ms)),
                };
                // Answered by the handoff's thread when it ends.
                crate::handoff::send::start(machine, req, conn);
                continue;
            }
            let response = answer(machine, request, self.confine.as_ref());
            if let Err(e) = wire::write_frame(&mut conn, &response) {
                tracing::warn!("failed to answer a control request: {e}");
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accepts connections until `stop` is raised, each read on its own thread.
fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<Pending>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
) {
    // Its connection threads inherit this filter.
    crate::seccomp::install_or_abort(crate::seccomp::ThreadKind::Control);
    let readers = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two valid pollfds, the array's length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(
                "the control socket stopped accepting: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                continue;
            }
        };
        if readers.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            readers.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("more than {MAX_CLIENTS} control connections at once; closing one");
            continue;
        }
        let (tx, wake, readers2) = (tx.clone(), wake.clone(), readers.clone());
        let spawned = std::thread::Builder::new()
            .name("vmm-control-conn".into())
            .spawn(move || {
                read_request(conn, &tx, &wake);
                readers2.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            readers.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("cannot start a control connection's thread: {e}");
        }
    }
}

/// Reads one request from `conn` and queues it for the event loop; a frame of another
/// version is answered here, a malformed one closes the connection.
fn read_request(mut conn: UnixStream, tx: &mpsc::Sender<Pending>, wake: &EventFd) {
    let _ = conn.set_read_timeout(Some(wire::IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(wire::IO_TIMEOUT));
    match wire::read_frame::<ApiRequest>(&mut conn) {
        Ok(Ok(request)) => {
            if tx.send(Pending { request, conn }).is_ok() {
                let _ = wake.write(1);
            }
        }
        Ok(Err(v)) => {
            let response = ApiResponse::Error(format!(
                "protocol version {v} is not supported; this vmm speaks version {}",
                wire::API_VERSION
            ));
            if let Err(e) = wire::write_frame(&mut conn, &response) {
                tracing::warn!("failed to answer a control request: {e}");
            }
        }
        Err(e) => tracing::warn!("bad control request: {e}"),
    }
}

/// Answers one control request.
/// Runs `f` with the process's umask at 0177 (files it creates get mode 0600 at most).
fn owner_only<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file-creation mask; restored below.
    let old = unsafe { libc::umask(0o177) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

/// The answer to `request`; a snapshot outside `confine` (when given) is refused.
pub fn answer(
    machine: &Machine,
    request: ApiRequest,
    confine: Option<&crate::confine::Confine>,
) -> ApiResponse {
    let err = |e: &(dyn std::error::Error + 'static)| ApiResponse::Error(crate::error::message(e));
    let busy = matches!(
        request,
        ApiRequest::Pause | ApiRequest::Resume | ApiRequest::Snapshot { .. }
    );
    if busy && machine.handing_off() {
        return ApiResponse::Error(
            "a handoff of this VM is in progress: it pauses and resumes the VM itself".into(),
        );
    }
    match request {
        ApiRequest::Status => ApiResponse::Status {
            paused: machine.paused(),
            vcpus: machine.vcpu_count() as u32,
            mem_mib: machine.mem_mib(),
        },
        ApiRequest::Pause => machine
            .pause()
            .map_or_else(|e| err(&e), |_| ApiResponse::Ok),
        ApiRequest::Resume => machine
            .resume()
            .map_or_else(|e| err(&e), |_| ApiResponse::Ok),
        ApiRequest::Snapshot { dir, resume } => {
            let dir = match confine.map(|c| c.check(Path::new(&dir))) {
                None => PathBuf::from(dir),
                Some(Ok(resolved)) => resolved,
                Some(Err(e)) => return err(&e),
            };
            let t0 = std::time::Instant::now();
            let info = match machine.snapshot(&dir) {
                Ok(info) => info,
                Err(e) => return err(&e),
            };
            let paused_us = t0.elapsed().as_micros() as u64;
            if resume {
                if let Err(e) = machine.resume() {
                    return err(&e);
                }
            }
            ApiResponse::Snapshot {
                state_bytes: info.state_bytes,
                memory_bytes_written: info.memory_bytes_written,
                paused_us,
            }
        }
        ApiRequest::Stop => {
            machine.request_stop();
            ApiResponse::Ok
        }
        ApiRequest::Handoff { .. } => ApiResponse::Error(
            "a handoff is started from the control socket, which answers when it ends".into(),
        ),
    }
}

pub use crate::error::chain;

/// What a supervisor can act on in an error: the kind of the first I/O error in its chain.
pub fn failure_kind(e: &(dyn std::error::Error + 'static)) -> FailureKind {
    std::iter::successors(Some(e), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .find_map(FailureKind::of_io)
        .unwrap_or(FailureKind::Other)
}

/// The report channel to the supervisor (`--report-fd`).
#[derive(Debug)]
pub struct Reporter {
    out: File,
    ready: bool,
}

impl Reporter {
    /// Takes over descriptor `fd`, inherited from the supervisor.
    pub fn from_fd(fd: RawFd) -> Result<Reporter, ControlError> {
        // SAFETY: F_GETFD only reads the descriptor's flags; it fails on a closed one.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // Standard input may be the channel (a supervisor that spawns without running code
        // in the child passes it there; the vmm then takes no guest input from it, see
        // `--no-stdin`); standard output and error carry the log.
        if flags < 0 || fd == 1 || fd == 2 {
            let why = if flags < 0 {
                std::io::Error::last_os_error()
            } else {
                std::io::Error::other("standard output and error are not report channels")
            };
            return Err(ControlError::ReportFd(fd, why));
        }
        // Not passed on to anything this process might start.
        // SAFETY: sets the close-on-exec flag of the descriptor just checked to be open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        // SAFETY: `fd` is open (checked above) and named to this process on its command line
        // for this use alone: nothing else in it owns the descriptor.
        let out = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Reporter { out, ready: false })
    }

    fn write(&mut self, report: &Report) -> Result<(), ControlError> {
        wire::write_frame(&mut self.out, report).map_err(ControlError::Report)
    }

    /// Reports that the VM runs, with the synthesis timings and the forwards as bound.
    pub fn ready(
        &mut self,
        synthesis: Option<wire::SynthesisTimes>,
        forwards: &[netback::Forward],
    ) -> Result<(), ControlError> {
        let forwards = forwards
            .iter()
            .map(|f| BoundForward {
                host: f.host,
                guest_port: f.guest_port,
            })
            .collect();
        self.write(&Report::Ready(Ready {
            synthesis,
            forwards,
        }))?;
        self.ready = true;
        Ok(())
    }

    /// Reports that `vmm receive` listens for a handoff at `addr`.
    pub fn listening(&mut self, addr: std::net::SocketAddr) -> Result<(), ControlError> {
        self.write(&Report::Listening { addr })
    }

    /// Reports why the VM could not start.
    pub fn failed(&mut self, e: &(dyn std::error::Error + 'static)) -> Result<(), ControlError> {
        self.write(&Report::Failed(Failed {
            kind: failure_kind(e),
            chain: chain(e),
        }))
    }

    /// Reports a handoff's progress (after `ready`).
    pub fn handoff(&mut self, progress: format::control::HandoffProgress) {
        if self.ready {
            if let Err(e) = self.write(&Report::Handoff(progress)) {
                tracing::debug!("cannot report the handoff's progress: {e}");
            }
        }
    }

    /// Reports that the VM has stopped and the vmm will exit with `code` (after `ready`).
    pub fn exited(&mut self, code: i32) {
        if self.ready {
            if let Err(e) = self.write(&Report::Exited { code }) {
                tracing::debug!("cannot report the exit: {e}");
            }
        }
    }
}

/// The control paths the event loop serves: the socket, the report channel, either or none.
#[derive(Debug, Default)]
pub struct Control {
    /// The control socket.
    pub socket: Option<ControlSocket>,
    /// The report channel.
    pub report: Option<Reporter>,
}

impl LoopHooks for Control {
    fn requests_fd(&self) -> Option<RawFd> {
        self.socket.as_ref().map(ControlSocket::event_fd)
    }

    fn serve_requests(&mut self, machine: &Machine) {
        if let Some(socket) = &self.socket {
            socket.serve(machine);
        }
    }

    fn handoff_progress(&mut self, progress: format::control::HandoffProgress) {
        if let Some(r) = &mut self.report {
            r.handoff(progress);
        }
    }

    fn reports_exit(&self) -> bool {
        self.report.is_some()
    }

    fn exited(&mut self, code: i32) {
        if let Some(r) = &mut self.report {
            r.exited(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn failure_kind_and_chain_come_from_the_causes() {
        let e = Outer(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        assert_eq!(failure_kind(&e), FailureKind::AddressInUse);
        let c = chain(&e);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], "outer");
        let e = Outer(std::io::Error::other("x"));
        assert_eq!(failure_kind(&e), FailureKind::Other);
    }

    #[test]
    fn reports_are_frames_on_the_descriptor() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(a);
        let mut r = Reporter::from_fd(fd).unwrap();
        r.exited(0); // not ready: nothing written
        r.ready(None, &[]).unwrap();
        r.exited(3);
        drop(r);
        let first = wire::read_frame::<Report>(&mut b).unwrap().unwrap();
        assert_eq!(
            first,
            Report::Ready(Ready {
                synthesis: None,
                forwards: vec![]
            })
        );
        let second = wire::read_frame::<Report>(&mut b).unwrap().unwrap();
        assert_eq!(second, Report::Exited { code: 3 });
        assert!(
            wire::read_frame::<Report>(&mut b).is_err(),
            "then end of file"
        );
        assert!(Reporter::from_fd(1).is_err());
    }
}
