//! The service over TCP: smoltcp on the virtio-net device, [`SOCKETS`] listening sockets on
//! one port, each connection carrying length-prefixed request/reply frames
//! (`micro_service::frame`). Every buffer is static (the arena): 4 KiB receive and 4 KiB
//! transmit per socket.
//!
//! Connections are served round-robin from the main loop: a whole request frame is taken
//! only when the socket's transmit buffer has room for the largest reply, so replies are
//! never cut. When the client closes its half, the guest answers what it already received
//! and closes too. A socket whose connection has ended listens again.

use micro_service::cmdline::IpConfig;
use micro_service::frame::{self, MAX_REPLY, MAX_REQUEST, TOO_LONG_REPLY};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{dhcpv4, tcp};
use smoltcp::time::Duration;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

use crate::arena;
use crate::clock;
use crate::net::Net;

/// TCP sockets: at most this many connections at once (a further client is refused with a
/// reset until one ends).
pub const SOCKETS: usize = 24;
/// Per-socket receive and transmit buffer bytes.
const SOCKET_BUF: usize = 4096;

/// What answers requests: returns the reply text and, for `poweroff`, the code to power off
/// with once the reply is sent.
pub trait Handler {
    /// Answers one request (the frame's payload).
    fn handle(&mut self, request: &[u8]) -> (&[u8], Option<u8>);

    /// Called when a request powers the guest off, once its reply is sent: finishes other
    /// output in flight.
    fn before_poweroff(&mut self) {}
}

/// The interface, its sockets and the device.
pub struct Server {
    iface: Interface,
    dev: Net,
    sockets: SocketSet<'static>,
    tcp: [SocketHandle; SOCKETS],
    dhcp: Option<SocketHandle>,
    port: u16,
    request: [u8; MAX_REQUEST],
}

