//! User-mode networking: the VMM is the guest's gateway, built on smoltcp; no root needed.
//!
//! ```text
//!  guest NIC ──send()──▶ inspect ──┬─ ARP/ping for the gateway, TCP ─▶ to_stack ─▶ smoltcp
//!                                  ├─ DHCP ─▶ dhcp::reply ─────────────────────┐  Interface
//!                                  ├─ UDP ──▶ udp::UdpNat ─▶ host UdpSocket    │  (any-IP)
//!                                  └─ malformed / other: dropped, counted      ▼     │
//!  guest NIC ◀──recv()── to_guest ◀───────────────────────────────────────────────────┘
//!                                  smoltcp TCP sockets ◀─ tcp::TcpConn ─▶ host TcpStream
//! ```
//!
//! - **Addresses** (defaults as slirp): network 10.0.2.0/24, gateway 10.0.2.2 (MAC
//!   52:55:0a:00:02:02), guest 10.0.2.15. The gateway answers ARP and ping for itself only.
//! - **DHCP**: [`dhcp`] answers DISCOVER/REQUEST with the guest address, router = gateway.
//! - **Outbound TCP**: the interface accepts any destination IP (`set_any_ip`). A guest SYN
//!   for a new 4-tuple starts a non-blocking host connect to the same destination (the
//!   gateway meaning 127.0.0.1) and is held back; when the connect succeeds, a smoltcp socket
//!   listening on exactly that destination is created and the SYN handed to the stack; when
//!   it fails, the SYN goes to the stack with no listener and the stack answers RST.
//! - **Port forwards**: a host `TcpListener` per [`Forward`]; each accepted connection gets a
//!   smoltcp socket connecting from the gateway (ports 49152..65535, cycled) to the guest.
//! - **UDP**: relayed through one host socket per guest source port ([`udp`]).
//! - **Events**: one epoll fd ([`NetBackend::event_fd`]) holds the listeners, streams and
//!   UDP sockets (edge-triggered; readiness is remembered per connection until WouldBlock)
//!   and an eventfd raised when `send` queued work or `recv` made room.
//! - **Bounds**: both frame queues hold [`QUEUE_FRAMES`] frames; TCP data lives only in the
//!   sockets' fixed buffers; connections and UDP bindings are capped by the config.

mod config;
mod device;
mod dhcp;
mod tcp;
mod udp;
mod wire;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config as IfaceConfig, Interface, SocketSet};
use smoltcp::socket::tcp as stcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, IpListenEndpoint};

pub use config::{ConfigError, Forward, ForwardParseError, UserNetConfig};

use crate::sys::{self, Epoll, EventFd};
use crate::NetBackend;
use device::Queues;
use tcp::{ConnectOutcome, Origin, PendingConnect, Pump, TcpConn};
use wire::Verdict;

/// Frames each of the two in-memory queues (guest → stack, stack → guest) holds.
pub const QUEUE_FRAMES: usize = 1024;

/// First local port of forwarded connections on the gateway side.
const FORWARD_PORT_FIRST: u16 = 49152;

/// Where this backend starts numbering its connections to the guest: somewhere random in
/// the range, not always 49152. A VM restored from a snapshot may still hold a connection
/// from its previous life on (gateway, port) → guest; starting at the same port again made
/// the first new connection collide with it and hang until the guest's stale socket timed
/// out (~30 s).
fn first_forward_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let span = u64::from(u16::MAX - FORWARD_PORT_FIRST) + 1;
    FORWARD_PORT_FIRST + (h.finish() % span) as u16
}
/// Stack/relay rounds per [`UserNet::poll`] before yielding back to the caller.
const MAX_ROUNDS: usize = 8;

pub(crate) const KIND_KICK: u64 = 0;
pub(crate) const KIND_LISTENER: u64 = 1;
pub(crate) const KIND_TCP: u64 = 2;
pub(crate) const KIND_UDP: u64 = 3;
const ID_MASK: u64 = (1 << 56) - 1;

