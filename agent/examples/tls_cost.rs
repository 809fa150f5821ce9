//! Where a fresh HTTPS connection's time goes, on this machine: a TCP connect alone, the
//! crypto of a handshake without any I/O (per key type and key-exchange group), and whole
//! handshakes over loopback, full and resumed. Prints one JSON object of medians (ms).
//!
//! `cargo run --release -p agent --example tls_cost -- [RUNS]`, or against a running agent:
//! `... -- RUNS http://IP:PORT` or `... -- RUNS https://IP:PORT FINGERPRINT`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use agent::tls::{Pin, PinVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A self-signed certificate with a key of `alg`.
fn identity(alg: &'static rcgen::SignatureAlgorithm) -> (CertificateDer<'static>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["cloudlet.local".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.der().clone(), key.serialize_der())
}

fn provider(group: &'static str) -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups.retain(|g| format!("{:?}", g.name()) == group);
    assert!(!p.kx_groups.is_empty(), "no group {group}");
    Arc::new(p)
}

fn server_config(
    cert: &CertificateDer<'static>,
    key: &[u8],
    p: Arc<CryptoProvider>,
    tickets: bool,
) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
        )
        .unwrap();
    if tickets {
        c.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
    }
    Arc::new(c)
}

fn client_config(fp: &str, p: Arc<CryptoProvider>) -> Arc<rustls::ClientConfig> {
    let v = Arc::new(PinVerifier::new(Pin::Fingerprints(vec![fp.into()])));
    let c = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_no_client_auth();
    Arc::new(c)
}

/// A handshake between two in-memory connections: the crypto alone, ms.
fn in_memory(server: &Arc<rustls::ServerConfig>, client: &Arc<rustls::ClientConfig>) -> f64 {
    let t = Instant::now();
    let mut c = rustls::ClientConnection::new(client.clone(), "cloudlet.local".try_into().unwrap())
        .unwrap();
    let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::new();
    while c.is_handshaking() || s.is_handshaking() || c.wants_write() || s.wants_write() {
        buf.clear();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        buf.clear();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
    }
    ms(t)
}

/// A server on loopback answering each connection's one request line with one line.
fn serve(config: Option<Arc<rustls::ServerConfig>>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            s.set_nodelay(true).unwrap();
            let mut b = [0u8; 64];
            match &config {
                None => {
                    let _ = s.read(&mut b);
                    let _ = s.write_all(b"ok\n");
                }
                Some(cfg) => {
                    let mut conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
                    let mut t = rustls::Stream::new(&mut conn, &mut s);
                    let _ = t.read(&mut b);
                    let _ = t.write_all(b"ok\n");
                    let _ = t.flush();
                }
            }
        }
    });
    a
}

/// One connection, one request, one answer, ms.
fn request(a: std::net::SocketAddr, client: Option<&Arc<rustls::ClientConfig>>) -> (f64, bool) {
    let t = Instant::now();
    let mut s = TcpStream::connect(a).unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = [0u8; 8];
    match client {
        None => {
            s.write_all(b"hi\n").unwrap();
            let _ = s.read(&mut b).unwrap();
            (ms(t), false)
        }
        Some(cfg) => {
            let mut conn =
                rustls::ClientConnection::new(cfg.clone(), "cloudlet.local".try_into().unwrap())
                    .unwrap();
            let mut t2 = rustls::Stream::new(&mut conn, &mut s);
            t2.write_all(b"hi\n").unwrap();
            let _ = t2.read(&mut b).unwrap();
            // Take the tickets sent after the answer, so the next connection can resume.
            let took = ms(t);
            s.set_read_timeout(Some(std::time::Duration::from_millis(20)))
                .unwrap();
            let mut t3 = rustls::Stream::new(&mut conn, &mut s);
            let _ = t3.read(&mut b);
            let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            (took, resumed)
        }
    }
}