impl Server {
    /// Brings up the interface on `dev` with `ip` and listens on `port`.
    pub fn new(mut dev: Net, ip: IpConfig, port: u16, seed: u64) -> Server {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(dev.mac)));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut dev, clock::now());
        let storage = arena::leak([SocketStorage::EMPTY; SOCKETS + 1]);
        let mut sockets = SocketSet::new(&mut storage[..]);
        let tcp = core::array::from_fn(|_| {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(arena::bytes(SOCKET_BUF, 64)),
                tcp::SocketBuffer::new(arena::bytes(SOCKET_BUF, 64)),
            );
            s.set_nagle_enabled(false);
            // Probe idle peers every 30 s; give up on one silent for 90 s.
            s.set_keep_alive(Some(Duration::from_secs(30)));
            s.set_timeout(Some(Duration::from_secs(90)));
            sockets.add(s)
        });
        let dhcp = match ip {
            IpConfig::Static {
                addr,
                prefix,
                gateway,
            } => {
                let [a, b, c, d] = addr;
                iface.update_ip_addrs(|addrs| {
                    let _ = addrs.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), prefix));
                });
                if let Some([a, b, c, d]) = gateway {
                    let _ = iface
                        .routes_mut()
                        .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
                }
                None
            }
            IpConfig::Dhcp => Some(sockets.add(dhcpv4::Socket::new())),
        };
        Server {
            iface,
            dev,
            sockets,
            tcp,
            dhcp,
            port,
            request: [0; MAX_REQUEST],
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.dev.mac
    }

    /// The IPv4 address and prefix length, once there is one.
    pub fn ipv4(&self) -> Option<([u8; 4], u8)> {
        self.iface.ip_addrs().first().map(|c| {
            let IpCidr::Ipv4(c) = c;
            (c.address().octets(), c.prefix_len())
        })
    }

    /// The service's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The device's interrupt line when it reaches the 8259 (else the main loop polls).
    pub fn irq(&self) -> Option<u32> {
        self.dev.irq_ok.then_some(self.dev.irq)
    }

    /// Acknowledges the device's interrupt (before [`Server::poll`] looks for work).
    pub fn ack_interrupt(&self) {
        self.dev.ack_interrupt();
    }

    /// Moves packets, serves whole requests with `handler`, notifies the device. Returns true
    /// when anything happened (the caller polls again before sleeping).
    pub fn poll(&mut self, handler: &mut impl Handler) -> bool {
        let now = clock::now();
        let mut busy = self.iface.poll(now, &mut self.dev, &mut self.sockets)
            != smoltcp::iface::PollResult::None;
        self.dhcp_events();
        let mut power_off = None;
        for &h in &self.tcp {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if !s.is_open() {
                // A fresh or finished socket: wait for the next connection.
                let _ = s.listen(self.port);
                continue;
            }
            let (served, whole_frames_left) = serve(s, &mut self.request, handler, &mut power_off);
            busy |= served;
            if s.state() == tcp::State::CloseWait && !whole_frames_left {
                // The client is done sending and everything it sent is answered.
                s.close();
                busy = true;
            }
            if power_off.is_some() {
                break;
            }
        }
        if busy {
            // Send what the requests produced right away.
            self.iface
                .poll_egress(clock::now(), &mut self.dev, &mut self.sockets);
        }
        self.dev.flush();
        if let Some(code) = power_off {
            self.drain();
            handler.before_poweroff();
            crate::cpu::poweroff(code);
        }
        busy || self.dev.rx_pending()
    }

    /// How long the stack can sleep before its next timer (None: until a packet arrives).
    pub fn poll_delay(&mut self) -> Option<u64> {
        self.iface
            .poll_delay(clock::now(), &self.sockets)
            .map(|d| d.total_micros())
    }

    /// Before powering off: gives the replies in flight up to 200 ms to be acknowledged.
    fn drain(&mut self) {
        let end = clock::micros() + 200_000;
        while clock::micros() < end {
            self.dev.ack_interrupt();
            self.iface
                .poll(clock::now(), &mut self.dev, &mut self.sockets);
            self.dev.flush();
            let pending = self.tcp.iter().any(|&h| {
                let s = self.sockets.get::<tcp::Socket>(h);
                s.may_send() && s.send_queue() > 0
            });
            if !pending {
                return;
            }
            crate::irq::sleep(Some(1000));
        }
    }

    fn dhcp_events(&mut self) {
        let Some(h) = self.dhcp else { return };
        let event = self.sockets.get_mut::<dhcpv4::Socket>(h).poll();
        match event {
            None => {}
            Some(dhcpv4::Event::Configured(c)) => {
                let (addr, router): (Ipv4Cidr, _) = (c.address, c.router);
                self.iface.update_ip_addrs(|addrs| {
                    addrs.clear();
                    let _ = addrs.push(IpCidr::Ipv4(addr));
                });
                match router {
                    Some(r) => {
                        let _ = self.iface.routes_mut().add_default_ipv4_route(r);
                    }
                    None => {
                        self.iface.routes_mut().remove_default_ipv4_route();
                    }
                }
            }
            Some(dhcpv4::Event::Deconfigured) => {
                self.iface.update_ip_addrs(|addrs| addrs.clear());
                self.iface.routes_mut().remove_default_ipv4_route();
            }
        }
    }
}

/// Answers the whole request frames waiting on `s` while its transmit buffer has room.
/// Returns (whether it answered any, whether whole frames are still waiting).
fn serve(
    s: &mut tcp::Socket<'_>,
    request: &mut [u8; MAX_REQUEST],
    handler: &mut impl Handler,
    power_off: &mut Option<u8>,
) -> (bool, bool) {
    let mut served = false;
    // Only an open sending half can answer (not while the handshake is still going on, not
    // after we closed).
    while s.may_send() && power_off.is_none() {
        let mut head = [0u8; frame::HEADER];
        if s.peek_slice(&mut head) != Ok(frame::HEADER) {
            return (served, false);
        }
        let room = s.send_capacity() - s.send_queue();
        let len = match frame::payload_len(head, MAX_REQUEST) {
            Ok(len) => len,
            Err(_) => {
                if room < frame::HEADER + TOO_LONG_REPLY.len() {
                    return (served, true);
                }
                let _ = s.send_slice(&frame::header(TOO_LONG_REPLY.len()));
                let _ = s.send_slice(TOO_LONG_REPLY);
                // The rest of that request is not read: end the connection.
                s.close();
                return (true, false);
            }
        };
        if s.recv_queue() < frame::HEADER + len {
            return (served, false);
        }
        if room < frame::HEADER + MAX_REPLY {
            return (served, true);
        }
        let _ = s.recv_slice(&mut head);
        let got = s.recv_slice(&mut request[..len]).unwrap_or(0);
        let (reply, off) = handler.handle(&request[..got]);
        let reply = &reply[..reply.len().min(MAX_REPLY)];
        let _ = s.send_slice(&frame::header(reply.len()));
        let _ = s.send_slice(reply);
        *power_off = off;
        served = true;
    }
    (served, false)
}