/// An epoll token: the kind of descriptor in the top byte, its id below.
pub(crate) fn token(kind: u64, id: u64) -> u64 {
    (kind << 56) | (id & ID_MASK)
}

/// Why a [`UserNet`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    /// The configuration is invalid.
    #[error("invalid user-mode network configuration")]
    Config(#[from] ConfigError),
    /// A port forward's host address cannot be listened on.
    #[error("cannot listen on {} for port forward {forward}: is the port taken? (port 0 picks a free one)", forward.host)]
    Listen {
        /// The forward.
        forward: Forward,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The epoll instance or eventfd cannot be created.
    #[error("cannot create the backend's epoll/eventfd descriptors (open-file limit?)")]
    Events(#[source] io::Error),
}

/// Counters of a [`UserNet`], see [`UserNet::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserNetStats {
    /// Frames the guest sent.
    pub frames_from_guest: u64,
    /// Frames handed to the guest.
    pub frames_to_guest: u64,
    /// Guest frames dropped as malformed (truncated, oversized, bad checksum or header).
    pub dropped_malformed: u64,
    /// Well-formed guest frames nobody handles (IPv6, other ethertypes, IP fragments, ARP for
    /// other hosts, ICMP other than ping to the gateway, broadcast UDP, NAT disabled).
    pub dropped_unsupported: u64,
    /// Frames dropped because a queue was full, or too large for the caller's buffer.
    pub dropped_queue_full: u64,
    /// DHCP replies sent.
    pub dhcp_replies: u64,
    /// Host connections accepted on port forwards.
    pub tcp_forwarded: u64,
    /// Guest connections relayed to a host destination.
    pub tcp_outbound: u64,
    /// Guest connections refused (host connect failed, limit reached).
    pub tcp_refused: u64,
    /// TCP connections open now (including outbound connects in progress).
    pub tcp_active: u64,
    /// TCP payload bytes relayed host → guest.
    pub tcp_bytes_to_guest: u64,
    /// TCP payload bytes relayed guest → host.
    pub tcp_bytes_from_guest: u64,
    /// UDP datagrams relayed guest → host.
    pub udp_to_host: u64,
    /// UDP datagrams relayed host → guest.
    pub udp_to_guest: u64,
    /// UDP datagrams dropped (send failures, replies larger than one frame).
    pub udp_dropped: u64,
    /// UDP bindings open now.
    pub udp_bindings: u64,
}

#[derive(Debug)]
struct Listener {
    listener: TcpListener,
    /// The forward with its actual host address.
    forward: Forward,
    guest: SocketAddrV4,
    readable: bool,
}

/// User-mode networking: the VMM as the guest's gateway on smoltcp (ARP and ping, DHCP,
/// port forwards, outbound TCP/UDP NAT). The design is described in the crate's README.
pub struct UserNet {
    cfg: UserNetConfig,
    gateway_mac: EthernetAddress,
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    epoll: Epoll,
    kick: EventFd,
    kicked: bool,
    listeners: Vec<Listener>,
    conns: HashMap<u64, TcpConn>,
    pending: HashMap<u64, PendingConnect>,
    udp: udp::UdpNat,
    next_id: u64,
    next_port: u16,
    epoch: Instant,
    stats: UserNetStats,
}

impl std::fmt::Debug for UserNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNet")
            .field("gateway", &self.cfg.gateway)
            .field("guest", &self.cfg.guest)
            .field("forwards", &self.forwards())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl UserNet {
    /// Creates the gateway and binds the port forwards' host listeners.
    pub fn new(cfg: UserNetConfig) -> Result<Self, UserNetError> {
        cfg.validate()?;
        let gateway_mac = EthernetAddress(cfg.gateway_mac);
        let epoch = Instant::now();
        let mut queues = Queues::new(QUEUE_FRAMES);

        let mut iface_cfg = IfaceConfig::new(HardwareAddress::Ethernet(gateway_mac));
        // Seeds TCP initial sequence numbers; RandomState is seeded by the OS.
        iface_cfg.random_seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let mut iface = Interface::new(iface_cfg, &mut queues, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(cfg.gateway.into(), cfg.prefix_len));
        });
        // Any destination is "ours": outbound TCP is terminated here.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.gateway);

        let epoll = Epoll::new().map_err(UserNetError::Events)?;
        let kick = EventFd::new().map_err(UserNetError::Events)?;
        epoll
            .add(kick.fd(), libc::EPOLLIN as u32, token(KIND_KICK, 0))
            .map_err(UserNetError::Events)?;

        let mut listeners = Vec::new();
        for (i, fwd) in cfg.forwards.iter().enumerate() {
            let listen_err = |source| UserNetError::Listen {
                forward: fwd.clone(),
                source,
            };
            let listener = TcpListener::bind(fwd.host).map_err(listen_err)?;
            listener.set_nonblocking(true).map_err(listen_err)?;
            let host = listener.local_addr().map_err(listen_err)?;
            let events = (libc::EPOLLIN | libc::EPOLLET) as u32;
            epoll
                .add(listener.as_raw_fd(), events, token(KIND_LISTENER, i as u64))
                .map_err(UserNetError::Events)?;
            let forward = Forward {
                host,
                ..fwd.clone()
            };
            let guest = SocketAddrV4::new(fwd.guest_ip.unwrap_or(cfg.guest), fwd.guest_port);
            tracing::info!(%host, %guest, "port forward listening");
            listeners.push(Listener {
                listener,
                forward,
                guest,
                readable: true,
            });
        }

        Ok(Self {
            gateway_mac,
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            epoll,
            kick,
            kicked: false,
            listeners,
            conns: HashMap::new(),
            pending: HashMap::new(),
            udp: udp::UdpNat::new(),
            next_id: 0,
            next_port: first_forward_port(),
            epoch,
            stats: UserNetStats::default(),
            cfg,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &UserNetConfig {
        &self.cfg
    }

    /// The port forwards with the host addresses actually bound (port 0 resolved).
    pub fn forwards(&self) -> Vec<Forward> {
        self.listeners.iter().map(|l| l.forward.clone()).collect()
    }

    /// The counters.
    pub fn stats(&self) -> UserNetStats {
        UserNetStats {
            dropped_queue_full: self.stats.dropped_queue_full + self.queues.dropped,
            tcp_active: (self.conns.len() + self.pending.len()) as u64,
            udp_bindings: self.udp.len() as u64,
            ..self.stats
        }
    }

    fn now(&self) -> smoltcp::time::Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(micros)
    }

    /// Raises the eventfd so the caller's loop calls [`NetBackend::poll`].
    fn kick(&mut self) {
        if !self.kicked {
            self.kicked = true;
            self.kick.signal();
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues a frame for the stack, running the stack first if the queue is full.
    fn queue_for_stack(&mut self, frame: Vec<u8>) {
        if self.queues.to_stack.len() >= self.queues.capacity {
            self.run_stack(Instant::now());
        }
        self.queues.to_stack.push_back(frame);
        self.kick();
    }

    /// Where outbound traffic to `dst` goes on the host, if it is relayed at all.
    fn nat_target(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        if !self.cfg.outbound {
            None
        } else if dst == self.cfg.gateway {
            Some(Ipv4Addr::LOCALHOST)
        } else if self.cfg.in_network(dst) || !wire::is_unicast(dst) {
            None
        } else {
            Some(dst)
        }
    }

    fn tcp_socket_for(&self, guest: SocketAddrV4, dst: SocketAddrV4) -> bool {
        self.conns.values().any(|c| {
            TcpConn::tuple(self.sockets.get::<stcp::Socket>(c.handle)) == Some((guest, dst))
        })
    }

    /// A guest SYN: pass it on for a known connection, or start the host connect.
    fn on_syn(&mut self, guest: SocketAddrV4, dst: SocketAddrV4, frame: &[u8]) {
        if self.tcp_socket_for(guest, dst) {
            return self.queue_for_stack(frame.to_vec());
        }
        if self
            .pending
            .values()
            .any(|p| p.guest == guest && p.dst == dst)
        {
            return; // A retransmitted SYN while the host connect is in progress.
        }
        let Some(target) = self.nat_target(*dst.ip()) else {
            // No listener: the stack answers RST.
            return self.queue_for_stack(frame.to_vec());
        };
        if self.conns.len() + self.pending.len() >= self.cfg.max_tcp_connections {
            tracing::warn!(%guest, %dst, limit = self.cfg.max_tcp_connections, "TCP connection limit reached; refusing");
            self.stats.tcp_refused += 1;
            return self.queue_for_stack(frame.to_vec());
        }
        let id = self.next_id();
        let target = SocketAddrV4::new(target, dst.port());
        let started = sys::connect_nonblocking(target).and_then(|stream| {
            let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            self.epoll
                .add(stream.as_raw_fd(), events, token(KIND_TCP, id))?;
            Ok(stream)
        });
        match started {
            Ok(stream) => {
                tracing::debug!(%guest, %dst, %target, "outbound TCP connect started");
                let deadline = Instant::now() + self.cfg.connect_timeout;
                let syn = frame.to_vec();
                self.pending.insert(
                    id,
                    PendingConnect {
                        stream,
                        guest,
                        dst,
                        syn,
                        deadline,
                        ready: false,
                    },
                );
            }
            Err(e) => {
                tracing::debug!(%guest, %dst, %target, "outbound TCP connect failed: {e}");
                self.stats.tcp_refused += 1;
                self.queue_for_stack(frame.to_vec());
            }
        }
    }

    fn new_socket(&self) -> stcp::Socket<'static> {
        let buf = || stcp::SocketBuffer::new(vec![0; self.cfg.tcp_buffer]);
        let mut sock = stcp::Socket::new(buf(), buf());
        // The host side already coalesces; don't add Nagle delays on top. ACK at once: a
        // delayed ACK meets the guest's Nagle and stalls small exchanges ~10 ms each
        // (measured: 100 sequential echo connections 1.0 s → 0.1 s).
        sock.set_nagle_enabled(false);
        sock.set_ack_delay(None);
        sock.set_timeout(Some(self.cfg.connect_timeout.into()));
        sock
    }

    /// Hands held SYNs to the stack for connects that finished; at most one per destination
    /// per round, so each SYN meets the listener created for it.
    fn resolve_pending(&mut self, now: Instant) -> bool {
        let mut progress = false;
        let mut seen: HashSet<SocketAddrV4> = HashSet::new();
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if seen.contains(&p.dst) {
                progress = true;
                continue;
            }
            let outcome = p.outcome(now);
            if matches!(outcome, ConnectOutcome::Waiting) {
                continue;
            }
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            seen.insert(p.dst);
            progress = true;
            match outcome {
                ConnectOutcome::Connected => {
                    let mut sock = self.new_socket();
                    let endpoint = IpListenEndpoint {
                        addr: Some((*p.dst.ip()).into()),
                        port: p.dst.port(),
                    };
                    if let Err(e) = sock.listen(endpoint) {
                        tracing::warn!(dst = %p.dst, "cannot listen for an outbound connection: {e}");
                        continue;
                    }
                    let _ = p.stream.set_nodelay(true);
                    let handle = self.sockets.add(sock);
                    self.conns
                        .insert(id, TcpConn::new(handle, Origin::Outbound, p.stream));
                    self.stats.tcp_outbound += 1;
                    tracing::debug!(guest = %p.guest, dst = %p.dst, "outbound TCP connected");
                }
                ConnectOutcome::Failed(e) => {
                    tracing::debug!(guest = %p.guest, dst = %p.dst, "outbound TCP connect failed: {e}");
                    self.stats.tcp_refused += 1;
                }
                ConnectOutcome::Waiting => {}
            }
            self.queues.to_stack.push_back(p.syn);
        }
        progress
    }

    /// A free gateway-side port for a forwarded connection.
    fn alloc_port(&mut self) -> u16 {
        let in_use: HashSet<u16> = self
            .conns
            .values()
            .filter(|c| c.origin == Origin::Forward)
            .filter_map(|c| self.sockets.get::<stcp::Socket>(c.handle).local_endpoint())
            .map(|ep| ep.port)
            .collect();
        let mut port = self.next_port;
        for _ in FORWARD_PORT_FIRST..=u16::MAX {
            port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FORWARD_PORT_FIRST);
            if !in_use.contains(&port) {
                break;
            }
        }
        port
    }

    fn accept_forwards(&mut self) {
        for i in 0..self.listeners.len() {
            while self.listeners[i].readable {
                match self.listeners[i].listener.accept() {
                    Ok((stream, peer)) => self.start_forward(i, stream, peer),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.listeners[i].readable = false
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                        ) => {}
                    Err(e) => {
                        tracing::warn!(host = %self.listeners[i].forward.host, "port forward accept failed: {e}");
                        self.listeners[i].readable = false;
                    }
                }
            }
        }
    }

    fn start_forward(&mut self, i: usize, stream: TcpStream, peer: SocketAddr) {
        let guest = self.listeners[i].guest;
        if self.conns.len() + self.pending.len() >= self.cfg.max_tcp_connections {
            tracing::warn!(%peer, limit = self.cfg.max_tcp_connections, "TCP connection limit reached; closing forwarded connection");
            let _ = sys::set_linger_zero(&stream);
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!(%peer, "cannot make a forwarded connection non-blocking: {e}");
            return;
        }
        let _ = stream.set_nodelay(true);
        let port = self.alloc_port();
        let mut sock = self.new_socket();
        if let Err(e) = sock.connect(self.iface.context(), (*guest.ip(), guest.port()), port) {
            tracing::warn!(%guest, "cannot connect to the guest: {e}");
            return;
        }
        let id = self.next_id();
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if let Err(e) = self
            .epoll
            .add(stream.as_raw_fd(), events, token(KIND_TCP, id))
        {
            tracing::warn!(%peer, "cannot watch a forwarded connection: {e}");
            return;
        }
        let handle = self.sockets.add(sock);
        self.conns
            .insert(id, TcpConn::new(handle, Origin::Forward, stream));
        self.stats.tcp_forwarded += 1;
        tracing::debug!(%peer, %guest, port, "forwarded connection");
    }

    /// Runs the relays of all connections; removes finished ones.
    fn pump_conns(&mut self) -> bool {
        let mut progress = false;
        let mut done = Vec::new();
        for (&id, conn) in self.conns.iter_mut() {
            let sock = self.sockets.get_mut::<stcp::Socket>(conn.handle);
            match conn.pump(sock, &mut self.stats) {
                Pump::Idle => {}
                Pump::Progress => progress = true,
                Pump::Done => done.push(id),
            }
        }
        for id in done {
            if let Some(conn) = self.conns.remove(&id) {
                self.sockets.remove(conn.handle);
            }
        }
        progress
    }

    /// Alternates the stack and the relays until nothing moves (or [`MAX_ROUNDS`]).
    fn run_stack(&mut self, now: Instant) {
        for _ in 0..MAX_ROUNDS {
            let mut progress = self.resolve_pending(now);
            let ts = self.now();
            self.iface.poll(ts, &mut self.queues, &mut self.sockets);
            progress |= self.pump_conns();
            if !progress {
                break;
            }
        }
    }

    /// Reads the epoll instance and records which descriptors became ready.
    fn collect_events(&mut self) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let n = self.epoll.poll(&mut events)?;
            for ev in &events[..n] {
                let (flags, tok) = (ev.events as i32, ev.u64);
                let id = tok & ID_MASK;
                let input = flags
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                    != 0;
                let output = flags & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) != 0;
                match tok >> 56 {
                    KIND_LISTENER => {
                        if let Some(l) = usize::try_from(id)
                            .ok()
                            .and_then(|i| self.listeners.get_mut(i))
                        {
                            l.readable = true;
                        }
                    }
                    KIND_TCP => {
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.readable |= input;
                            c.writable |= output;
                        } else if let Some(p) = self.pending.get_mut(&id) {
                            p.ready = true;
                        }
                    }
                    KIND_UDP => self.udp.set_readable(id),
                    _ => {}
                }
            }
            if n < events.len() {
                return Ok(());
            }
        }
    }
}

