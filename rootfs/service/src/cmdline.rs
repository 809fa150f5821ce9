//! The guest's kernel command line: space-separated `key=value` words (Linux-style; keys the
//! guest does not know are ignored). The guest reads:
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `micro.run=CMD[,CMD…]` | requests to run at start (`:` for the space) | none |
//! | `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` | a virtio-mmio device window (Linux's syntax; repeatable) | none |
//! | `micro.ip=A.B.C.D/N` or `micro.ip=dhcp` | the guest's IPv4 address | `10.0.2.15/24` |
//! | `micro.gw=A.B.C.D` or `micro.gw=none` | default gateway | `10.0.2.2` |
//! | `micro.port=P` | TCP port of the service | `80` |
//!
//! Keys given twice: the last one wins (except `virtio_mmio.device`, which adds a device each
//! time). Malformed values are ignored (the default applies).

/// The key naming the commands to run at start.
pub const RUN_KEY: &[u8] = b"micro.run=";

/// The commands listed in `micro.run=` (the last occurrence wins, as in Linux), in order.
pub fn run_commands(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    let value = cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(RUN_KEY))
        .next_back()
        .unwrap_or(b"");
    value.split(|&c| c == b',').filter(|c| !c.is_empty())
}

/// The value of the last `key` word (`key` includes the `=`, e.g. `b"micro.ip="`).
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(key))
        .next_back()
}

/// A number the way Linux's `simple_strtoull(s, &end, 0)` reads it: `0x` hex, a leading `0`
/// octal, else decimal. Returns the value and the rest of `s`; `None` without digits or on
/// overflow.
pub fn parse_c_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = if let Some(h) = s.strip_prefix(b"0x").or(s.strip_prefix(b"0X")) {
        (16, h)
    } else if s.len() > 1 && s[0] == b'0' && s[1].is_ascii_digit() {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let n = digits
        .iter()
        .take_while(|c| char::from(**c).is_digit(radix))
        .count();
    if n == 0 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &digits[..n] {
        let d = char::from(c).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some((v, &digits[n..]))
}

/// A size the way Linux's `memparse` reads it: a number ([`parse_c_number`]) with an optional
/// `K`/`M`/`G`/`T` suffix (either case). Returns the size and the rest of `s`.
pub fn parse_size(s: &[u8]) -> Option<(u64, &[u8])> {
    let (v, rest) = parse_c_number(s)?;
    let shift = match rest.first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        _ => return Some((v, rest)),
    };
    let scaled = v.checked_mul(1u64 << shift)?;
    Some((scaled, &rest[1..]))
}

/// One `virtio_mmio.device=` entry: a device's register window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Physical address of the register window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
    /// Interrupt line (GSI; 0–15 are also the 8259's lines).
    pub irq: u32,
}

/// The key of a virtio-mmio device entry.
pub const VIRTIO_MMIO_KEY: &[u8] = b"virtio_mmio.device=";

/// Parses the value of one `virtio_mmio.device=` entry: `<size>@<base>:<irq>[:<id>]`.
pub fn parse_mmio_device(v: &[u8]) -> Option<MmioDevice> {
    let (size, rest) = parse_size(v)?;
    let rest = rest.strip_prefix(b"@")?;
    let (base, rest) = parse_c_number(rest)?;
    let rest = rest.strip_prefix(b":")?;
    let n = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    let irq = core::str::from_utf8(&rest[..n]).ok()?.parse().ok()?;
    let rest = &rest[n..];
    if !(rest.is_empty() || rest[0] == b':') || size == 0 {
        return None;
    }
    Some(MmioDevice { base, size, irq })
}

/// Every well-formed `virtio_mmio.device=` entry, in command-line order.
pub fn mmio_devices(cmdline: &[u8]) -> impl Iterator<Item = MmioDevice> + '_ {
    cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(VIRTIO_MMIO_KEY))
        .filter_map(parse_mmio_device)
}

/// Parses a dotted-quad IPv4 address.
pub fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&c| c == b'.');
    for o in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *o = core::str::from_utf8(p).ok()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// How the guest gets its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpConfig {
    /// A fixed address.
    Static {
        /// The address.
        addr: [u8; 4],
        /// Prefix length (0–32).
        prefix: u8,
        /// Default gateway, if any.
        gateway: Option<[u8; 4]>,
    },
    /// DHCPv4.
    Dhcp,
}

/// The default address (QEMU user networking's guest address).
pub const DEFAULT_IP: ([u8; 4], u8) = ([10, 0, 2, 15], 24);
/// The default gateway.
pub const DEFAULT_GW: [u8; 4] = [10, 0, 2, 2];
/// The default TCP port of the service.
pub const DEFAULT_PORT: u16 = 80;

/// The address configuration from `micro.ip=` and `micro.gw=`.
pub fn ip_config(cmdline: &[u8]) -> IpConfig {
    let ip = value(cmdline, b"micro.ip=");
    if ip == Some(b"dhcp") {
        return IpConfig::Dhcp;
    }
    let (addr, prefix) = ip
        .and_then(|v| {
            let slash = v.iter().position(|&c| c == b'/');
            let (a, p) = match slash {
                Some(i) => (&v[..i], Some(&v[i + 1..])),
                None => (v, None),
            };
            let addr = parse_ipv4(a)?;
            let prefix = match p {
                None => 24,
                Some(p) => core::str::from_utf8(p)
                    .ok()?
                    .parse::<u8>()
                    .ok()
                    .filter(|&n| n <= 32)?,
            };
            Some((addr, prefix))
        })
        .unwrap_or(DEFAULT_IP);
    let gateway = match value(cmdline, b"micro.gw=") {
        Some(b"none") => None,
        Some(g) => Some(parse_ipv4(g).unwrap_or(DEFAULT_GW)),
        None => Some(DEFAULT_GW),
    };
    IpConfig::Static {
        addr,
        prefix,
        gateway,
    }
}

