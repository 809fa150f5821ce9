//! A one-client DHCP server: every DISCOVER is offered the configured guest address with
//! the gateway as router; REQUESTs for that address are ACKed, others NAKed; INFORM gets the
//! options. Replies are broadcast (the client has no address yet) unless the client already
//! has one (`ciaddr`), and padded to the 300 bytes old BOOTP clients expect.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::wire::{
    DhcpMessageType, DhcpOpCode, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress,
    DHCP_CLIENT_PORT, DHCP_MAX_DNS_SERVER_COUNT, DHCP_SERVER_PORT,
};

use super::config::UserNetConfig;
use super::wire::udp_frame;

/// Option 6, domain name servers (smoltcp's `dns_servers` needs a heapless vector).
const OPT_DNS: u8 = 6;

/// The reply frame to a guest's DHCP message, if it deserves one.
pub(crate) fn reply(cfg: &UserNetConfig, mac: EthernetAddress, payload: &[u8]) -> Option<Vec<u8>> {
    let packet = DhcpPacket::new_checked(payload).ok()?;
    if packet.opcode() != DhcpOpCode::Request {
        return None;
    }
    let req = DhcpRepr::parse(&packet).ok()?;
    if req.server_identifier.is_some_and(|id| id != cfg.gateway) {
        // The client chose another server.
        return None;
    }
    let wanted = req.requested_ip.unwrap_or(req.client_ip);
    let message_type = match req.message_type {
        DhcpMessageType::Discover => DhcpMessageType::Offer,
        DhcpMessageType::Request if wanted == cfg.guest || wanted.is_unspecified() => {
            DhcpMessageType::Ack
        }
        DhcpMessageType::Request => DhcpMessageType::Nak,
        DhcpMessageType::Inform => DhcpMessageType::Ack,
        _ => return None,
    };
    tracing::debug!(?req.message_type, ?message_type, client = %req.client_hardware_address, "DHCP");

    let mut dns = [0u8; 4 * DHCP_MAX_DNS_SERVER_COUNT];
    let servers = cfg.dns.iter().take(DHCP_MAX_DNS_SERVER_COUNT);
    let dns_len = 4 * servers.len();
    for (chunk, server) in dns.chunks_exact_mut(4).zip(servers) {
        chunk.copy_from_slice(&server.octets());
    }
    let dns_option = [DhcpOption {
        kind: OPT_DNS,
        data: &dns[..dns_len],
    }];
    let nak = message_type == DhcpMessageType::Nak;
    let inform = req.message_type == DhcpMessageType::Inform;
    let repr = DhcpRepr {
        message_type,
        transaction_id: req.transaction_id,
        secs: 0,
        client_hardware_address: req.client_hardware_address,
        client_ip: if inform {
            req.client_ip
        } else {
            Ipv4Addr::UNSPECIFIED
        },
        your_ip: if nak || inform {
            Ipv4Addr::UNSPECIFIED
        } else {
            cfg.guest
        },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: (!nak).then_some(cfg.gateway),
        subnet_mask: (!nak).then(|| cfg.netmask()),
        relay_agent_ip: req.relay_agent_ip,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(cfg.gateway),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: (!nak && !inform)
            .then(|| u32::try_from(cfg.lease.as_secs()).unwrap_or(u32::MAX)),
        renew_duration: None,
        rebind_duration: None,
        additional_options: if nak || dns_len == 0 {
            &[]
        } else {
            &dns_option
        },
    };
    let mut body = vec![0; repr.buffer_len().max(300)];
    repr.emit(&mut DhcpPacket::new_unchecked(&mut body[..]))
        .ok()?;

    let gateway_mac = EthernetAddress(cfg.gateway_mac);
    let src = SocketAddrV4::new(cfg.gateway, DHCP_SERVER_PORT);
    let (dst_mac, dst_ip) = if !req.client_ip.is_unspecified() && !nak {
        (mac, req.client_ip)
    } else {
        (EthernetAddress::BROADCAST, Ipv4Addr::BROADCAST)
    };
    let dst = SocketAddrV4::new(dst_ip, DHCP_CLIENT_PORT);
    Some(udp_frame(gateway_mac, dst_mac, src, dst, &body))
}
