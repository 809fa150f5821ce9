//! The appliance's TLS identity and certificate pinning.
//!
//! On first start the agent makes a self-signed certificate (ECDSA P-256, rcgen on ring) and
//! keeps it in the data directory: `DATA/tls/cert.der` (the certificate, DER) and
//! `DATA/tls/key.der` (its PKCS#8 private key, mode 0600). Later starts load them, so the
//! certificate, and with it the appliance's fingerprint, stays the same for the life of the
//! data directory (remove `DATA/tls/` to make a new one; every client must then pin it anew).
//!
//! The fingerprint is the SHA-256 of the DER certificate, 64 lower-case hex digits. It is
//! shown in `GET /v1/system` (`fingerprint`), announced in the mDNS TXT record (`fp`) and
//! handed to a phone in the pairing answer. Clients do not check names or a CA: they pin the
//! fingerprint ([`PinVerifier`]), still checking that the server holds the certificate's key
//! (the handshake signature).
//!
//! Only rustls with the `ring` provider is used (no aws-lc-rs).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

/// The directory of the certificate and key, in the data directory.
pub const TLS_DIR: &str = "tls";
/// The certificate file (DER) in [`TLS_DIR`].
pub const CERT_FILE: &str = "cert.der";
/// The private key file (PKCS#8 DER, mode 0600) in [`TLS_DIR`].
pub const KEY_FILE: &str = "key.der";

/// Errors of the TLS identity and of pinning.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the identity cannot be read or written.
    #[error("cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// The certificate could not be made.
    #[error("cannot make the appliance certificate")]
    Generate(#[source] rcgen::Error),
    /// The stored key and certificate are unusable.
    #[error("the appliance certificate in {0} is damaged (remove the directory to make a new one; clients must then pin the new fingerprint)")]
    Damaged(PathBuf, #[source] rustls::Error),
    /// The stored key does not parse.
    #[error("the appliance key in {0} is damaged (remove the directory to make a new one; clients must then pin the new fingerprint)")]
    BadKey(PathBuf, #[source] rcgen::Error),
    /// A fingerprint that is not 64 hex digits.
    #[error("'{0}' is not a certificate fingerprint (64 hex digits of SHA-256, colons allowed)")]
    BadFingerprint(String),
}

/// The SHA-256 of `der` (a DER certificate), 64 lower-case hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    crate::store::hex(&Sha256::digest(der))
}

/// A fingerprint as people write it (upper or lower case, with or without colons) in the
/// canonical form of [`fingerprint`].
pub fn parse_fingerprint(s: &str) -> Result<String, TlsError> {
    let t: String = s.trim().chars().filter(|c| *c != ':').collect();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(t.to_ascii_lowercase())
    } else {
        Err(TlsError::BadFingerprint(s.into()))
    }
}

/// The crypto provider used everywhere: rustls on ring (rustls marks it deprecated for
/// lacking post-quantum key exchange, which only its aws-lc-rs provider has; this project
/// builds without aws-lc-rs and its cmake), with X25519 as the preferred key exchange, then
/// P-256, then P-384. ring's default lists P-384 first, which both sides then use: its
/// generic big-number code made every handshake, full or resumed, ~2 ms slower here (a
/// fresh HTTPS request 2.5 ms against 0.6 with X25519; `examples/tls_cost.rs`).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::NamedGroup;
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups.sort_by_key(|g| match g.name() {
        NamedGroup::X25519 => 0,
        NamedGroup::secp256r1 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// The appliance's certificate and key.
pub struct ApplianceCert {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    spki: Vec<u8>,
    fingerprint: String,
}

impl std::fmt::Debug for ApplianceCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplianceCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Writes `bytes` to `path` through a temporary file created with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| TlsError::Io("write", path.into(), e))
}

