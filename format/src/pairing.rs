//! The pairing messages: how a phone (the device) and the appliance agree on a credential,
//! over USB (Android Open Accessory bulk endpoints) or over HTTPS with a claim code from the
//! manager's QR code. Same messages, two transports.
//!
//! ```text
//! frame:     0   4   magic "CLPR"
//!            4   2   version (u16 LE), currently 1
//!            6   1   kind: 1 Challenge, 2 Hello, 3 Welcome, 4 Refusal
//!            7   1   reserved, 0
//!            8   4   body length (u32 LE, ≤ MAX_BODY)
//!           12 len   body (fields below, in order, nothing after the last)
//!       12+len   4   CRC-32/ISO-HDLC of bytes 0..12+len (u32 LE)
//!
//! field types:  bytes  = u8 length + that many bytes
//!               str    = u16 LE length + that many bytes of UTF-8
//!               u64    = 8 bytes LE
//!
//! Challenge (appliance → device, USB only)
//!     nonce        bytes  16..=64   fresh for each session
//!     confirm      str    1..=16    the confirmation code the manager shows
//! Hello (device → appliance)
//!     nonce        bytes  16..=64   the Challenge's nonce (the claim nonce over HTTPS)
//!     device id    str    1..=64
//!     name         str    1..=64
//!     model        str    0..=64
//! Welcome (appliance → device)
//!     appliance id str    1..=64
//!     api count    u8     1..=8, then each API address as str 1..=128 ("https://IP:PORT")
//!     fingerprint  32 bytes        SHA-256 of the appliance's TLS certificate (DER)
//!     secret       str    16..=128 the device's own credential
//!     expires      u64             unix seconds
//!     wifi         u8     0 none, 1 a WPA2 profile follows:
//!       ssid       str    1..=32
//!       passphrase str    8..=63
//! Refusal (appliance → device)
//!     reason       u16 LE          see `Reason`
//!     text         str    0..=256  what happened and what to do, for people
//! ```
//!
//! Order (USB): `Challenge → Hello → Welcome | Refusal`. Over HTTPS there is no Challenge:
//! the Hello's nonce is derived from the claim code by the agent, and the claim code travels
//! beside the frame. Version 1 is the first; a frame with another version is refused.
//!
//! [`Frame::new_checked`] checks, in order: length, magic, version, reserved byte, kind, body
//! length, checksum; [`Message::parse`] then decodes the body with every field bounded and
//! every string checked as UTF-8. Nothing here panics on any input, and [`Message::emit`]
//! refuses out-of-bounds fields rather than writing a frame the other side would refuse.

use crate::le_u32;

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"CLPR";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 12;
/// Bytes after the body (the CRC).
pub const TRAILER_LEN: usize = 4;
/// Largest body.
pub const MAX_BODY: u32 = 4096;
/// Largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY as usize + TRAILER_LEN;
/// Shortest session nonce.
pub const MIN_NONCE: usize = 16;
/// Longest session nonce.
pub const MAX_NONCE: usize = 64;
/// Most API addresses in a Welcome.
pub const MAX_ADDRS: usize = 8;

/// CRC-32/ISO-HDLC (the zlib/Ethernet CRC): a phone computes it with `java.util.zip.CRC32`.
pub const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

mod field {
    use std::ops::Range;

    pub const MAGIC: Range<usize> = 0..4;
    pub const VERSION: Range<usize> = 4..6;
    pub const KIND: usize = 6;
    pub const RESERVED: usize = 7;
    pub const LENGTH: Range<usize> = 8..12;
}

