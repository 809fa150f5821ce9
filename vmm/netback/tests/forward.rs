//! Port forwards: host clients reach a TCP echo server in the simulated guest.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{pattern, EchoServer, World};
use netback::{Forward, NetBackend, UserNetConfig};

fn world() -> (World, SocketAddr) {
    let cfg = UserNetConfig {
        forwards: vec!["127.0.0.1:0=10.0.2.15:80".parse().unwrap()],
        ..UserNetConfig::default()
    };
    let world = World::new(cfg, true);
    let fwds = world.net.forwards();
    assert_eq!(fwds.len(), 1);
    assert_ne!(fwds[0].host.port(), 0, "port 0 is resolved");
    let addr = fwds[0].host;
    (world, addr)
}

/// Connects, sends `data` while reading the echo, half-closes, reads to EOF.
fn echo_client(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    got
}

/// Drives the world until every client thread finished and the backend and guest closed
/// all connections.
fn drive<T>(
    world: &mut World,
    echo: &mut EchoServer,
    clients: Vec<thread::JoinHandle<T>>,
) -> Vec<T> {
    world.run(Duration::from_secs(120), |g| {
        echo.service(g);
        clients.iter().all(|c| c.is_finished())
    });
    let out = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // Wait for the close handshakes to finish on both sides.
    let mut quiet = 0;
    world.run(Duration::from_secs(30), |g| {
        echo.service(g);
        let closed = echo.connected(g) == 0;
        quiet = if closed { quiet + 1 } else { 0 };
        quiet > 3
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.net.stats().tcp_active > 0 {
        assert!(
            Instant::now() < deadline,
            "connections left: {:?}",
            world.net.stats()
        );
        world.step();
        echo.service(&mut world.guest);
        world.wait();
    }
    out
}

#[test]
fn forward_echo_small() {
    let (mut world, addr) = world();
    let mut echo = EchoServer::new(80, 2, 16384);
    let client = thread::spawn(move || echo_client(addr, b"hello, guest".to_vec()));
    let got = drive(&mut world, &mut echo, vec![client]);
    assert_eq!(got[0], b"hello, guest");
    let stats = world.net.stats();
    assert_eq!(stats.tcp_forwarded, 1);
    assert_eq!(stats.tcp_active, 0);
    assert_eq!(stats.dropped_malformed, 0);
    // Idle: no timer due soon, and the event fd is quiet after a poll.
    world.net.poll().unwrap();
    let t = world.net.next_timeout();
    assert!(
        t.is_none() || t > Some(Duration::from_millis(500)),
        "idle timeout {t:?}"
    );
    let mut pfd = libc::pollfd {
        fd: world.net.event_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert_eq!(ready, 0, "event fd quiet when idle");
}

#[test]
fn forward_hundred_sequential_connections() {
    let (mut world, addr) = world();
    let mut echo = EchoServer::new(80, 2, 16384);
    let started = Instant::now();
    let client = thread::spawn(move || {
        for i in 0..100u64 {
            let data = pattern(100 + i as usize * 37, i);
            assert_eq!(echo_client(addr, data.clone()), data, "connection {i}");
        }
    });
    drive(&mut world, &mut echo, vec![client]);
    eprintln!(
        "100 sequential forwarded connections in {:?}",
        started.elapsed()
    );
    let stats = world.net.stats();
    assert_eq!(stats.tcp_forwarded, 100);
    assert_eq!(stats.tcp_active, 0, "all sockets removed: {stats:?}");
    assert_eq!(echo.served, 100);
}

#[test]
fn forward_sixteen_concurrent_connections() {
    let (mut world, addr) = world();
    let mut echo = EchoServer::new(80, 20, 16384);
    let started = Instant::now();
    let clients = (0..16u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pattern(200_000 + i as usize * 1000, i + 7);
                assert_eq!(echo_client(addr, data.clone()), data, "client {i}");
            })
        })
        .collect();
    drive(&mut world, &mut echo, clients);
    eprintln!(
        "16 concurrent forwarded connections, ~200 KB each way each, in {:?}",
        started.elapsed()
    );
    let stats = world.net.stats();
    assert_eq!(stats.tcp_forwarded, 16);
    assert_eq!(stats.tcp_active, 0);
}

#[test]
fn forward_bulk_transfer_with_back_pressure() {
    let (mut world, addr) = world();
    // Small guest buffers so the guest is the bottleneck and the backend must hold back.
    let mut echo = EchoServer::new(80, 1, 8192);
    let data = pattern(4 << 20, 99);
    let expect = data.clone();
    let started = Instant::now();
    let client = thread::spawn(move || echo_client(addr, data));
    let got = drive(&mut world, &mut echo, vec![client]).pop().unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(
        got == expect,
        "4 MiB echoed byte-exact (got {} bytes)",
        got.len()
    );
    let stats = world.net.stats();
    eprintln!(
        "4 MiB echoed through the forward in {secs:.2} s ({:.1} MiB/s each way), {} frames",
        4.0 / secs,
        world.frames
    );
    assert_eq!(stats.tcp_bytes_from_guest, 4 << 20);
    assert_eq!(stats.tcp_bytes_to_guest, 4 << 20);
}

#[test]
fn forward_to_closed_guest_port_resets_host_client() {
    let cfg = UserNetConfig {
        forwards: vec![Forward::new("127.0.0.1:0".parse().unwrap(), 81)],
        ..UserNetConfig::default()
    };
    let mut world = World::new(cfg, true);
    let addr = world.net.forwards()[0].host;
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    world.run(Duration::from_secs(30), |_| client.is_finished());
    let res = client.join().unwrap();
    assert!(
        matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "host client sees a reset: {res:?}"
    );
    world.run(Duration::from_secs(5), |_| true);
    assert_eq!(world.net.stats().tcp_active, 0);
}

#[test]
fn forward_host_reset_resets_guest() {
    let (mut world, addr) = world();
    let h = world.guest.new_tcp(16384);
    world.guest.tcp(h).listen(80).unwrap();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(100));
        // Abortive close: SO_LINGER 0 makes the close send a RST.
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a linger struct of the given size.
        let ret = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            )
        };
        assert_eq!(ret, 0);
    });
    let mut saw_established = false;
    let mut saw_close_wait = false;
    world.run(Duration::from_secs(30), |g| {
        let s = g.tcp(h);
        saw_established |= s.state() == smoltcp::socket::tcp::State::Established;
        saw_close_wait |= s.state() == smoltcp::socket::tcp::State::CloseWait;
        client.is_finished() && s.state() == smoltcp::socket::tcp::State::Closed
    });
    assert!(saw_established);
    assert!(!saw_close_wait, "the guest saw a RST, not a FIN");
    assert_eq!(world.net.stats().tcp_active, 0);
}