impl ApplianceCert {
    /// Loads the identity kept in `data` (the data directory), or makes one and keeps it
    /// there when there is none. `id` (the appliance id) goes into the certificate's names.
    pub fn load_or_create(data: &Path, id: &str) -> Result<ApplianceCert, TlsError> {
        let dir = data.join(TLS_DIR);
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        // The key is written first: a key without a certificate is an interrupted first
        // start (no fingerprint was ever shown), so it is made again.
        if cert_path.exists() {
            let cert = std::fs::read(&cert_path)
                .map_err(|e| TlsError::Io("read", cert_path.clone(), e))?;
            let key =
                std::fs::read(&key_path).map_err(|e| TlsError::Io("read", key_path.clone(), e))?;
            let c = ApplianceCert::from_der(cert, key).map_err(|e| match e {
                TlsError::Damaged(_, s) => TlsError::Damaged(dir.clone(), s),
                TlsError::BadKey(_, s) => TlsError::BadKey(dir.clone(), s),
                e => e,
            })?;
            return Ok(c);
        }
        let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
        let host = format!("cloudlet-{id}.local");
        let mut params =
            rcgen::CertificateParams::new(vec![host.clone()]).map_err(TlsError::Generate)?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("cloudlet appliance {id}"),
        );
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        std::fs::create_dir_all(&dir).map_err(|e| TlsError::Io("create", dir.clone(), e))?;
        let key_der = key.serialize_der();
        write_file(&key_path, &key_der, 0o600)?;
        write_file(&cert_path, cert.der(), 0o644)?;
        let c = ApplianceCert::from_der(cert.der().to_vec(), key_der)?;
        tracing::info!(fingerprint = %c.fingerprint, dir = %dir.display(), "made the appliance certificate");
        Ok(c)
    }

    /// An identity from a DER certificate and its PKCS#8 DER key (checked to match).
    pub fn from_der(cert: Vec<u8>, key: Vec<u8>) -> Result<ApplianceCert, TlsError> {
        let key = PrivatePkcs8KeyDer::from(key);
        let kp = rcgen::KeyPair::try_from(&key).map_err(|e| TlsError::BadKey(PathBuf::new(), e))?;
        let c = ApplianceCert {
            fingerprint: fingerprint(&cert),
            cert: CertificateDer::from(cert),
            key,
            spki: rcgen::PublicKeyData::subject_public_key_info(&kp),
        };
        // Fails when the key is not the certificate's.
        c.server_config()?;
        Ok(c)
    }

    /// SHA-256 of the DER certificate, 64 lower-case hex digits.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// Base64 of the SHA-256 of the certificate's public key (SubjectPublicKeyInfo): what
    /// Chromium's `--ignore-certificate-errors-spki-list` takes to trust exactly this key.
    pub fn spki_sha256_base64(&self) -> String {
        base64(&Sha256::digest(&self.spki))
    }

    /// The rustls server configuration serving this certificate (HTTP/1.1).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Damaged(PathBuf::new(), e))?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .map_err(|e| TlsError::Damaged(PathBuf::new(), e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Resumption: a client back within a ticket's life skips the certificate, its
        // signature and its verification. TLS 1.3 tickets are stateless (encrypted with a
        // key of this process, rotated by ring's ticketer); TLS 1.2 clients resume from the
        // in-memory session cache. No 0-RTT early data (a replayable request).
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| TlsError::Damaged(PathBuf::new(), e))?;
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        Ok(Arc::new(cfg))
    }
}

/// TLS 1.2 sessions the server keeps for resumption.
pub const SESSION_CACHE: usize = 1024;

/// Standard base64 with padding.
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, x)| n | u32::from(*x) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The certificate a server presented is not the pinned one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the server presented a certificate with fingerprint {got}, but {} pinned (a different appliance, or one whose certificate was remade: check with its operator before pinning again)", if .pinned.len() == 1 { format!("{} is", .pinned[0]) } else { format!("{} are", .pinned.join(", ")) })]
pub struct PinMismatch {
    /// The fingerprint presented.
    pub got: String,
    /// The fingerprints pinned.
    pub pinned: Vec<String>,
}

/// What a client accepts as the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pin {
    /// A certificate whose fingerprint is one of these.
    Fingerprints(Vec<String>),
    /// Any certificate (trust on first use): the fingerprint seen is recorded so the caller
    /// can show it and pin it.
    FirstUse,
}