/// Why a frame was refused or could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// Fewer bytes than the header or the length announces.
    #[error("pairing frame truncated: {have} bytes of {want}")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        want: usize,
    },
    /// Not a pairing frame.
    #[error("not a pairing frame (bad magic)")]
    BadMagic,
    /// Another protocol version.
    #[error("pairing version {0} is not supported (this side speaks version {VERSION})")]
    Version(u16),
    /// The checksum does not match: the frame was damaged or altered.
    #[error("pairing frame is corrupt (CRC-32 mismatch)")]
    Checksum,
    /// Reserved byte set, unknown kind or body too long.
    #[error("malformed pairing frame: {0}")]
    Malformed(&'static str),
    /// A field out of its bounds (reading or writing).
    #[error("pairing field `{0}` is out of bounds ({1})")]
    Field(&'static str, &'static str),
    /// A string field is not UTF-8.
    #[error("pairing field `{0}` is not UTF-8")]
    Utf8(&'static str),
    /// Bytes after the last field.
    #[error("{0} unexpected bytes after the pairing message")]
    Trailing(usize),
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Appliance: a session begins.
    Challenge = 1,
    /// Device: who it is.
    Hello = 2,
    /// Appliance: paired; the device's credential.
    Welcome = 3,
    /// Appliance: not paired, and why.
    Refusal = 4,
}

impl Kind {
    /// The kind of byte `v`.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Challenge,
            2 => Kind::Hello,
            3 => Kind::Welcome,
            4 => Kind::Refusal,
            _ => return None,
        })
    }
}

/// A checked view of one frame's bytes (smoltcp style: the accessors never panic once
/// [`Frame::new_checked`] has accepted the buffer).
#[derive(Debug, Clone)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

/// The length of the whole frame that starts with `prefix`, once its header is there:
/// `Ok(None)` while fewer than [`HEADER_LEN`] bytes have arrived. Checks magic, version and
/// the length bound, so a reader on a stream never waits for (or allocates) a bogus length.
pub fn frame_len(prefix: &[u8]) -> Result<Option<usize>, PairingError> {
    let Some(h) = prefix.get(..HEADER_LEN) else {
        if !MAGIC.starts_with(&prefix[..prefix.len().min(MAGIC.len())]) {
            return Err(PairingError::BadMagic);
        }
        return Ok(None);
    };
    if &h[field::MAGIC] != MAGIC {
        return Err(PairingError::BadMagic);
    }
    let version = u16::from_le_bytes([h[field::VERSION.start], h[field::VERSION.start + 1]]);
    if version != VERSION {
        return Err(PairingError::Version(version));
    }
    let len = le_u32(h, field::LENGTH);
    if len > MAX_BODY {
        return Err(PairingError::Malformed("body longer than 4096 bytes"));
    }
    Ok(Some(HEADER_LEN + len as usize + TRAILER_LEN))
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// A view of `buffer` (exactly one frame) once every check of the module doc holds.
    pub fn new_checked(buffer: T) -> Result<Frame<T>, PairingError> {
        let b = buffer.as_ref();
        let want = frame_len(b)?.ok_or(PairingError::Truncated {
            have: b.len(),
            want: HEADER_LEN,
        })?;
        if b[field::RESERVED] != 0 {
            return Err(PairingError::Malformed("reserved byte is not zero"));
        }
        if Kind::from_u8(b[field::KIND]).is_none() {
            return Err(PairingError::Malformed("unknown message kind"));
        }
        if b.len() < want {
            return Err(PairingError::Truncated {
                have: b.len(),
                want,
            });
        }
        if b.len() > want {
            return Err(PairingError::Trailing(b.len() - want));
        }
        let sum = le_u32(b, want - TRAILER_LEN..want);
        if sum != CRC32.checksum(&b[..want - TRAILER_LEN]) && !cfg!(fuzzing) {
            return Err(PairingError::Checksum);
        }
        Ok(Frame { buffer })
    }

    /// The message kind.
    pub fn kind(&self) -> Kind {
        Kind::from_u8(self.buffer.as_ref()[field::KIND]).unwrap_or(Kind::Refusal)
    }

    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[HEADER_LEN..b.len() - TRAILER_LEN]
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

/// Appliance → device: a session begins (USB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The session nonce the Hello must echo.
    pub nonce: Vec<u8>,
    /// The confirmation code the manager shows, for the phone to show beside it.
    pub confirm: String,
}

