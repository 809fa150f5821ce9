//! Hostile and broken guest frames: none may panic or wedge the backend; each is counted.

mod common;

use std::net::Ipv4Addr;

use common::{
    echo_reply, echo_request, eth_frame, ipv4_packet, pattern, GATEWAY, GUEST_IP, GUEST_MAC,
};
use netback::{NetBackend, UserNet, UserNetConfig, UserNetStats};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

const GW_MAC: EthernetAddress = EthernetAddress([0x52, 0x55, 0x0a, 0x00, 0x02, 0x02]);

fn eth(dst: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    eth_frame(GUEST_MAC, dst, ethertype, payload)
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    common::arp_request(GUEST_MAC, GUEST_IP, target)
}

/// An IPv4 packet to `dst` with `proto` and a transport payload built by `body`.
fn ipv4(dst: Ipv4Addr, proto: IpProtocol, body: &[u8]) -> Vec<u8> {
    let packet = ipv4_packet(GUEST_IP, dst, proto, body);
    eth(GW_MAC, EthernetProtocol::Ipv4, &packet)
}

fn ping(dst: Ipv4Addr, seq_no: u16) -> Vec<u8> {
    ipv4(
        dst,
        IpProtocol::Icmp,
        &echo_request(0x1234, seq_no, b"are you there"),
    )
}

fn tcp(
    dst: Ipv4Addr,
    dst_port: u16,
    control: TcpControl,
    ack: Option<u32>,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 33333,
        dst_port,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 1024,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut buf = vec![0; repr.buffer_len()];
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[..]),
        &GUEST_IP.into(),
        &dst.into(),
        &ChecksumCapabilities::default(),
    );
    ipv4(dst, IpProtocol::Tcp, &buf)
}

fn udp(dst: Ipv4Addr, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: 4444,
        dst_port,
    };
    let mut buf = vec![0; 8 + payload.len()];
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut buf[..]),
        &GUEST_IP.into(),
        &dst.into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    ipv4(dst, IpProtocol::Udp, &buf)
}

fn drain(net: &mut UserNet) -> Vec<Vec<u8>> {
    net.poll().unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(n) = net.recv(&mut buf).unwrap() {
        out.push(buf[..n].to_vec());
    }
    out
}

fn is_echo_reply(frame: &[u8], seq: u16) -> bool {
    echo_reply(frame, GATEWAY).is_some_and(|(s, _)| s == seq)
}

/// ARP for the gateway is answered with its MAC; ping to it is echoed.
fn assert_gateway_answers(net: &mut UserNet, seq: u16) {
    net.send(&arp_request(GATEWAY)).unwrap();
    let replies = drain(net);
    let arp = replies
        .iter()
        .find_map(|f| {
            let f = EthernetFrame::new_checked(&f[..]).ok()?;
            ArpRepr::parse(&ArpPacket::new_checked(f.payload()).ok()?).ok()
        })
        .expect("an ARP reply");
    assert!(matches!(
        arp,
        ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_hardware_addr, source_protocol_addr, .. }
            if source_hardware_addr == GW_MAC && source_protocol_addr == GATEWAY
    ));
    net.send(&ping(GATEWAY, seq)).unwrap();
    assert!(
        drain(net).iter().any(|f| is_echo_reply(f, seq)),
        "ping to the gateway answered"
    );
}

#[test]
fn gateway_answers_arp_and_ping_only_for_itself() {
    let mut net = UserNet::new(UserNetConfig::default()).unwrap();
    assert_gateway_answers(&mut net, 1);
    // ARP for another address on the link, ping to a remote host: nothing.
    net.send(&arp_request(Ipv4Addr::new(10, 0, 2, 99))).unwrap();
    net.send(&ping(Ipv4Addr::new(8, 8, 8, 8), 2)).unwrap();
    assert!(drain(&mut net).is_empty());
    assert_eq!(net.stats().dropped_unsupported, 2);
}

