//! Outbound NAT (TCP and UDP) and DHCP, seen from the simulated guest.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::thread;
use std::time::Duration;

use common::{pattern, Guest, World, GATEWAY, GUEST_IP};
use netback::{NetBackend, UserNetConfig};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::wire::{IpAddress, IpCidr, IpEndpoint};

/// A host TCP server on 127.0.0.1 echoing every connection until EOF; serves `n`
/// connections concurrently.
fn host_echo_server(n: usize) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = thread::spawn(move || {
        let conns: Vec<_> = (0..n)
            .map(|_| {
                let (mut s, _) = listener.accept().unwrap();
                thread::spawn(move || {
                    let mut buf = vec![0; 65536];
                    loop {
                        let n = s.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        s.write_all(&buf[..n]).unwrap();
                    }
                })
            })
            .collect();
        for c in conns {
            c.join().unwrap();
        }
    });
    (port, t)
}

/// A guest TCP client sending `data`, closing, and collecting what comes back.
struct Client {
    h: SocketHandle,
    data: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    established: bool,
    finished: bool,
}

impl Client {
    fn connect(g: &mut Guest, dst: (Ipv4Addr, u16), local_port: u16, data: Vec<u8>) -> Self {
        let h = g.new_tcp(65536);
        let (iface, sockets) = (&mut g.iface, &mut g.sockets);
        sockets
            .get_mut::<tcp::Socket>(h)
            .connect(iface.context(), dst, local_port)
            .unwrap();
        Self {
            h,
            data,
            sent: 0,
            got: Vec::new(),
            established: false,
            finished: false,
        }
    }

    /// Advances; true once the peer closed (or the connection died).
    fn service(&mut self, g: &mut Guest) -> bool {
        let s = g.tcp(self.h);
        self.established |= s.state() == tcp::State::Established;
        if s.can_send() && self.sent < self.data.len() {
            self.sent += s.send_slice(&self.data[self.sent..]).unwrap();
            if self.sent == self.data.len() {
                s.close();
            }
        }
        let mut buf = [0u8; 8192];
        while s.can_recv() {
            let n = s.recv_slice(&mut buf).unwrap();
            self.got.extend_from_slice(&buf[..n]);
        }
        if !s.may_recv() && !matches!(s.state(), tcp::State::SynSent) {
            self.finished = true;
        }
        self.finished || (s.state() == tcp::State::Closed && self.sent > 0)
    }
}

#[test]
fn tcp_to_gateway_reaches_host_loopback() {
    let (port, server) = host_echo_server(1);
    let mut world = World::new(UserNetConfig::default(), true);
    let data = pattern(2 << 20, 5);
    let mut c = Client::connect(&mut world.guest, (GATEWAY, port), 40000, data.clone());
    world.run(Duration::from_secs(60), |g| c.service(g));
    assert!(c.established);
    assert!(
        c.got == data,
        "2 MiB round trip byte-exact (got {} bytes)",
        c.got.len()
    );
    server.join().unwrap();
    world.run(Duration::from_secs(10), |g| {
        g.tcp(c.h).state() == tcp::State::Closed || g.tcp(c.h).state() == tcp::State::TimeWait
    });
    let stats = world.net.stats();
    assert_eq!(stats.tcp_outbound, 1);
    assert_eq!(stats.tcp_bytes_from_guest, 2 << 20);
    world.run(Duration::from_secs(10), |_| true);
}

#[test]
fn concurrent_connections_to_one_destination_stay_paired() {
    let (port, server) = host_echo_server(8);
    let mut world = World::new(UserNetConfig::default(), true);
    let mut clients: Vec<Client> = (0..8u16)
        .map(|i| {
            let data = pattern(50_000 + usize::from(i) * 999, u64::from(i) + 1);
            Client::connect(&mut world.guest, (GATEWAY, port), 41000 + i, data)
        })
        .collect();
    world.run(Duration::from_secs(60), |g| {
        let mut all = true;
        for c in &mut clients {
            all &= c.service(g);
        }
        all
    });
    for (i, c) in clients.iter().enumerate() {
        assert!(c.got == c.data, "client {i}: its own bytes came back");
    }
    server.join().unwrap();
    assert_eq!(world.net.stats().tcp_outbound, 8);
}

#[test]
fn refused_host_connect_resets_the_guest() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut world = World::new(UserNetConfig::default(), true);
    let mut c = Client::connect(&mut world.guest, (GATEWAY, port), 40001, b"x".to_vec());
    world.run(Duration::from_secs(10), |g| {
        c.service(g);
        g.tcp(c.h).state() == tcp::State::Closed
    });
    assert!(!c.established, "the guest never saw the connection open");
    let stats = world.net.stats();
    assert_eq!(
        (stats.tcp_refused, stats.tcp_outbound, stats.tcp_active),
        (1, 0, 0)
    );
}