/// Device → appliance: who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The session nonce, echoed.
    pub nonce: Vec<u8>,
    /// The device's stable id.
    pub device_id: String,
    /// A name for people ("Ana's phone").
    pub name: String,
    /// Its model ("Pixel 8").
    pub model: String,
}

/// A WPA2 network the phone may join to reach the appliance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WifiProfile {
    /// Network name, 1 to 32 bytes.
    pub ssid: String,
    /// WPA2 passphrase, 8 to 63 characters.
    pub passphrase: String,
}

/// Appliance → device: paired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The appliance's id.
    pub appliance_id: String,
    /// Where its API listens ("https://IP:PORT"), 1 to 8.
    pub api: Vec<String>,
    /// SHA-256 of its TLS certificate (DER), to pin.
    pub fingerprint: [u8; 32],
    /// The device's credential (a bearer secret).
    pub secret: String,
    /// When the credential expires, unix seconds.
    pub expires_unix: u64,
    /// A Wi-Fi profile for the appliance's network, when the board has one.
    pub wifi: Option<WifiProfile>,
}

/// Why a pairing was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No pairing window is open.
    WindowClosed,
    /// The Hello does not answer this session's challenge (replayed or foreign).
    BadNonce,
    /// The frame was damaged, malformed or not the message expected.
    BadFrame,
    /// The claim code is not this window's.
    WrongClaimCode,
    /// The claim code was already used.
    ClaimCodeUsed,
    /// The appliance could not issue a credential.
    Internal,
    /// A reason this side does not know (a newer peer).
    Other(u16),
}

impl Reason {
    /// Its code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Reason::WindowClosed => 1,
            Reason::BadNonce => 2,
            Reason::BadFrame => 3,
            Reason::WrongClaimCode => 4,
            Reason::ClaimCodeUsed => 5,
            Reason::Internal => 6,
            Reason::Other(c) => c,
        }
    }

    /// The reason of wire code `c`.
    pub fn from_code(c: u16) -> Reason {
        match c {
            1 => Reason::WindowClosed,
            2 => Reason::BadNonce,
            3 => Reason::BadFrame,
            4 => Reason::WrongClaimCode,
            5 => Reason::ClaimCodeUsed,
            6 => Reason::Internal,
            c => Reason::Other(c),
        }
    }
}

/// Appliance → device: not paired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why, for programs.
    pub reason: Reason,
    /// Why and what to do, for people.
    pub text: String,
}

/// Any pairing message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Refusal`].
    Refusal(Refusal),
}