fn min_deadline(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl NetBackend for UserNet {
    fn forwards(&self) -> Vec<Forward> {
        UserNet::forwards(self)
    }

    fn close(&mut self) {
        self.listeners.clear();
        self.conns.clear();
        self.pending.clear();
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.stats.frames_from_guest += 1;
        match wire::inspect(frame, self.cfg.gateway, self.gateway_mac) {
            Verdict::Stack => self.queue_for_stack(frame.to_vec()),
            Verdict::TcpSyn(guest, dst) => self.on_syn(guest, dst, frame),
            Verdict::TcpRst(guest, dst) => {
                // The guest gave up on a connect still in progress.
                self.pending.retain(|_, p| p.guest != guest || p.dst != dst);
                self.queue_for_stack(frame.to_vec());
            }
            Verdict::Dhcp { mac, payload } => {
                if let Some(reply) = dhcp::reply(&self.cfg, mac, payload) {
                    self.stats.dhcp_replies += 1;
                    self.queues.push_guest(reply);
                    self.kick();
                }
            }
            Verdict::Udp {
                mac,
                src,
                dst,
                payload,
            } => match self.nat_target(*dst.ip()) {
                Some(ip) => {
                    let target = SocketAddrV4::new(ip, dst.port());
                    let now = Instant::now();
                    let max = self.cfg.max_udp_bindings;
                    if let Err(e) = self.udp.send(
                        &self.epoll,
                        max,
                        mac,
                        src,
                        target,
                        payload,
                        now,
                        &mut self.stats,
                    ) {
                        tracing::warn!(guest = %src, "cannot open a UDP binding: {e}");
                        self.stats.udp_dropped += 1;
                    }
                }
                None => self.stats.dropped_unsupported += 1,
            },
            Verdict::Malformed(why) => {
                self.stats.dropped_malformed += 1;
                tracing::trace!(why, len = frame.len(), "dropped malformed guest frame");
            }
            Verdict::Ignored(why) => {
                self.stats.dropped_unsupported += 1;
                tracing::trace!(why, len = frame.len(), "ignored guest frame");
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let was_full = self.queues.guest_full();
            let Some(frame) = self.queues.to_guest.pop_front() else {
                return Ok(None);
            };
            if was_full {
                // The stack and the UDP relay may have been held back.
                self.kick();
            }
            if frame.len() > buf.len() {
                self.stats.dropped_queue_full += 1;
                continue;
            }
            buf[..frame.len()].copy_from_slice(&frame);
            self.stats.frames_to_guest += 1;
            return Ok(Some(frame.len()));
        }
    }

    fn event_fd(&self) -> RawFd {
        self.epoll.fd()
    }

    fn poll(&mut self) -> io::Result<()> {
        if self.kicked {
            self.kicked = false;
            self.kick.clear();
        }
        self.collect_events()?;
        self.accept_forwards();
        let now = Instant::now();
        self.run_stack(now);
        self.udp.receive(
            &mut self.queues,
            self.cfg.gateway,
            self.gateway_mac,
            now,
            &mut self.stats,
        );
        self.udp.expire(now, self.cfg.udp_idle_timeout);
        Ok(())
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        if !self.queues.to_stack.is_empty() || (self.udp.backlogged() && !self.queues.guest_full())
        {
            return Some(Duration::ZERO);
        }
        let ts = self.now();
        let mut next = self.iface.poll_delay(ts, &self.sockets).map(Duration::from);
        if next == Some(Duration::ZERO) && self.queues.guest_full() {
            // Nothing can go out until `recv` makes room, which raises the eventfd.
            next = None;
        }
        let now = Instant::now();
        if let Some(deadline) = self.pending.values().map(|p| p.deadline).min() {
            next = min_deadline(next, Some(deadline.saturating_duration_since(now)));
        }
        if let Some(expiry) = self.udp.expire(now, self.cfg.udp_idle_timeout) {
            next = min_deadline(next, Some(expiry.saturating_duration_since(now)));
        }
        next
    }
}
