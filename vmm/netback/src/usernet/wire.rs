//! Guest frame inspection and the frames the gateway builds itself.
//!
//! Every guest frame is checked here before anything acts on it: Ethernet, ARP, IPv4 (header
//! checksum), TCP/UDP/ICMP (checksums) are parsed with smoltcp's checked views, which never
//! panic on short or lying input. The result says who handles the frame: the smoltcp stack
//! (ARP and ping for the gateway, TCP), the DHCP server, the UDP relay, or nobody.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    UdpPacket, UdpRepr, DHCP_SERVER_PORT, UDP_HEADER_LEN,
};

use super::device::MAX_FRAME;

/// Who handles a guest frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict<'a> {
    /// The smoltcp stack (ARP and echo requests for the gateway, TCP segments).
    Stack,
    /// A TCP SYN opening a connection (guest side, destination); the stack handles it
    /// once the relay has decided.
    TcpSyn(SocketAddrV4, SocketAddrV4),
    /// A TCP RST (guest side, destination); goes to the stack too.
    TcpRst(SocketAddrV4, SocketAddrV4),
    /// A DHCP client message.
    Dhcp {
        /// The guest's MAC address.
        mac: EthernetAddress,
        /// The DHCP message.
        payload: &'a [u8],
    },
    /// A unicast UDP datagram to relay.
    Udp {
        /// The guest's MAC address.
        mac: EthernetAddress,
        /// The guest's address and port.
        src: SocketAddrV4,
        /// The destination.
        dst: SocketAddrV4,
        /// The datagram.
        payload: &'a [u8],
    },
    /// Malformed: truncated, oversized, bad checksum or header.
    Malformed(&'static str),
    /// Well-formed but not handled (other ethertypes, IPv6, fragments, other protocols).
    Ignored(&'static str),
}

/// Classifies one frame from the guest.
pub(crate) fn inspect(
    frame: &[u8],
    gateway: Ipv4Addr,
    gateway_mac: EthernetAddress,
) -> Verdict<'_> {
    if frame.len() > MAX_FRAME {
        return Verdict::Malformed("oversized frame");
    }
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Malformed("truncated Ethernet header");
    };
    let mac = eth.src_addr();
    if !mac.is_unicast() {
        return Verdict::Malformed("multicast source MAC");
    }
    let dst_mac = eth.dst_addr();
    if dst_mac != gateway_mac && !dst_mac.is_broadcast() {
        return Verdict::Ignored("not addressed to the gateway");
    }
    match eth.ethertype() {
        EthernetProtocol::Arp => inspect_arp(eth.payload(), gateway),
        EthernetProtocol::Ipv4 => inspect_ipv4(eth.payload(), mac, gateway),
        EthernetProtocol::Ipv6 => Verdict::Ignored("IPv6"),
        _ => Verdict::Ignored("unknown ethertype"),
    }
}

fn inspect_arp(payload: &[u8], gateway: Ipv4Addr) -> Verdict<'_> {
    let Ok(repr) = ArpPacket::new_checked(payload).and_then(|p| ArpRepr::parse(&p)) else {
        return Verdict::Malformed("bad ARP packet");
    };
    match repr {
        ArpRepr::EthernetIpv4 {
            target_protocol_addr,
            ..
        } if target_protocol_addr == gateway => Verdict::Stack,
        // Probes and announcements of the guest's own address, or ARP for other hosts:
        // only the gateway exists on this link.
        _ => Verdict::Ignored("ARP not for the gateway"),
    }
}