const MAX_TEXT: usize = 256;

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(
        &mut self,
        name: &'static str,
        v: &[u8],
        min: usize,
        max: usize,
    ) -> Result<(), PairingError> {
        if v.len() < min || v.len() > max {
            return Err(PairingError::Field(name, "length"));
        }
        self.0.push(v.len() as u8);
        self.0.extend_from_slice(v);
        Ok(())
    }

    fn str(
        &mut self,
        name: &'static str,
        v: &str,
        min: usize,
        max: usize,
    ) -> Result<(), PairingError> {
        if v.len() < min || v.len() > max {
            return Err(PairingError::Field(name, "length"));
        }
        self.0.extend_from_slice(&(v.len() as u16).to_le_bytes());
        self.0.extend_from_slice(v.as_bytes());
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, name: &'static str, n: usize) -> Result<&'a [u8], PairingError> {
        if self.0.len() < n {
            return Err(PairingError::Field(name, "truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self, name: &'static str) -> Result<u8, PairingError> {
        Ok(self.take(name, 1)?[0])
    }

    fn u16(&mut self, name: &'static str) -> Result<u16, PairingError> {
        let b = self.take(name, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self, name: &'static str) -> Result<u64, PairingError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(name, 8)?);
        Ok(u64::from_le_bytes(v))
    }

    fn bytes(
        &mut self,
        name: &'static str,
        min: usize,
        max: usize,
    ) -> Result<Vec<u8>, PairingError> {
        let n = usize::from(self.u8(name)?);
        if n < min || n > max {
            return Err(PairingError::Field(name, "length"));
        }
        Ok(self.take(name, n)?.to_vec())
    }

    fn str(&mut self, name: &'static str, min: usize, max: usize) -> Result<String, PairingError> {
        let n = usize::from(self.u16(name)?);
        if n < min || n > max {
            return Err(PairingError::Field(name, "length"));
        }
        let b = self.take(name, n)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| PairingError::Utf8(name))
    }
}

impl Message {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Challenge(_) => Kind::Challenge,
            Message::Hello(_) => Kind::Hello,
            Message::Welcome(_) => Kind::Welcome,
            Message::Refusal(_) => Kind::Refusal,
        }
    }

    fn emit_body(&self, w: &mut Writer) -> Result<(), PairingError> {
        match self {
            Message::Challenge(c) => {
                w.bytes("nonce", &c.nonce, MIN_NONCE, MAX_NONCE)?;
                w.str("confirm", &c.confirm, 1, 16)?;
            }
            Message::Hello(h) => {
                w.bytes("nonce", &h.nonce, MIN_NONCE, MAX_NONCE)?;
                w.str("device_id", &h.device_id, 1, 64)?;
                w.str("name", &h.name, 1, 64)?;
                w.str("model", &h.model, 0, 64)?;
            }
            Message::Welcome(m) => {
                w.str("appliance_id", &m.appliance_id, 1, 64)?;
                if m.api.is_empty() || m.api.len() > MAX_ADDRS {
                    return Err(PairingError::Field("api", "count"));
                }
                w.0.push(m.api.len() as u8);
                for a in &m.api {
                    w.str("api", a, 1, 128)?;
                }
                w.0.extend_from_slice(&m.fingerprint);
                w.str("secret", &m.secret, 16, 128)?;
                w.0.extend_from_slice(&m.expires_unix.to_le_bytes());
                match &m.wifi {
                    None => w.0.push(0),
                    Some(p) => {
                        w.0.push(1);
                        w.str("ssid", &p.ssid, 1, 32)?;
                        if p.passphrase.chars().count() < 8 || p.passphrase.chars().count() > 63 {
                            return Err(PairingError::Field("passphrase", "length"));
                        }
                        w.str("passphrase", &p.passphrase, 8, 63 * 4)?;
                    }
                }
            }
            Message::Refusal(r) => {
                w.0.extend_from_slice(&r.reason.code().to_le_bytes());
                w.str("text", &r.text, 0, MAX_TEXT)?;
            }
        }
        Ok(())
    }

    /// The message as one frame; fields out of their bounds are refused.
    pub fn emit(&self) -> Result<Vec<u8>, PairingError> {
        let mut w = Writer(Vec::with_capacity(128));
        w.0.extend_from_slice(MAGIC);
        w.0.extend_from_slice(&VERSION.to_le_bytes());
        w.0.push(self.kind() as u8);
        w.0.push(0);
        w.0.extend_from_slice(&[0; 4]);
        self.emit_body(&mut w)?;
        let len = w.0.len() - HEADER_LEN;
        if len > MAX_BODY as usize {
            return Err(PairingError::Malformed("body longer than 4096 bytes"));
        }
        w.0[field::LENGTH].copy_from_slice(&(len as u32).to_le_bytes());
        let sum = CRC32.checksum(&w.0);
        w.0.extend_from_slice(&sum.to_le_bytes());
        Ok(w.0)
    }

    /// Parses one whole frame (see the module doc for the checks).
    pub fn parse(bytes: &[u8]) -> Result<Message, PairingError> {
        let f = Frame::new_checked(bytes)?;
        Message::parse_body(f.kind(), f.body())
    }

    /// Decodes the body of a checked frame of kind `kind`.
    pub fn parse_body(kind: Kind, body: &[u8]) -> Result<Message, PairingError> {
        let mut r = Reader(body);
        let m = match kind {
            Kind::Challenge => Message::Challenge(Challenge {
                nonce: r.bytes("nonce", MIN_NONCE, MAX_NONCE)?,
                confirm: r.str("confirm", 1, 16)?,
            }),
            Kind::Hello => Message::Hello(Hello {
                nonce: r.bytes("nonce", MIN_NONCE, MAX_NONCE)?,
                device_id: r.str("device_id", 1, 64)?,
                name: r.str("name", 1, 64)?,
                model: r.str("model", 0, 64)?,
            }),
            Kind::Welcome => {
                let appliance_id = r.str("appliance_id", 1, 64)?;
                let n = usize::from(r.u8("api")?);
                if n == 0 || n > MAX_ADDRS {
                    return Err(PairingError::Field("api", "count"));
                }
                let mut api = Vec::with_capacity(n);
                for _ in 0..n {
                    api.push(r.str("api", 1, 128)?);
                }
                let mut fingerprint = [0u8; 32];
                fingerprint.copy_from_slice(r.take("fingerprint", 32)?);
                let secret = r.str("secret", 16, 128)?;
                let expires_unix = r.u64("expires")?;
                let wifi = match r.u8("wifi")? {
                    0 => None,
                    1 => {
                        let ssid = r.str("ssid", 1, 32)?;
                        let passphrase = r.str("passphrase", 8, 63 * 4)?;
                        let n = passphrase.chars().count();
                        if !(8..=63).contains(&n) {
                            return Err(PairingError::Field("passphrase", "length"));
                        }
                        Some(WifiProfile { ssid, passphrase })
                    }
                    _ => return Err(PairingError::Field("wifi", "flag is not 0 or 1")),
                };
                Message::Welcome(Welcome {
                    appliance_id,
                    api,
                    fingerprint,
                    secret,
                    expires_unix,
                    wifi,
                })
            }
            Kind::Refusal => Message::Refusal(Refusal {
                reason: Reason::from_code(r.u16("reason")?),
                text: r.str("text", 0, MAX_TEXT)?,
            }),
        };
        if !r.0.is_empty() {
            return Err(PairingError::Trailing(r.0.len()));
        }
        Ok(m)
    }
}

impl Hello {
    /// Whether this Hello echoes `nonce`, compared in time independent of where they differ.
    pub fn answers(&self, nonce: &[u8]) -> bool {
        self.nonce.len() == nonce.len()
            && self
                .nonce
                .iter()
                .zip(nonce)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            nonce: vec![0xAA; 16],
            device_id: "d1".into(),
            name: "Ana".into(),
            model: "P8".into(),
        })
    }

    fn welcome() -> Welcome {
        Welcome {
            appliance_id: "0123456789ab".into(),
            api: vec![
                "https://10.0.0.1:9999".into(),
                "https://[fe80::1]:9999".into(),
            ],
            fingerprint: [7; 32],
            secret: "s".repeat(64),
            expires_unix: 1_800_000_000,
            wifi: Some(WifiProfile {
                ssid: "cloudlet".into(),
                passphrase: "correct horse".into(),
            }),
        }
    }

    #[test]
    fn golden_hello() {
        let b = hello().emit().unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = [
            b'C', b'L', b'P', b'R', 1, 0, 2, 0, 30, 0, 0, 0,
            16, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA,
            0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA,
            2, 0, b'd', b'1',
            3, 0, b'A', b'n', b'a',
            2, 0, b'P', b'8',
        ]
        .to_vec();
        assert_eq!(&b[..b.len() - 4], &want[..]);
        // CRC-32/ISO-HDLC of the above, as zlib computes it.
        assert_eq!(CRC32.checksum(b"123456789"), 0xCBF4_3926);
        assert_eq!(b[b.len() - 4..], 0x6f35_6652u32.to_le_bytes());
        assert_eq!(Message::parse(&b).unwrap(), hello());
    }

    #[test]
    fn golden_refusal() {
        let m = Message::Refusal(Refusal {
            reason: Reason::WindowClosed,
            text: "no".into(),
        });
        let b = m.emit().unwrap();
        assert_eq!(
            b,
            [
                b'C', b'L', b'P', b'R', 1, 0, 4, 0, 6, 0, 0, 0, 1, 0, 2, 0, b'n', b'o', 0xad, 0x79,
                0x39, 0xc5
            ]
        );
        assert_eq!(Message::parse(&b).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        let mut w = welcome();
        let msgs = [
            Message::Challenge(Challenge {
                nonce: (0..32).collect(),
                confirm: "482913".into(),
            }),
            hello(),
            Message::Welcome(w.clone()),
            {
                w.wifi = None;
                Message::Welcome(w)
            },
            Message::Refusal(Refusal {
                reason: Reason::Other(77),
                text: "later".into(),
            }),
        ];
        for m in msgs {
            let b = m.emit().unwrap();
            assert_eq!(frame_len(&b).unwrap(), Some(b.len()));
            assert_eq!(frame_len(&b[..5]).unwrap(), None);
            assert_eq!(Message::parse(&b).unwrap(), m);
        }
    }

    #[test]
    fn damaged_frames_are_refused() {
        let b = Message::Welcome(welcome()).emit().unwrap();
        // Any single flipped bit anywhere is caught.
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut x = b.clone();
                x[i] ^= 1 << bit;
                assert!(Message::parse(&x).is_err(), "flip {i}.{bit}");
            }
        }
        // Every truncation, and an extra byte.
        for cut in 0..b.len() {
            assert!(Message::parse(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Message::parse(&long), Err(PairingError::Trailing(1)));
        // A tampered field with a recomputed CRC still has to decode within bounds.
        let mut x = hello().emit().unwrap();
        x[12] = 15; // a 15-byte nonce
        let n = x.len() - 4;
        let sum = CRC32.checksum(&x[..n]);
        x[n..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            Message::parse(&x),
            Err(PairingError::Field("nonce", "length"))
        );
        // Another version and a bogus length are refused from the header alone.
        let mut v2 = b.clone();
        v2[4] = 2;
        assert_eq!(frame_len(&v2), Err(PairingError::Version(2)));
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(frame_len(&huge), Err(PairingError::Malformed(_))));
        assert_eq!(frame_len(b"XX"), Err(PairingError::BadMagic));
    }

    #[test]
    fn strings_are_bounded_and_utf8() {
        let mut x = Message::Hello(Hello {
            nonce: vec![1; 16],
            device_id: "ab".into(),
            name: "n".into(),
            model: String::new(),
        })
        .emit()
        .unwrap();
        // device_id "ab" → invalid UTF-8, CRC recomputed.
        x[12 + 17 + 2] = 0xFF;
        let n = x.len() - 4;
        let sum = CRC32.checksum(&x[..n]);
        x[n..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(Message::parse(&x), Err(PairingError::Utf8("device_id")));
        let long = Message::Hello(Hello {
            nonce: vec![1; 16],
            device_id: "x".repeat(65),
            name: "n".into(),
            model: String::new(),
        });
        assert_eq!(long.emit(), Err(PairingError::Field("device_id", "length")));
        let mut w = welcome();
        w.wifi.as_mut().unwrap().passphrase = "short".into();
        assert!(Message::Welcome(w).emit().is_err());
        let mut w = welcome();
        w.api = vec!["a".into(); 9];
        assert!(Message::Welcome(w).emit().is_err());
    }

    #[test]
    fn a_hello_answers_only_its_nonce() {
        let Message::Hello(h) = hello() else {
            unreachable!()
        };
        assert!(h.answers(&[0xAA; 16]));
        assert!(!h.answers(&[0xAB; 16]));
        assert!(!h.answers(&[0xAA; 17]));
    }
}