/// A rustls verifier that accepts the server's certificate by fingerprint ([`Pin`]) and
/// still verifies the handshake signature with the certificate's key. (It is not asked on a
/// resumed handshake: the session resumed was made by a handshake it passed.)
#[derive(Debug)]
pub struct PinVerifier {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// A verifier for `pin`.
    pub fn new(pin: Pin) -> PinVerifier {
        PinVerifier {
            pin,
            provider: provider(),
        }
    }

    /// A rustls client configuration using this verifier.
    pub fn client_config(self: &Arc<Self>) -> rustls::ClientConfig {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        match &self.pin {
            Pin::FirstUse => Ok(ServerCertVerified::assertion()),
            Pin::Fingerprints(p) if p.contains(&got) => Ok(ServerCertVerified::assertion()),
            Pin::Fingerprints(p) => Err(rustls::Error::InvalidCertificate(
                CertificateError::Other(OtherError(Arc::new(PinMismatch {
                    got,
                    pinned: p.clone(),
                }))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The [`PinMismatch`] somewhere in `e`'s chain of causes (through I/O and rustls errors).
pub fn find_mismatch<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a PinMismatch> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(m) = c.downcast_ref::<PinMismatch>() {
            return Some(m);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) =
            c.downcast_ref::<rustls::Error>()
        {
            if let Some(m) = o.0.downcast_ref::<PinMismatch>() {
                return Some(m);
            }
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_certificate_is_made_once_kept_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("keep");
        let a = ApplianceCert::load_or_create(&d, "0123456789ab").unwrap();
        assert_eq!(a.fingerprint().len(), 64);
        assert_eq!(a.fingerprint(), fingerprint(a.cert_der()));
        let key = d.join(TLS_DIR).join(KEY_FILE);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is the owner's only");
        let b = ApplianceCert::load_or_create(&d, "0123456789ab").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint(), "reloaded, not remade");
        assert_eq!(a.spki_sha256_base64(), b.spki_sha256_base64());
        assert_eq!(a.spki_sha256_base64().len(), 44);
        // A key without its certificate (an interrupted first start) is made anew.
        let cert = d.join(TLS_DIR).join(CERT_FILE);
        std::fs::remove_file(&cert).unwrap();
        let c = ApplianceCert::load_or_create(&d, "0123456789ab").unwrap();
        assert_ne!(c.fingerprint(), a.fingerprint());
        // A damaged key is refused with a clear error, and nothing is overwritten.
        std::fs::write(&key, b"not a key").unwrap();
        let e = ApplianceCert::load_or_create(&d, "0123456789ab").unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert_eq!(std::fs::read(&key).unwrap(), b"not a key");
        // Another appliance's key with this certificate is refused.
        let other = ApplianceCert::load_or_create(&scratch("other"), "ba9876543210").unwrap();
        assert!(
            ApplianceCert::from_der(a.cert.to_vec(), other.key.secret_pkcs8_der().to_vec())
                .is_err()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn handshakes_use_x25519() {
        let d = scratch("kx");
        let a = ApplianceCert::load_or_create(&d, "0123456789ab").unwrap();
        let v = Arc::new(PinVerifier::new(Pin::Fingerprints(vec![a
            .fingerprint()
            .to_string()])));
        let mut c = rustls::ClientConnection::new(
            Arc::new(v.client_config()),
            "cloudlet.local".try_into().unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(a.server_config().unwrap()).unwrap();
        let mut buf = Vec::new();
        while c.is_handshaking() || s.is_handshaking() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        let kx = |g: Option<&'static dyn rustls::crypto::SupportedKxGroup>| g.map(|g| g.name());
        assert_eq!(
            kx(c.negotiated_key_exchange_group()),
            Some(rustls::NamedGroup::X25519)
        );
        assert_eq!(
            kx(s.negotiated_key_exchange_group()),
            Some(rustls::NamedGroup::X25519)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let f = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&f.to_uppercase()).unwrap(), f);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")).unwrap(), f);
        for bad in ["", "ab", &"zz".repeat(32), &"a".repeat(65)] {
            assert!(parse_fingerprint(bad).is_err(), "{bad}");
        }
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