fn inspect_ipv4(payload: &[u8], mac: EthernetAddress, gateway: Ipv4Addr) -> Verdict<'_> {
    let Ok(packet) = Ipv4Packet::new_checked(payload) else {
        return Verdict::Malformed("truncated IPv4 packet");
    };
    if packet.more_frags() || packet.frag_offset() != 0 {
        return Verdict::Ignored("IPv4 fragment");
    }
    let caps = rx_checksums();
    let Ok(ip) = Ipv4Repr::parse(&packet, &caps) else {
        return Verdict::Malformed("bad IPv4 header");
    };
    if ip.src_addr.is_multicast() || ip.src_addr.is_broadcast() {
        return Verdict::Malformed("non-unicast IPv4 source");
    }
    let (src, dst) = (ip.src_addr, ip.dst_addr);
    let body = packet.payload();
    match ip.next_header {
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(body)
                .and_then(|p| TcpRepr::parse(&p, &src.into(), &dst.into(), &caps))
            else {
                return Verdict::Malformed("bad TCP segment");
            };
            if src.is_unspecified() || !is_unicast(dst) {
                return Verdict::Ignored("TCP to a non-unicast address");
            }
            let guest = SocketAddrV4::new(src, tcp.src_port);
            let dst = SocketAddrV4::new(dst, tcp.dst_port);
            match (tcp.control, tcp.ack_number) {
                (TcpControl::Syn, None) => Verdict::TcpSyn(guest, dst),
                (TcpControl::Rst, _) => Verdict::TcpRst(guest, dst),
                _ => Verdict::Stack,
            }
        }
        IpProtocol::Udp => {
            let Ok(udp_packet) = UdpPacket::new_checked(body) else {
                return Verdict::Malformed("truncated UDP datagram");
            };
            let Ok(udp) = UdpRepr::parse(&udp_packet, &src.into(), &dst.into(), &caps) else {
                return Verdict::Malformed("bad UDP datagram");
            };
            let payload = &body[UDP_HEADER_LEN..usize::from(udp_packet.len())];
            if udp.dst_port == DHCP_SERVER_PORT {
                Verdict::Dhcp { mac, payload }
            } else if src.is_unspecified() || !is_unicast(dst) {
                Verdict::Ignored("UDP broadcast or multicast")
            } else {
                Verdict::Udp {
                    mac,
                    src: SocketAddrV4::new(src, udp.src_port),
                    dst: SocketAddrV4::new(dst, udp.dst_port),
                    payload,
                }
            }
        }
        IpProtocol::Icmp => {
            let Ok(icmp) =
                Icmpv4Packet::new_checked(body).and_then(|p| Icmpv4Repr::parse(&p, &caps))
            else {
                return Verdict::Malformed("bad ICMP message");
            };
            match icmp {
                Icmpv4Repr::EchoRequest { .. } if dst == gateway => Verdict::Stack,
                _ => Verdict::Ignored("ICMP other than ping to the gateway"),
            }
        }
        _ => Verdict::Ignored("IP protocol other than TCP, UDP, ICMP"),
    }
}

/// Checksum verification of guest frames: on, except under `cfg(fuzzing)` so that mutated
/// inputs reach the parsers behind the checksums.
pub(crate) fn rx_checksums() -> ChecksumCapabilities {
    if cfg!(fuzzing) {
        ChecksumCapabilities::ignored()
    } else {
        ChecksumCapabilities::default()
    }
}

/// A unicast address that may appear on the wire (not 0/8, loopback, multicast, broadcast).
pub(crate) fn is_unicast(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified()
        || addr.octets()[0] == 0
        || addr.is_loopback()
        || addr.is_multicast()
        || addr.is_broadcast())
}

/// Builds an Ethernet + IPv4 + UDP frame.
pub(crate) fn udp_frame(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: UDP_HEADER_LEN + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: src_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &caps);
    let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
    udp.emit(
        &mut datagram,
        &(*src.ip()).into(),
        &(*dst.ip()).into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// Largest UDP payload that fits one frame to the guest.
pub(crate) const MAX_UDP_PAYLOAD: usize = MAX_FRAME - 14 - 20 - UDP_HEADER_LEN;

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const GW_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 10, 0, 2, 2]);
    const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);

    #[test]
    fn udp_frames_round_trip() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 5000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 53);
        let frame = udp_frame(GUEST_MAC, GW_MAC, src, dst, b"hello");
        assert_eq!(
            inspect(&frame, GW, GW_MAC),
            Verdict::Udp {
                mac: GUEST_MAC,
                src,
                dst,
                payload: b"hello"
            }
        );
        // The same datagram with a flipped payload bit fails its checksum.
        let mut bad = frame.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            inspect(&bad, GW, GW_MAC),
            Verdict::Malformed("bad UDP datagram")
        );
        // To another MAC: ignored.
        assert!(matches!(
            inspect(&udp_frame(GUEST_MAC, GUEST_MAC, src, dst, b""), GW, GW_MAC),
            Verdict::Ignored(_)
        ));
        // Truncated anywhere: never handled.
        for len in 0..frame.len() {
            assert!(matches!(
                inspect(&frame[..len], GW, GW_MAC),
                Verdict::Malformed(_) | Verdict::Ignored(_)
            ));
        }
    }

    #[test]
    fn unicast_filter() {
        assert!(is_unicast(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(!is_unicast(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!is_unicast(Ipv4Addr::new(0, 1, 2, 3)));
        assert!(!is_unicast(Ipv4Addr::new(224, 0, 0, 251)));
        assert!(!is_unicast(Ipv4Addr::BROADCAST));
    }
}
