//! User-mode networking configuration: addresses, limits and port forwards.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// What the gateway looks like to the guest and how much the backend may hold.
///
/// The defaults match QEMU's slirp: network 10.0.2.0/24, gateway 10.0.2.2, guest 10.0.2.15.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNetConfig {
    /// The gateway's (the VMM's) address on the guest network; also the host's loopback as
    /// seen from the guest.
    pub gateway: Ipv4Addr,
    /// The gateway's MAC address.
    pub gateway_mac: [u8; 6],
    /// The address the DHCP server hands out and port forwards connect to.
    pub guest: Ipv4Addr,
    /// Prefix length of the guest network (1..=30).
    pub prefix_len: u8,
    /// DNS servers announced by DHCP (none by default: no DNS forwarder is built in).
    pub dns: Vec<Ipv4Addr>,
    /// DHCP lease time.
    pub lease: Duration,
    /// Host → guest TCP port forwards.
    pub forwards: Vec<Forward>,
    /// Relay the guest's outbound TCP connections and UDP datagrams to the host's network.
    /// When false, TCP connections are refused and UDP is dropped (DHCP, ARP, ping and
    /// forwards still work).
    pub outbound: bool,
    /// Most TCP connections (forwarded, outbound, and outbound connects in progress) at once.
    pub max_tcp_connections: usize,
    /// Receive and send buffer size of each relayed TCP connection inside the stack.
    pub tcp_buffer: usize,
    /// Most UDP bindings (one per guest source address and port) at once.
    pub max_udp_bindings: usize,
    /// A UDP binding with no traffic for this long is closed.
    pub udp_idle_timeout: Duration,
    /// An outbound TCP connect that has not completed after this long is refused.
    pub connect_timeout: Duration,
}

impl Default for UserNetConfig {
    fn default() -> Self {
        Self {
            gateway: Ipv4Addr::new(10, 0, 2, 2),
            gateway_mac: [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02],
            guest: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            dns: Vec::new(),
            lease: Duration::from_secs(24 * 3600),
            forwards: Vec::new(),
            outbound: true,
            max_tcp_connections: 256,
            tcp_buffer: 64 * 1024,
            max_udp_bindings: 256,
            udp_idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// A validation failure of [`UserNetConfig`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The prefix length is out of range.
    #[error("prefix length {0} is invalid: use 1..=30")]
    PrefixLen(u8),
    /// Gateway and guest are not in one subnet.
    #[error("gateway {gateway} and guest {guest} are not in one /{prefix_len} network: pick addresses in the same subnet")]
    NotOneSubnet {
        /// The gateway address.
        gateway: Ipv4Addr,
        /// The guest address.
        guest: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// An address is the network or broadcast address, or not unicast.
    #[error("{0} cannot be a host address on this network: pick another")]
    NotHostAddress(Ipv4Addr),
    /// Gateway and guest have the same address.
    #[error("gateway and guest both have address {0}: they must differ")]
    SameAddress(Ipv4Addr),
    /// The gateway MAC is multicast or zero.
    #[error("gateway MAC {0:02x?} is not a unicast address: clear bit 0 of the first byte")]
    GatewayMac([u8; 6]),
    /// A forward targets an address outside the guest network or the gateway.
    #[error("port forward {0} targets an address that is not a guest on the network")]
    ForwardTarget(Forward),
    /// A size limit is out of range.
    #[error("{what} must be in {min}..={max}, got {got}")]
    Limit {
        /// The option.
        what: &'static str,
        /// The smallest allowed value.
        min: usize,
        /// The largest allowed value.
        max: usize,
        /// The value given.
        got: usize,
    },
}

impl UserNetConfig {
    /// The guest network's netmask.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Whether `addr` is in the guest network.
    pub fn in_network(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(addr) & mask == u32::from(self.gateway) & mask
    }

    fn is_host_address(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        let host = u32::from(addr) & !mask;
        !addr.is_multicast() && !addr.is_broadcast() && host != 0 && host != !mask
    }

    /// Checks the addresses and limits; the error says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=30).contains(&self.prefix_len) {
            return Err(ConfigError::PrefixLen(self.prefix_len));
        }
        if !self.in_network(self.guest) {
            return Err(ConfigError::NotOneSubnet {
                gateway: self.gateway,
                guest: self.guest,
                prefix_len: self.prefix_len,
            });
        }
        for addr in [self.gateway, self.guest] {
            if !self.is_host_address(addr) {
                return Err(ConfigError::NotHostAddress(addr));
            }
        }
        if self.gateway == self.guest {
            return Err(ConfigError::SameAddress(self.guest));
        }
        if self.gateway_mac[0] & 1 != 0 || self.gateway_mac == [0; 6] {
            return Err(ConfigError::GatewayMac(self.gateway_mac));
        }
        for fwd in &self.forwards {
            let target = fwd.guest_ip.unwrap_or(self.guest);
            if !self.in_network(target) || !self.is_host_address(target) || target == self.gateway {
                return Err(ConfigError::ForwardTarget(fwd.clone()));
            }
        }
        for (what, min, max, got) in [
            // Forwarded connections take gateway ports from 49152..=65535.
            ("max_tcp_connections", 1, 16384, self.max_tcp_connections),
            ("tcp_buffer", 4096, 16 << 20, self.tcp_buffer),
            ("max_udp_bindings", 1, 16384, self.max_udp_bindings),
        ] {
            if !(min..=max).contains(&got) {
                return Err(ConfigError::Limit {
                    what,
                    min,
                    max,
                    got,
                });
            }
        }
        Ok(())
    }
}

/// A host → guest TCP port forward: connections accepted on `host` are relayed to
/// `guest_port` of the guest, appearing there to come from the gateway.
///
/// Parses from `HOST=GUEST`, e.g. `127.0.0.1:8080=10.0.2.15:80`, where HOST is `IP:PORT` or
/// just `PORT` (on 127.0.0.1) and GUEST is `IP:PORT` or just `PORT` (on the configured
/// guest). Host port 0 picks a free port; [`crate::UserNet::forwards`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where the host listens.
    pub host: SocketAddr,
    /// The guest's TCP port.
    pub guest_port: u16,
    /// The guest address, when not the configured guest ([`UserNetConfig::guest`]).
    pub guest_ip: Option<Ipv4Addr>,
}

