//! A simulated guest for the user-mode backend: a second smoltcp interface whose device is
//! a pair of in-memory queues, wired to a `UserNet` by a loop in the test thread. Host-side
//! peers (std sockets) run in other threads.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use netback::{NetBackend, UserNet, UserNetConfig};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpCidr, IpProtocol, Ipv4Packet,
    Ipv4Repr,
};

pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// The guest NIC: frames in (`rx`, from the backend) and out (`tx`, to the backend).
#[derive(Default)]
pub struct QueueDev {
    pub rx: VecDeque<Vec<u8>>,
    pub tx: VecDeque<Vec<u8>>,
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for QueueDev {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The simulated guest's stack.
pub struct Guest {
    pub iface: Interface,
    pub dev: QueueDev,
    pub sockets: SocketSet<'static>,
    epoch: Instant,
}

impl Guest {
    /// A guest with a static address (10.0.2.15/24 via 10.0.2.2), or none (for DHCP).
    pub fn new(static_ip: bool) -> Self {
        let mut dev = QueueDev::default();
        let mut cfg = Config::new(HardwareAddress::Ethernet(GUEST_MAC));
        cfg.random_seed = 0x5eed;
        let mut iface = Interface::new(cfg, &mut dev, smoltcp::time::Instant::ZERO);
        if static_ip {
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(GUEST_IP.into(), 24)).unwrap();
            });
            iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        }
        Self {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            epoch: Instant::now(),
        }
    }

    pub fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    pub fn new_tcp(&mut self, buf: usize) -> SocketHandle {
        let b = || tcp::SocketBuffer::new(vec![0; buf]);
        self.sockets.add(tcp::Socket::new(b(), b()))
    }
}

/// The backend and the guest, wired together.
pub struct World {
    pub net: UserNet,
    pub guest: Guest,
    buf: Vec<u8>,
    pub frames: u64,
}

impl World {
    pub fn new(cfg: UserNetConfig, static_ip: bool) -> Self {
        Self {
            net: UserNet::new(cfg).expect("UserNet::new"),
            guest: Guest::new(static_ip),
            buf: vec![0; 2048],
            frames: 0,
        }
    }

    /// Moves frames both ways once and polls both stacks; true if any frame moved.
    pub fn step(&mut self) -> bool {
        let mut moved = false;
        while let Some(frame) = self.guest.dev.tx.pop_front() {
            self.net.send(&frame).unwrap();
            moved = true;
            self.frames += 1;
        }
        self.net.poll().unwrap();
        while let Some(n) = self.net.recv(&mut self.buf).unwrap() {
            self.guest.dev.rx.push_back(self.buf[..n].to_vec());
            moved = true;
            self.frames += 1;
        }
        self.guest.poll();
        moved || !self.guest.dev.tx.is_empty()
    }

    /// Waits (briefly) for host activity or a timer of either stack.
    pub fn wait(&mut self) {
        let guest_delay = self
            .guest
            .iface
            .poll_delay(self.guest.now(), &self.guest.sockets)
            .map(Duration::from);
        let delay = [
            self.net.next_timeout(),
            guest_delay,
            Some(Duration::from_millis(5)),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
        let mut pfd = libc::pollfd {
            fd: self.net.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = delay.as_millis() as i32;
        if ms > 0 {
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// Steps until `done` returns true; `app` runs the guest's applications after each step.
    /// Panics after `timeout`.
    pub fn run(&mut self, timeout: Duration, mut app: impl FnMut(&mut Guest) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let moved = self.step();
            if app(&mut self.guest) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out; stats: {:?}",
                self.net.stats()
            );
            if !moved {
                self.wait();
            }
        }
    }
}

/// A guest TCP echo server on one port, keeping a few sockets listening.
pub struct EchoServer {
    port: u16,
    handles: Vec<SocketHandle>,
    spare: usize,
    buf: usize,
    tmp: Vec<u8>,
    pub served: usize,
}

impl EchoServer {
    pub fn new(port: u16, spare: usize, buf: usize) -> Self {
        Self {
            port,
            handles: Vec::new(),
            spare,
            buf,
            tmp: vec![0; 16384],
            served: 0,
        }
    }

    /// Sockets with a connection (not listening).
    pub fn connected(&self, g: &mut Guest) -> usize {
        self.handles
            .iter()
            .filter(|&&h| !g.tcp(h).is_listening())
            .count()
    }

    pub fn service(&mut self, g: &mut Guest) {
        let listening = self
            .handles
            .iter()
            .filter(|&&h| g.tcp(h).is_listening())
            .count();
        for _ in listening..self.spare {
            let h = g.new_tcp(self.buf);
            g.tcp(h).listen(self.port).unwrap();
            self.handles.push(h);
        }
        let tmp = &mut self.tmp;
        let mut closed = Vec::new();
        for &h in &self.handles {
            let s = g.sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() && s.can_send() {
                let room = (s.send_capacity() - s.send_queue()).min(tmp.len());
                let n = s.recv_slice(&mut tmp[..room]).unwrap();
                if n == 0 {
                    break;
                }
                assert_eq!(s.send_slice(&tmp[..n]).unwrap(), n);
            }
            if s.state() == tcp::State::CloseWait && !s.can_recv() {
                s.close();
            }
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                closed.push(h);
            }
        }
        for h in closed {
            g.sockets.remove(h);
            self.handles.retain(|&x| x != h);
            self.served += 1;
        }
    }
}

/// Deterministic test bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Frames built and read by hand (smoltcp's wire types), for tests that speak raw Ethernet.

/// An Ethernet frame from `src` to `dst` carrying `payload`.
pub fn eth_frame(
    src: EthernetAddress,
    dst: EthernetAddress,
    ethertype: EthernetProtocol,
    payload: &[u8],
) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype,
    };
    let mut buf = vec![0; repr.buffer_len() + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut f);
    f.payload_mut().copy_from_slice(payload);
    buf
}

/// A broadcast ARP request from (`mac`, `ip`): who has `target`?
pub fn arp_request(mac: EthernetAddress, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: mac,
        source_protocol_addr: ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
    eth_frame(mac, EthernetAddress::BROADCAST, EthernetProtocol::Arp, &buf)
}

/// An IPv4 packet from `src` to `dst` carrying `body` of protocol `proto`.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, body: &[u8]) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: body.len(),
        hop_limit: 64,
    };
    let mut buf = vec![0; repr.buffer_len() + body.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
    repr.emit(&mut p, &ChecksumCapabilities::default());
    p.payload_mut().copy_from_slice(body);
    buf
}

/// An ICMP echo request (the ICMP message alone).
pub fn echo_request(ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    };
    let mut buf = vec![0; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// The sequence number and data of an ICMP echo reply from `from` in Ethernet `frame`.
pub fn echo_reply(frame: &[u8], from: Ipv4Addr) -> Option<(u16, Vec<u8>)> {
    let f = EthernetFrame::new_checked(frame).ok()?;
    let p = Ipv4Packet::new_checked(f.payload()).ok()?;
    if p.next_header() != IpProtocol::Icmp || p.src_addr() != from {
        return None;
    }
    let i = Icmpv4Packet::new_checked(p.payload()).ok()?;
    match Icmpv4Repr::parse(&i, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoReply { seq_no, data, .. } => Some((seq_no, data.to_vec())),
        _ => None,
    }
}
