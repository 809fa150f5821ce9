//! The TAP backend against the real kernel, inside a private network namespace (so nothing
//! leaks onto the host and the tap disappears with the namespace). Needs root; skipped with
//! a message otherwise.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{arp_request, echo_request, eth_frame, ipv4_packet};
use netback::{NetBackend, Tap, TapError};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol,
};

const OUR_MAC: EthernetAddress = EthernetAddress([0x02, 0x00, 0x00, 0x00, 0x00, 0x02]);
const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const KERNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn frame(dst: EthernetAddress, ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    eth_frame(OUR_MAC, dst, ethertype, payload)
}

/// Reads frames from the tap until `want` returns a value or 5 s pass.
fn wait_for<T>(tap: &mut Tap, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536 + 18];
    loop {
        while let Some(n) = tap.recv(&mut buf).unwrap() {
            if let Some(v) = want(&buf[..n]) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no matching frame from the kernel"
        );
        let mut pfd = libc::pollfd {
            fd: tap.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
}

fn arp_reply(f: &[u8]) -> Option<EthernetAddress> {
    let f = EthernetFrame::new_checked(f).ok()?;
    match ArpRepr::parse(&ArpPacket::new_checked(f.payload()).ok()?).ok()? {
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } if source_protocol_addr == KERNEL_IP && target_protocol_addr == OUR_IP => {
            Some(source_hardware_addr)
        }
        _ => None,
    }
}

fn echo_reply(f: &[u8]) -> Option<()> {
    let (seq, data) = common::echo_reply(f, KERNEL_IP)?;
    (seq == 1 && data == b"tap test").then_some(())
}

fn exchange() {
    let mut tap = Tap::open("nbtest0").expect("create a tap in the test namespace");
    assert_eq!(tap.name(), "nbtest0");
    ip(&["addr", "add", "10.77.0.1/24", "dev", "nbtest0"]);
    ip(&["link", "set", "nbtest0", "up"]);
    assert_eq!(tap.poll().map(|_| tap.next_timeout()).unwrap(), None);

    // Backend → kernel: who-has 10.77.0.1; kernel → backend: the reply.
    tap.send(&arp_request(OUR_MAC, OUR_IP, KERNEL_IP)).unwrap();
    let kernel_mac = wait_for(&mut tap, arp_reply);

    // And a ping, answered by the kernel's IP stack.
    let icmp = echo_request(7, 1, b"tap test");
    let buf = ipv4_packet(OUR_IP, KERNEL_IP, IpProtocol::Icmp, &icmp);
    tap.send(&frame(kernel_mac, EthernetProtocol::Ipv4, &buf))
        .unwrap();
    wait_for(&mut tap, echo_reply);

    // A frame too large for the caller's buffer is dropped, not truncated.
    tap.send(&frame(kernel_mac, EthernetProtocol::Ipv4, &buf))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut small = [0u8; 40];
    while tap.dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "the reply should have been dropped"
        );
        assert_eq!(tap.recv(&mut small).unwrap(), None);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tap_frames_flow_both_ways() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED tap_frames_flow_both_ways: needs root (CAP_NET_ADMIN) to create a tap");
        return;
    }
    // A fresh network namespace for this thread only; `ip` children inherit it.
    std::thread::spawn(|| {
        // SAFETY: unshare(CLONE_NEWNET) only moves the calling thread to a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "SKIPPED tap_frames_flow_both_ways: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        exchange();
    })
    .join()
    .unwrap();
}

#[test]
fn tap_rejects_bad_names() {
    for name in ["", "a/b", "sixteen-chars-xx", "with space"] {
        assert!(
            matches!(Tap::open(name), Err(TapError::Name(_))),
            "{name:?}"
        );
    }
}