#[test]
fn outbound_disabled_refuses() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = UserNetConfig {
        outbound: false,
        ..UserNetConfig::default()
    };
    let mut world = World::new(cfg, true);
    let mut c = Client::connect(&mut world.guest, (GATEWAY, port), 40002, b"x".to_vec());
    world.run(Duration::from_secs(10), |g| {
        c.service(g);
        g.tcp(c.h).state() == tcp::State::Closed
    });
    assert!(!c.established);
    assert!(listener.accept().is_err(), "nothing reached the host");
}

#[test]
fn udp_round_trip_through_the_gateway() {
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            let (n, from) = host.recv_from(&mut buf).unwrap();
            let reply: Vec<u8> = buf[..n].iter().map(u8::to_ascii_uppercase).collect();
            host.send_to(&reply, from).unwrap();
        }
    });
    let cfg = UserNetConfig {
        udp_idle_timeout: Duration::from_millis(300),
        ..UserNetConfig::default()
    };
    let mut world = World::new(cfg, true);
    let rx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]);
    let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 8192]);
    let h = world.guest.sockets.add(udp::Socket::new(rx, tx));
    let dst = IpEndpoint::new(IpAddress::Ipv4(GATEWAY), port);
    let mut replies = Vec::new();
    {
        let s = world.guest.sockets.get_mut::<udp::Socket>(h);
        s.bind(5000).unwrap();
        for msg in [&b"one"[..], b"two", b"three"] {
            s.send_slice(msg, dst).unwrap();
        }
    }
    world.run(Duration::from_secs(10), |g| {
        let s = g.sockets.get_mut::<udp::Socket>(h);
        let mut buf = [0u8; 64];
        while let Ok((n, meta)) = s.recv_slice(&mut buf) {
            assert_eq!(meta.endpoint, dst, "replies come from the gateway address");
            replies.push(buf[..n].to_vec());
        }
        replies.len() == 3
    });
    server.join().unwrap();
    replies.sort();
    assert_eq!(
        replies,
        vec![b"ONE".to_vec(), b"THREE".to_vec(), b"TWO".to_vec()]
    );
    let stats = world.net.stats();
    assert_eq!(
        (stats.udp_to_host, stats.udp_to_guest, stats.udp_bindings),
        (3, 3, 1)
    );
    // The idle binding expires; next_timeout asked for the poll that expires it.
    let t = world.net.next_timeout().unwrap();
    assert!(t <= Duration::from_millis(300), "{t:?}");
    thread::sleep(Duration::from_millis(350));
    world.net.poll().unwrap();
    assert_eq!(world.net.stats().udp_bindings, 0);
}

#[test]
fn dhcp_gives_the_guest_its_address_and_gateway() {
    let cfg = UserNetConfig {
        dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
        ..UserNetConfig::default()
    };
    let mut world = World::new(cfg, false);
    let h = world.guest.sockets.add(dhcpv4::Socket::new());
    let mut lease = None;
    world.run(Duration::from_secs(30), |g| {
        if let Some(dhcpv4::Event::Configured(c)) = g.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
            lease = Some((
                c.address,
                c.router,
                c.dns_servers.to_vec(),
                c.server.identifier,
            ));
        }
        lease.is_some()
    });
    let (address, router, dns, server) = lease.unwrap();
    assert_eq!(address, smoltcp::wire::Ipv4Cidr::new(GUEST_IP, 24));
    assert_eq!(router, Some(GATEWAY));
    assert_eq!(dns, vec![Ipv4Addr::new(9, 9, 9, 9)]);
    assert_eq!(server, GATEWAY);
    assert!(world.net.stats().dhcp_replies >= 2, "an OFFER and an ACK");

    // With the leased address, the guest can use the network.
    world
        .guest
        .iface
        .update_ip_addrs(|a| a.push(IpCidr::Ipv4(address)).unwrap());
    world
        .guest
        .iface
        .routes_mut()
        .add_default_ipv4_route(GATEWAY)
        .unwrap();
    let (port, server) = host_echo_server(1);
    let mut c = Client::connect(
        &mut world.guest,
        (GATEWAY, port),
        40003,
        b"after dhcp".to_vec(),
    );
    world.run(Duration::from_secs(10), |g| c.service(g));
    assert_eq!(c.got, b"after dhcp");
    server.join().unwrap();
}