/// Against a running agent: `tls_cost RUNS http://IP:PORT` (plain) or `tls_cost RUNS
/// https://IP:PORT FINGERPRINT`: fresh connections, each one `GET /v1/system` through the
/// client library — plain, or HTTPS with a full handshake and HTTPS resuming — plus, over
/// HTTPS, the handshake alone and the same request on a raw rustls stream. Prints one JSON
/// object of medians (ms) on stdout (what `bench agent` reads), lines for people on stderr.
fn against_agent(runs: usize, url: &str, fp: Option<&str>) {
    use agent::client::{forget_tls_sessions, Client};
    let get = |c: &Client| {
        let t = Instant::now();
        let r = c.raw("GET", "/v1/system", None, false).unwrap();
        assert_eq!(r.status, 200);
        (ms(t), c.resumed())
    };
    let mut out = serde_json::Map::new();
    let mut put = |k: &str, v: f64| {
        eprintln!("{k:<40} {v:>8.3}");
        out.insert(k.into(), v.into());
    };
    if url.starts_with("http://") {
        let v: Vec<f64> = (0..runs).map(|_| get(&Client::new(url, None)).0).collect();
        put("plain_fresh_ms", median(v));
        println!("{}", serde_json::Value::Object(out));
        return;
    }
    let fp = fp.expect("the fingerprint after an https URL");
    let (mut full, mut resumed, mut hs, mut raw) = (vec![], vec![], vec![], vec![]);
    let mut resumed_n = 0;
    let addr: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let cfg = client_config(fp, provider("X25519"));
    for _ in 0..runs {
        forget_tls_sessions();
        full.push(get(&Client::pinned(url, None, fp)).0);
        let (t, r) = get(&Client::pinned(url, None, fp));
        resumed.push(t);
        resumed_n += usize::from(r);
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut conn =
            rustls::ClientConnection::new(cfg.clone(), "cloudlet.local".try_into().unwrap())
                .unwrap();
        conn.complete_io(&mut s).unwrap();
        hs.push(ms(t));
        // The same request as the client library's, written on the raw TLS stream.
        let mut st = rustls::Stream::new(&mut conn, &mut s);
        st.write_all(b"GET /v1/system HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = Vec::new();
        let _ = st.read_to_end(&mut body);
        raw.push(ms(t));
    }
    // Which key exchange the client library's configuration ends up with.
    let v = Arc::new(PinVerifier::new(Pin::Fingerprints(vec![fp.into()])));
    let mut s = TcpStream::connect(addr).unwrap();
    let mut conn = rustls::ClientConnection::new(
        Arc::new(v.client_config()),
        "cloudlet.local".try_into().unwrap(),
    )
    .unwrap();
    conn.complete_io(&mut s).unwrap();
    eprintln!(
        "key exchange {:?}",
        conn.negotiated_key_exchange_group().map(|g| g.name())
    );
    put("https_full_fresh_ms", median(full));
    put("https_resumed_fresh_ms", median(resumed));
    put("https_resumed_fraction", resumed_n as f64 / runs as f64);
    put("tcp_and_tls_handshake_only_ms", median(hs));
    put("raw_rustls_get_ms", median(raw));
    println!("{}", serde_json::Value::Object(out));
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    if let Some(url) = std::env::args().nth(2) {
        against_agent(runs, &url, std::env::args().nth(3).as_deref());
        return;
    }
    let mut out = serde_json::Map::new();
    let mut put = |k: String, v: f64| {
        println!("{k:<40} {v:>8.3}");
        out.insert(k, v.into());
    };
    for (kname, alg) in [
        ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let (cert, key) = identity(alg);
        let fp = agent::tls::fingerprint(&cert);
        for group in ["X25519", "secp256r1"] {
            let p = provider(group);
            let server = server_config(&cert, &key, p.clone(), true);
            let v: Vec<f64> = (0..runs)
                .map(|_| in_memory(&server, &client_config(&fp, p.clone())))
                .collect();
            put(format!("crypto_full_{kname}_{group}_ms"), median(v));
            let client = client_config(&fp, p.clone());
            in_memory(&server, &client);
            let v: Vec<f64> = (0..runs).map(|_| in_memory(&server, &client)).collect();
            put(format!("crypto_resumed_{kname}_{group}_ms"), median(v));
        }
    }
    let plain = serve(None);
    let v: Vec<f64> = (0..runs).map(|_| request(plain, None).0).collect();
    put("loopback_plain_request_ms".into(), median(v));
    let (cert, key) = identity(&rcgen::PKCS_ECDSA_P256_SHA256);
    let fp = agent::tls::fingerprint(&cert);
    let p = provider("X25519");
    let tls = serve(Some(server_config(&cert, &key, p.clone(), true)));
    let v: Vec<f64> = (0..runs)
        .map(|_| request(tls, Some(&client_config(&fp, p.clone()))).0)
        .collect();
    put("loopback_tls_full_request_ms".into(), median(v));
    let shared = client_config(&fp, p.clone());
    request(tls, Some(&shared));
    let mut resumed = 0;
    let v: Vec<f64> = (0..runs)
        .map(|_| {
            let (t, r) = request(tls, Some(&shared));
            resumed += usize::from(r);
            t
        })
        .collect();
    put("loopback_tls_resumed_request_ms".into(), median(v));
    put(
        "loopback_tls_resumed_fraction".into(),
        resumed as f64 / runs as f64,
    );
    eprintln!("{}", serde_json::Value::Object(out));
}
