//! UDP relaying: one host `UdpSocket` per guest source address and port (a binding).
//!
//! Datagrams from that guest port go out through the binding's socket to whatever
//! destination the guest named (the gateway meaning the host's 127.0.0.1); datagrams arriving
//! on the socket go back to the guest port, appearing to come from their sender (127.0.0.1
//! shown as the gateway). Bindings idle for `udp_idle_timeout` are closed; at
//! `max_udp_bindings` the least recently used one makes room.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;

use super::device::Queues;
use super::wire::{udp_frame, MAX_UDP_PAYLOAD};
use super::{token, UserNetStats, KIND_UDP};
use crate::sys::Epoll;

#[derive(Debug)]
struct Binding {
    socket: UdpSocket,
    guest: SocketAddrV4,
    guest_mac: EthernetAddress,
    last_active: Instant,
    readable: bool,
}

/// The guest's UDP bindings.
#[derive(Debug)]
pub(crate) struct UdpNat {
    bindings: HashMap<u64, Binding>,
    by_guest: HashMap<SocketAddrV4, u64>,
    next_id: u64,
    buf: Vec<u8>,
}

impl UdpNat {
    pub(crate) fn new() -> Self {
        Self {
            bindings: HashMap::new(),
            by_guest: HashMap::new(),
            next_id: 0,
            buf: vec![0; 65536],
        }
    }

    /// How many bindings are open.
    pub(crate) fn len(&self) -> usize {
        self.bindings.len()
    }

    /// Marks the binding with epoll token id `id` readable.
    pub(crate) fn set_readable(&mut self, id: u64) {
        if let Some(b) = self.bindings.get_mut(&id) {
            b.readable = true;
        }
    }

    /// Sends a guest datagram from `guest` to `target` through the guest port's binding.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send(
        &mut self,
        epoll: &Epoll,
        max_bindings: usize,
        guest_mac: EthernetAddress,
        guest: SocketAddrV4,
        target: SocketAddrV4,
        payload: &[u8],
        now: Instant,
        stats: &mut UserNetStats,
    ) -> io::Result<()> {
        let id = match self.by_guest.get(&guest) {
            Some(&id) => id,
            None => {
                if self.bindings.len() >= max_bindings {
                    self.evict_oldest();
                }
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                socket.set_nonblocking(true)?;
                let id = self.next_id;
                self.next_id += 1;
                let events = (libc::EPOLLIN | libc::EPOLLET) as u32;
                epoll.add(socket.as_raw_fd(), events, token(KIND_UDP, id))?;
                tracing::debug!(%guest, local = ?socket.local_addr().ok(), "new UDP binding");
                self.bindings.insert(
                    id,
                    Binding {
                        socket,
                        guest,
                        guest_mac,
                        last_active: now,
                        readable: false,
                    },
                );
                self.by_guest.insert(guest, id);
                id
            }
        };
        let Some(b) = self.bindings.get_mut(&id) else {
            return Ok(());
        };
        b.last_active = now;
        b.guest_mac = guest_mac;
        match b.socket.send_to(payload, target) {
            Ok(_) => stats.udp_to_host += 1,
            Err(e) => {
                // Full socket buffer, unreachable network, ...: UDP may lose datagrams.
                tracing::debug!(%guest, %target, "UDP datagram not relayed: {e}");
                stats.udp_dropped += 1;
            }
        }
        Ok(())
    }

    /// Moves datagrams from readable bindings to the guest queue while it has room.
    pub(crate) fn receive(
        &mut self,
        queues: &mut Queues,
        gateway: Ipv4Addr,
        gateway_mac: EthernetAddress,
        now: Instant,
        stats: &mut UserNetStats,
    ) {
        for b in self.bindings.values_mut() {
            while b.readable && !queues.guest_full() {
                let (n, from) = match b.socket.recv_from(&mut self.buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        b.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // E.g. ECONNREFUSED from an earlier ICMP error: nothing to deliver.
                        tracing::debug!(guest = %b.guest, "UDP receive error: {e}");
                        continue;
                    }
                };
                b.last_active = now;
                let SocketAddr::V4(from) = from else { continue };
                if n > MAX_UDP_PAYLOAD {
                    tracing::debug!(%from, n, "UDP reply too large for one frame; dropped");
                    stats.udp_dropped += 1;
                    continue;
                }
                let from = if from.ip().is_loopback() {
                    SocketAddrV4::new(gateway, from.port())
                } else {
                    from
                };
                let frame = udp_frame(gateway_mac, b.guest_mac, from, b.guest, &self.buf[..n]);
                queues.push_guest(frame);
                stats.udp_to_guest += 1;
            }
        }
    }

    /// Whether a binding still has datagrams that did not fit the guest queue.
    pub(crate) fn backlogged(&self) -> bool {
        self.bindings.values().any(|b| b.readable)
    }

    /// Closes bindings idle for `idle`; returns when the next one expires.
    pub(crate) fn expire(&mut self, now: Instant, idle: Duration) -> Option<Instant> {
        let by_guest = &mut self.by_guest;
        self.bindings.retain(|_, b| {
            let keep = now.duration_since(b.last_active) < idle;
            if !keep {
                tracing::debug!(guest = %b.guest, "UDP binding expired");
                by_guest.remove(&b.guest);
            }
            keep
        });
        self.bindings.values().map(|b| b.last_active + idle).min()
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .bindings
            .iter()
            .min_by_key(|(_, b)| b.last_active)
            .map(|(&id, _)| id);
        if let Some(b) = oldest.and_then(|id| self.bindings.remove(&id)) {
            tracing::debug!(guest = %b.guest, "UDP binding evicted to make room");
            self.by_guest.remove(&b.guest);
        }
    }
}