#[test]
fn malformed_frames_are_dropped_and_counted() {
    let cfg = UserNetConfig {
        outbound: false,
        ..UserNetConfig::default()
    };
    let mut net = UserNet::new(cfg).unwrap();
    let good_tcp = tcp(GATEWAY, 80, TcpControl::Syn, None, b"");
    let good_udp = udp(GATEWAY, 53, b"query");

    let mut malformed: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("one byte", vec![0xff]),
        ("13 bytes", vec![0; 13]),
        (
            "oversized",
            eth(GW_MAC, EthernetProtocol::Ipv4, &pattern(9000, 1)),
        ),
        (
            "garbage IPv4",
            eth(GW_MAC, EthernetProtocol::Ipv4, &pattern(60, 2)),
        ),
        (
            "garbage ARP",
            eth(GW_MAC, EthernetProtocol::Arp, &pattern(28, 3)),
        ),
        ("truncated ARP", arp_request(GATEWAY)[..30].to_vec()),
        ("truncated IPv4 header", good_tcp[..14 + 12].to_vec()),
        ("truncated TCP", good_tcp[..good_tcp.len() - 4].to_vec()),
        ("multicast source MAC", {
            let mut f = ping(GATEWAY, 1);
            f[6] = 0x01;
            f
        }),
    ];
    // Bad IPv4 header checksum.
    let mut f = ping(GATEWAY, 3);
    f[14 + 10] ^= 0xff;
    malformed.push(("bad IPv4 checksum", f));
    // Bad TCP / UDP / ICMP checksums.
    for (name, mut f) in [
        ("bad TCP checksum", good_tcp.clone()),
        ("bad UDP checksum", good_udp.clone()),
        ("bad ICMP checksum", ping(GATEWAY, 4)),
    ] {
        let last = f.len() - 1;
        f[last] ^= 0x5a;
        malformed.push((name, f));
    }
    // IHL below 5, total length beyond the frame, version 6 inside an IPv4 ethertype.
    let mut f = good_tcp.clone();
    f[14] = 0x44;
    malformed.push(("IHL 4", f));
    let mut f = good_tcp.clone();
    f[14 + 2] = 0x05;
    malformed.push(("total length too big", f));
    let mut f = good_tcp.clone();
    f[14] = 0x65;
    malformed.push(("version 6", f));
    // TCP data offset pointing past the segment.
    let mut f = good_tcp.clone();
    f[14 + 20 + 12] = 0xf0;
    malformed.push(("TCP data offset", f));

    let ignored: Vec<(&str, Vec<u8>)> = vec![
        (
            "LLDP",
            eth(GW_MAC, EthernetProtocol::Unknown(0x88cc), &[0; 46]),
        ),
        (
            "VLAN",
            eth(GW_MAC, EthernetProtocol::Unknown(0x8100), &good_udp[14..]),
        ),
        ("IPv6", eth(GW_MAC, EthernetProtocol::Ipv6, &pattern(40, 4))),
        ("other MAC", {
            let mut f = good_udp.clone();
            f[..6].copy_from_slice(&[0x52, 0, 0, 0, 0, 9]);
            f
        }),
        ("fragment (MF)", {
            let mut f = ping(GATEWAY, 5);
            f[14 + 6] |= 0x20;
            f
        }),
        ("fragment (offset)", {
            let mut f = ping(GATEWAY, 6);
            f[14 + 7] = 0x10;
            f
        }),
        ("GRE", ipv4(GATEWAY, IpProtocol::Unknown(47), &[0; 8])),
        ("UDP with NAT off", good_udp.clone()),
    ];

    // Each frame raises its counter by one; a malformed one is sent once before (that send
    // must not fail either).
    type Counter = fn(&UserNetStats) -> u64;
    type Frames<'a> = &'a [(&'a str, Vec<u8>)];
    let cases: [(&str, Frames, Counter, bool); 2] = [
        ("malformed", &malformed, |s| s.dropped_malformed, true),
        ("unsupported", &ignored, |s| s.dropped_unsupported, false),
    ];
    for (kind, frames, counter, send_before) in cases {
        for (name, frame) in frames {
            if send_before {
                net.send(frame).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            let before = counter(&net.stats());
            net.send(frame).unwrap();
            let after = counter(&net.stats());
            assert_eq!(after, before + 1, "{name} counted as {kind}");
        }
    }
    let out = drain(&mut net);
    assert!(
        out.is_empty(),
        "no replies to broken frames: {} frames",
        out.len()
    );
    // DHCP garbage is not answered.
    net.send(&udp(Ipv4Addr::BROADCAST, 67, &pattern(300, 9)))
        .unwrap();
    assert!(drain(&mut net).is_empty());

    // Not wedged: the gateway still answers.
    assert_gateway_answers(&mut net, 7);
    let stats = net.stats();
    assert_eq!(stats.dropped_malformed, 2 * malformed.len() as u64);
}

#[test]
fn tcp_oddities_from_the_guest() {
    let mut net = UserNet::new(UserNetConfig::default()).unwrap();
    assert_gateway_answers(&mut net, 1);
    // A stray ACK, a RST, a FIN and data for connections that do not exist: the stack
    // answers RST (or nothing), no connection is created.
    for f in [
        tcp(GATEWAY, 80, TcpControl::None, Some(5), b"data"),
        tcp(GATEWAY, 80, TcpControl::Rst, None, b""),
        tcp(GATEWAY, 80, TcpControl::Fin, Some(9), b""),
        tcp(Ipv4Addr::new(10, 0, 2, 77), 80, TcpControl::Syn, None, b""),
        tcp(Ipv4Addr::new(224, 0, 0, 1), 80, TcpControl::Syn, None, b""),
    ] {
        net.send(&f).unwrap();
    }
    drain(&mut net);
    assert_eq!(net.stats().tcp_active, 0);
    // A SYN flood beyond the connection limit is refused, not queued forever.
    let cfg = UserNetConfig {
        max_tcp_connections: 4,
        ..UserNetConfig::default()
    };
    let mut net = UserNet::new(cfg).unwrap();
    for port in 1..=50u16 {
        // 192.0.2.0/24 (TEST-NET-1) is not routed: connects stay pending or fail.
        net.send(&tcp(
            Ipv4Addr::new(192, 0, 2, 1),
            port,
            TcpControl::Syn,
            None,
            b"",
        ))
        .unwrap();
    }
    drain(&mut net);
    let stats = net.stats();
    assert!(stats.tcp_active <= 4, "{stats:?}");
    assert!(stats.tcp_refused >= 46, "{stats:?}");
}

/// Random bytes through the fuzz entry point, and randomly mutated valid frames.
#[test]
fn random_frames_never_panic() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let len = (next() % 4096) as usize;
        netback::fuzz_frames(&pattern(len, i + 1));
    }

    let cfg = UserNetConfig {
        outbound: false,
        ..UserNetConfig::default()
    };
    let mut net = UserNet::new(cfg).unwrap();
    let seeds = [
        arp_request(GATEWAY),
        ping(GATEWAY, 1),
        tcp(GATEWAY, 80, TcpControl::Syn, None, b""),
        tcp(GATEWAY, 80, TcpControl::None, Some(1), b"payload"),
        udp(GATEWAY, 53, b"dns?"),
        udp(Ipv4Addr::BROADCAST, 67, &[0; 300]),
    ];
    for _ in 0..20_000 {
        let mut f = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..=(next() % 4) {
            let at = (next() % f.len() as u64) as usize;
            f[at] ^= 1 << (next() % 8);
        }
        if next() % 5 == 0 {
            f.truncate((next() % f.len() as u64) as usize);
        }
        net.send(&f).unwrap();
        if next() % 16 == 0 {
            drain(&mut net);
        }
    }
    drain(&mut net);
    assert_gateway_answers(&mut net, 9);
}
