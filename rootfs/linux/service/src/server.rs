//! The service over TCP: one thread per connection, each carrying length-prefixed
//! request/reply frames (`micro_service::frame`), as the micro guest's server does. A request
//! longer than `frame::MAX_REQUEST` is answered with `frame::TOO_LONG_REPLY` and the
//! connection closed.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use micro_service::frame::{self, HEADER, MAX_REQUEST, TOO_LONG_REPLY};

use crate::Service;

/// What happens after a `poweroff` reply has been sent: the code to power off with.
pub type PowerOff = fn(u8);

/// Serves connections from `listener` until the process ends.
pub fn serve(listener: TcpListener, service: Arc<Mutex<Service>>, power_off: PowerOff) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let service = Arc::clone(&service);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _ = connection(stream, &service, power_off);
            });
        if let Err(e) = spawned {
            eprintln!("cloudlet-init: cannot start a connection thread: {e}");
        }
    }
}

/// Answers the requests of one connection in order until the client closes it.
fn connection(mut s: TcpStream, service: &Mutex<Service>, power_off: PowerOff) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut request = vec![0u8; MAX_REQUEST];
    loop {
        let mut header = [0u8; HEADER];
        match s.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Ok(len) = frame::payload_len(header, MAX_REQUEST) else {
            send(&mut s, TOO_LONG_REPLY)?;
            return Ok(());
        };
        s.read_exact(&mut request[..len])?;
        let (reply, off) = service
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .respond(&request[..len]);
        send(&mut s, reply.as_bytes())?;
        if let Some(code) = off {
            s.flush()?;
            // Powered off at once, the VM's NIC would lose the reply still in the send
            // queue: wait (a moment at most) until the peer has acknowledged all of it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while unacked(&s).unwrap_or(0) > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            power_off(code);
        }
    }
}

/// Bytes of `s` sent but not yet acknowledged by the peer (`SIOCOUTQ`).
fn unacked(s: &TcpStream) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points at `n`; the fd is
    // the stream's own, open for this call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Writes one reply frame.
fn send(s: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&frame::header(payload.len()));
    out.extend_from_slice(payload);
    s.write_all(&out)
}