impl Forward {
    /// A forward from `host` to `guest_port` on the configured guest.
    pub fn new(host: SocketAddr, guest_port: u16) -> Self {
        Self {
            host,
            guest_port,
            guest_ip: None,
        }
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.guest_ip {
            Some(ip) => write!(f, "{}={}:{}", self.host, ip, self.guest_port),
            None => write!(f, "{}={}", self.host, self.guest_port),
        }
    }
}

/// Why a port forward string did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardParseError {
    /// No `=` between the host and guest parts.
    #[error("port forward {0:?} has no '=': write HOST=GUEST, e.g. 127.0.0.1:8080=10.0.2.15:80")]
    MissingEquals(String),
    /// The host part is not `IP:PORT` or `PORT`.
    #[error("port forward host part {0:?} is not IP:PORT or PORT (e.g. 127.0.0.1:8080, [::1]:8080, 8080)")]
    Host(String, #[source] AddrParseError),
    /// The guest part is not `IPV4:PORT` or `PORT`.
    #[error("port forward guest part {0:?} is not IPV4:PORT or PORT (e.g. 10.0.2.15:80, 80)")]
    Guest(String),
    /// The guest port is 0.
    #[error("port forward guest port is 0: give the guest's listening port")]
    GuestPortZero,
}

impl FromStr for Forward {
    type Err = ForwardParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = s
            .trim()
            .split_once('=')
            .ok_or_else(|| ForwardParseError::MissingEquals(s.to_owned()))?;
        let host = match host.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(_) => host
                .parse::<SocketAddr>()
                .map_err(|e| ForwardParseError::Host(host.to_owned(), e))?,
        };
        let bad_guest = || ForwardParseError::Guest(guest.to_owned());
        let (guest_ip, guest_port) = match guest.parse::<u16>() {
            Ok(port) => (None, port),
            Err(_) => match guest.parse::<SocketAddr>().map_err(|_| bad_guest())? {
                SocketAddr::V4(v4) => (Some(*v4.ip()), v4.port()),
                SocketAddr::V6(_) => return Err(bad_guest()),
            },
        };
        if guest_port == 0 {
            return Err(ForwardParseError::GuestPortZero);
        }
        Ok(Self {
            host,
            guest_port,
            guest_ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forwards() {
        let f: Forward = "127.0.0.1:8080=10.0.2.15:80".parse().unwrap();
        assert_eq!(f.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (f.guest_ip, f.guest_port),
            (Some(Ipv4Addr::new(10, 0, 2, 15)), 80)
        );
        let f: Forward = "0=22".parse().unwrap();
        assert_eq!(f, Forward::new("127.0.0.1:0".parse().unwrap(), 22));
        let f: Forward = "[::1]:9000=80".parse().unwrap();
        assert_eq!(f.host, "[::1]:9000".parse().unwrap());
        assert_eq!(f.to_string(), "[::1]:9000=80");
    }

    #[test]
    fn rejects_bad_forwards() {
        use ForwardParseError as E;
        assert!(matches!(
            "8080".parse::<Forward>(),
            Err(E::MissingEquals(_))
        ));
        assert!(matches!("host:1=80".parse::<Forward>(), Err(E::Host(..))));
        assert!(matches!("8080=x".parse::<Forward>(), Err(E::Guest(_))));
        assert!(matches!(
            "8080=[::1]:80".parse::<Forward>(),
            Err(E::Guest(_))
        ));
        assert_eq!("8080=0".parse::<Forward>(), Err(E::GuestPortZero));
        let msg = "8080".parse::<Forward>().unwrap_err().to_string();
        assert!(msg.contains("HOST=GUEST"), "{msg}");
    }

    #[test]
    fn validates_config() {
        let ok = UserNetConfig::default();
        ok.validate().unwrap();
        assert_eq!(ok.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let bad = |f: fn(&mut UserNetConfig)| {
            let mut c = UserNetConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.prefix_len = 31), ConfigError::PrefixLen(31));
        assert!(matches!(
            bad(|c| c.guest = Ipv4Addr::new(10, 0, 3, 15)),
            ConfigError::NotOneSubnet { .. }
        ));
        assert!(matches!(
            bad(|c| c.guest = Ipv4Addr::new(10, 0, 2, 255)),
            ConfigError::NotHostAddress(_)
        ));
        assert!(matches!(
            bad(|c| c.guest = c.gateway),
            ConfigError::SameAddress(_)
        ));
        assert!(matches!(
            bad(|c| c.gateway_mac[0] = 1),
            ConfigError::GatewayMac(_)
        ));
        assert!(matches!(
            bad(|c| c.forwards = vec!["1=10.0.9.1:80".parse().unwrap()]),
            ConfigError::ForwardTarget(_)
        ));
        assert!(matches!(
            bad(|c| c.tcp_buffer = 10),
            ConfigError::Limit { .. }
        ));
    }
}
