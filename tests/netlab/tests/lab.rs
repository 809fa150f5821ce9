//! The lab itself (root and iproute2 needed): the ends reach each other, the shaped rate holds,
//! a cut link stalls a connection and a restored one carries it on, and nothing is left after
//! drop, also when the owner panics.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use netlab::{exists, Pair, Shape, ADDR_B, DEV};

const T: Duration = Duration::from_secs(10);

/// A connection from A to a listener on B, and B's end of it.
fn connected(pair: &Pair) -> (TcpStream, TcpStream) {
    let l = pair.b().listen(0).unwrap();
    let port = l.local_addr().unwrap().port();
    let c = pair
        .a()
        .connect(SocketAddr::from((ADDR_B, port)), T)
        .unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

#[test]
fn ends_reach_each_other_by_ping_and_tcp() {
    let pair = Pair::new().unwrap();
    // B's address is reachable from A (ARP resolves over the veth).
    let arp = pair
        .a()
        .command("ip")
        .args(["route", "get", &ADDR_B.to_string()])
        .output()
        .unwrap();
    assert!(arp.status.success(), "{arp:?}");
    assert!(String::from_utf8_lossy(&arp.stdout).contains("dev veth0"));
    // A TCP echo from A to B.
    let (mut c, mut s) = connected(&pair);
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
    });
    c.write_all(b"hello across the veth").unwrap();
    let mut back = [0u8; 21];
    c.set_read_timeout(Some(T)).unwrap();
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello across the veth");
    echo.join().unwrap();
    // The root namespace has no such address: nothing leaves the pair.
    let root = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&root.stdout).contains("10.77.0."));
}

/// Receives everything `c` sends (`bytes`) on `s`; returns the seconds from first to last byte.
fn timed_transfer(mut c: TcpStream, mut s: TcpStream, bytes: usize) -> f64 {
    let send = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            c.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    });
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = s.read(&mut buf).unwrap();
    let t0 = Instant::now();
    while got < bytes {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    send.join().unwrap();
    secs
}

#[test]
fn bulk_tcp_keeps_to_the_shaped_rate() {
    let pair = Pair::new().unwrap();
    pair.shape(Shape::mbit(25)).unwrap();
    let (c, s) = connected(&pair);
    let bytes = 6 << 20;
    let secs = timed_transfer(c, s, bytes);
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("25 Mbit/s link: {mbit:.1} Mbit/s measured");
    // The link's counters saw the payload and its headers (one way) and the ACKs (the other).
    let (tx, _) = pair.a().link_bytes().unwrap();
    let (_, rx) = pair.b().link_bytes().unwrap();
    assert!(
        tx >= bytes as u64 && tx < bytes as u64 * 11 / 10,
        "A sent {tx} bytes"
    );
    assert!(
        rx >= bytes as u64 && rx <= tx,
        "B received {rx} of {tx} bytes"
    );
    assert!(
        (17.5..=32.5).contains(&mbit),
        "25 Mbit/s link measured {mbit:.1} Mbit/s"
    );
    // Changed while the pair runs: a faster link is faster.
    pair.shape(Shape::mbit(100)).unwrap();
    let (c, s) = connected(&pair);
    let secs = timed_transfer(c, s, bytes);
    let fast = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("100 Mbit/s link: {fast:.1} Mbit/s measured");
    assert!(
        (70.0..=130.0).contains(&fast),
        "100 Mbit/s link measured {fast:.1} Mbit/s"
    );
}

#[test]
fn delay_and_loss_need_netem() {
    let pair = Pair::new().unwrap();
    let delayed = Shape::mbit(25).delay(Duration::from_millis(5));
    if pair.has_netem() {
        pair.shape(delayed.loss(0.1)).unwrap();
    } else {
        assert!(matches!(
            pair.shape(delayed),
            Err(netlab::Error::NoNetem(_))
        ));
        assert!(matches!(
            pair.shape(Shape::mbit(25).loss(1.0)),
            Err(netlab::Error::NoNetem(_))
        ));
    }
}

#[test]
fn a_cut_link_stalls_and_a_restored_one_resumes() {
    let pair = Pair::new().unwrap();
    let (mut c, mut s) = connected(&pair);
    c.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    s.set_read_timeout(Some(T)).unwrap();
    s.read_exact(&mut buf).unwrap();

    pair.link_down().unwrap();
    c.write_all(b"during").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let stalled = s.read(&mut buf).unwrap_err();
    assert!(
        matches!(stalled.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{stalled:?}"
    );
    // A new connection fails at once (no route while the link is down).
    let l = pair.b().listen(0).unwrap();
    let to = SocketAddr::from((ADDR_B, l.local_addr().unwrap().port()));
    let t0 = Instant::now();
    assert!(pair.a().connect(to, Duration::from_secs(2)).is_err());
    assert!(t0.elapsed() < Duration::from_secs(3));

    pair.link_up().unwrap();
    // The stalled bytes arrive (TCP retransmits) and new connections work again.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"during");
    pair.a().connect(to, T).unwrap();
}

#[test]
fn nothing_is_left_after_drop() {
    let pair = Pair::new().unwrap();
    let names = [pair.a().name().to_string(), pair.b().name().to_string()];
    let mut sleeper = pair.a().command("sleep").arg("60").spawn().unwrap();
    let deadline = Instant::now() + T;
    while pair.a().pids().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(names.iter().all(|n| exists(n)));
    drop(pair);
    for n in &names {
        assert!(!exists(n), "{n} left behind");
        assert!(!std::path::Path::new(&format!("/run/netns/{n}")).exists());
    }
    // The process started inside was ended, and no veth reached the root namespace.
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&format!("{DEV}@")));
}

#[test]
fn a_panicking_owner_leaves_nothing_either() {
    let names = std::thread::spawn(|| {
        let pair = Pair::new().unwrap();
        let names = [pair.a().name().to_string(), pair.b().name().to_string()];
        std::panic::panic_any(names);
    })
    .join()
    .unwrap_err();
    let names = names.downcast::<[String; 2]>().unwrap();
    for n in names.iter() {
        assert!(!exists(n), "{n} left behind");
    }
}

#[test]
fn pairs_of_a_killed_process_are_removed_by_the_next_one() {
    // A namespace named as a pair of a process that no longer runs (pid beyond pid_max's
    // default range of live processes here: checked).
    let dead = 4_194_000u32;
    assert!(!std::path::Path::new(&format!("/proc/{dead}")).exists());
    let name = format!("clab{dead}n0a");
    let made = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(made.success());
    assert!(netlab::stale().contains(&name));
    let pair = Pair::new().unwrap();
    assert!(!exists(&name), "{name} left behind");
    // A live process's pairs are not stale.
    assert!(!netlab::stale().iter().any(|n| n == pair.a().name()));
}