/// The service's TCP port from `micro.port=` (1–65535), else [`DEFAULT_PORT`].
pub fn port(cmdline: &[u8]) -> u16 {
    value(cmdline, b"micro.port=")
        .and_then(|p| core::str::from_utf8(p).ok()?.parse::<u16>().ok())
        .filter(|&p| p != 0)
        .unwrap_or(DEFAULT_PORT)
}

/// The command line as bytes up to its NUL terminator (at most `max` bytes).
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_run_list() {
        let c: Vec<&[u8]> =
            run_commands(b"console=ttyS0 micro.run=primes:10,poweroff:0 quiet").collect();
        assert_eq!(c, [&b"primes:10"[..], b"poweroff:0"]);
        assert_eq!(run_commands(b"console=ttyS0").count(), 0);
        assert_eq!(run_commands(b"").count(), 0);
        let last: Vec<&[u8]> = run_commands(b"micro.run=a micro.run=b,,c").collect();
        assert_eq!(last, [&b"b"[..], b"c"]);
        assert_eq!(until_nul(b"abc\0def"), b"abc");
        assert_eq!(until_nul(b"abc"), b"abc");
    }

    #[test]
    fn numbers_and_sizes_like_linux() {
        assert_eq!(parse_c_number(b"0x1000@"), Some((0x1000, &b"@"[..])));
        assert_eq!(parse_c_number(b"4096"), Some((4096, &b""[..])));
        assert_eq!(parse_c_number(b"010"), Some((8, &b""[..])));
        assert_eq!(parse_c_number(b"0"), Some((0, &b""[..])));
        assert_eq!(parse_c_number(b"x"), None);
        assert_eq!(parse_c_number(b"0x"), None);
        assert_eq!(parse_c_number(b"99999999999999999999999"), None);
        assert_eq!(parse_size(b"4K@"), Some((4096, &b"@"[..])));
        assert_eq!(parse_size(b"4k"), Some((4096, &b""[..])));
        assert_eq!(parse_size(b"0x200"), Some((512, &b""[..])));
        assert_eq!(parse_size(b"1M"), Some((1 << 20, &b""[..])));
    }

    #[test]
    fn finds_virtio_mmio_devices() {
        let c = b"console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
                  virtio_mmio.device=0x1000@0xd0001000:6:3 virtio_mmio.device=bad \
                  virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:x";
        let d: Vec<MmioDevice> = mmio_devices(c).collect();
        assert_eq!(
            d,
            [
                MmioDevice {
                    base: 0xd000_0000,
                    size: 4096,
                    irq: 5
                },
                MmioDevice {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
                MmioDevice {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
            ]
        );
        assert_eq!(parse_mmio_device(b"0@0x1000:5"), None);
        assert_eq!(parse_mmio_device(b"4K@0x1000:5junk"), None);
        assert_eq!(parse_mmio_device(b"4K0x1000:5"), None);
        assert_eq!(mmio_devices(b"").count(), 0);
    }

    #[test]
    fn address_and_port_keys() {
        let fixed = |addr, prefix, gateway| IpConfig::Static {
            addr,
            prefix,
            gateway,
        };
        let cases = [
            (&b""[..], fixed([10, 0, 2, 15], 24, Some([10, 0, 2, 2]))),
            (
                b"micro.ip=192.168.7.9/16 micro.gw=192.168.0.1",
                fixed([192, 168, 7, 9], 16, Some([192, 168, 0, 1])),
            ),
            (
                b"micro.ip=172.16.0.2 micro.gw=none",
                fixed([172, 16, 0, 2], 24, None),
            ),
        ];
        for (cmdline, want) in cases {
            assert_eq!(ip_config(cmdline), want, "{cmdline:?}");
        }
        assert_eq!(ip_config(b"micro.ip=dhcp"), IpConfig::Dhcp);
        // Malformed values fall back to the defaults.
        assert_eq!(ip_config(b"micro.ip=1.2.3/8 micro.gw=x"), ip_config(b""));
        assert_eq!(ip_config(b"micro.ip=1.2.3.4/33"), ip_config(b""));
        assert_eq!(parse_ipv4(b"1.2.3.4.5"), None);
        assert_eq!(parse_ipv4(b"256.1.1.1"), None);
        assert_eq!(parse_ipv4(b"01.2.3.4"), Some([1, 2, 3, 4]));
        assert_eq!(port(b""), 80);
        assert_eq!(port(b"micro.port=8080"), 8080);
        assert_eq!(port(b"micro.port=0"), 80);
        assert_eq!(port(b"micro.port=70000"), 80);
        assert_eq!(value(b"a=1 b=2 a=3", b"a="), Some(&b"3"[..]));
        assert_eq!(value(b"a=1", b"c="), None);
    }
}
