//! What the manager's QR code holds, for a device that pairs without USB:
//!
//! ```text
//! cloudlet://pair?v=1&id=APPLIANCE_ID&api=https://IP:PORT&fp=SHA256_HEX&code=CLAIM_CODE
//! ```
//!
//! The device claims its credential at `api` + `/v1/pairing/claim` with `code`, and pins the
//! certificate whose SHA-256 is `fp`. Values are percent-encoded where they need it.

use super::PairingError;

/// The URI scheme and path.
pub const PREFIX: &str = "cloudlet://pair?";

/// The QR code's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QrPayload {
    /// The appliance's id.
    pub appliance_id: String,
    /// Its API's base URL.
    pub api: String,
    /// SHA-256 of its TLS certificate.
    pub fingerprint: [u8; 32],
    /// The window's claim code.
    pub code: String,
}

fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The 32 bytes 64 hex digits spell (a SHA-256 fingerprint), if they do.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl QrPayload {
    /// The URI.
    pub fn to_uri(&self) -> String {
        format!(
            "{PREFIX}v=1&id={}&api={}&fp={}&code={}",
            encode(&self.appliance_id),
            encode(&self.api),
            crate::store::hex(&self.fingerprint),
            encode(&self.code)
        )
    }

    /// Parses a URI as [`QrPayload::to_uri`] writes it (what a phone does with the scan).
    pub fn parse(uri: &str) -> Result<QrPayload, PairingError> {
        let bad = |why: &'static str| PairingError::BadQr(why);
        let q = uri
            .strip_prefix(PREFIX)
            .ok_or(bad("not a cloudlet pairing URI"))?;
        let (mut id, mut api, mut fp, mut code, mut v) = (None, None, None, None, None);
        for kv in q.split('&') {
            let (k, val) = kv.split_once('=').ok_or(bad("a parameter without '='"))?;
            let val = decode(val).ok_or(bad("bad percent-encoding"))?;
            match k {
                "v" => v = Some(val),
                "id" => id = Some(val),
                "api" => api = Some(val),
                "fp" => fp = Some(unhex32(&val).ok_or(bad("fp is not 64 hex digits"))?),
                "code" => code = Some(val),
                _ => {}
            }
        }
        if v.as_deref() != Some("1") {
            return Err(bad("unknown version (v=1 expected)"));
        }
        Ok(QrPayload {
            appliance_id: id.ok_or(bad("no id"))?,
            api: api.ok_or(bad("no api"))?,
            fingerprint: fp.ok_or(bad("no fp"))?,
            code: code.ok_or(bad("no code"))?,
        })
    }

    /// The QR code as an SVG image.
    pub fn svg(&self) -> Result<String, PairingError> {
        let code = qrcode::QrCode::new(self.to_uri().as_bytes()).map_err(PairingError::Qr)?;
        Ok(code
            .render::<qrcode::render::svg::Color>()
            .min_dimensions(240, 240)
            .build())
    }

    /// The QR code as text for a terminal (two modules per character row).
    pub fn text(&self) -> Result<String, PairingError> {
        use qrcode::render::unicode::Dense1x2;
        let code = qrcode::QrCode::new(self.to_uri().as_bytes()).map_err(PairingError::Qr)?;
        Ok(code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_qr_payload_round_trips_and_renders() {
        let p = QrPayload {
            appliance_id: "0123456789ab".into(),
            api: "https://[fe80::1%eth0]:9999".into(),
            fingerprint: [0xAB; 32],
            code: "ABCDE23456".into(),
        };
        let uri = p.to_uri();
        assert!(
            uri.starts_with(
                "cloudlet://pair?v=1&id=0123456789ab&api=https://%5Bfe80::1%25eth0%5D:9999&fp=abab"
            ),
            "{uri}"
        );
        assert_eq!(QrPayload::parse(&uri).unwrap(), p);
        let svg = p.svg().unwrap();
        assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg}");
        assert!(p.text().unwrap().lines().count() > 10);
        assert!(QrPayload::parse("https://x").is_err());
        assert!(QrPayload::parse(&uri.replace("v=1", "v=2")).is_err());
        assert!(QrPayload::parse(&uri.replace("fp=ab", "fp=zz")).is_err());
    }
}
