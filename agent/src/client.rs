//! The client library: find cloudlets over mDNS, rank them, and use one's API.
//!
//! Ranking follows pycloud's rankers (free cores, free memory) and adds the measured round
//! trip to the API, which on a phone's Wi-Fi matters as much as capacity: see [`score`].
//!
//! An instance may be handed off to another appliance while a client uses it; the source
//! then shows it as `moved` with `moved_to`. [`Client::resolve`] follows that to where the
//! instance runs now, and a [`Session`] does it by itself: when its connection to the guest
//! breaks it asks the API again, follows a move, reconnects, and sends the request again (so
//! a request may reach the guest twice when the break came after the guest took it).
//!
//! Transport: `http://` bases are plain HTTP (an agent's loopback addresses); `https://`
//! bases need a pinned certificate fingerprint ([`Client::with_pin`], see [`crate::tls`]):
//! a server presenting another certificate is refused ([`ClientError::Pin`], naming both
//! fingerprints), and an https base without a pin is refused ([`ClientError::Unpinned`])
//! unless the caller asked for trust on first use ([`Pin::FirstUse`]). Clients pinned to the
//! same fingerprints share one TLS configuration and its session store, so a fresh
//! connection to an appliance this process has already talked to resumes its TLS session
//! (TLS 1.3 tickets: no certificate, signature or verification) instead of a full handshake;
//! [`forget_tls_sessions`] drops them.
//!
//! Discovery: every appliance found is probed in parallel, each probe given
//! [`PROBE_TIMEOUT`], so one that announces itself and never answers delays nothing beyond
//! that. An appliance is [`Trust::Pinned`] when it proved the certificate pinned for its id
//! in the client's [`PinStore`], [`Trust::Local`] when it is plain HTTP on this machine, and
//! [`Trust::Unverified`] otherwise; once the store holds any pin, [`best`] chooses among
//! pinned (and local) appliances only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::discovery::{browse, browse_until, Appliance};
use crate::guest::GuestConn;
use crate::handoff::{HandoffRequest, IncomingRequest};
use crate::http::{InstanceView, ServiceView, SystemInfo};
use crate::supervisor::{Receiving, State};
pub use crate::tls::Pin;
use crate::tls::{find_mismatch, PinMismatch, PinVerifier};

/// Most moves [`Client::resolve`] follows (a loop of `moved_to` is an error).
pub const MAX_HOPS: usize = 8;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP exchange failed (connection refused, timeout …).
    #[error("request to {url} failed")]
    Http {
        /// URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The agent answered with an error.
    #[error("{status} from {url}: {error}{}", if hint.is_empty() { String::new() } else { format!(" (hint: {hint})") })]
    Api {
        /// URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The `error` field.
        error: String,
        /// The `hint` field.
        hint: String,
    },
    /// A local file could not be read or written.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// mDNS browsing failed.
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    /// Nothing usable was found.
    #[error("{0}")]
    NotFound(String),
    /// The server's certificate is not the pinned one.
    #[error("refusing {url}: {mismatch}")]
    Pin {
        /// URL.
        url: String,
        /// The fingerprints.
        mismatch: PinMismatch,
    },
    /// An https URL without a pinned fingerprint.
    #[error("{url} is HTTPS and no certificate fingerprint is pinned for it: pass the appliance's fingerprint (--fingerprint; its operator sees it in GET /v1/system or the agent's start-up line), pair with it, or accept what it presents once with --trust-first-use")]
    Unpinned {
        /// URL.
        url: String,
    },
    /// The client's pin store cannot be read or written.
    #[error("the pin store {0} cannot be used: {1}")]
    Pins(PathBuf, String),
}

/// The connector's refusal of an https URL without a pin (mapped to
/// [`ClientError::Unpinned`]).
#[derive(Debug, thiserror::Error)]
#[error("no certificate fingerprint is pinned for this https URL")]
struct NoPin;

/// A TLS layer for ureq's connector chain that pins the server certificate
/// ([`PinVerifier`]); plain `http://` connections pass through untouched. It records the
/// fingerprint of the certificate each handshake presented (a resumed one: the certificate
/// of the session it resumes, checked when that session was made).
#[derive(Debug)]
struct PinnedTls {
    config: Option<Arc<rustls::ClientConfig>>,
    seen: Arc<Mutex<Seen>>,
}

/// What the last TLS handshake of a [`Client`] showed.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// The fingerprint of the certificate presented (also when refused).
    fingerprint: Option<String>,
    /// The handshake resumed an earlier session.
    resumed: bool,
}

/// How many TLS sessions each pinned configuration keeps for resumption (one per appliance
/// and connection in flight is plenty).
pub const RESUMPTION_SESSIONS: usize = 64;

/// The process's TLS client configurations, one per set of pinned fingerprints: every
/// [`Client`] pinned to the same set shares one, and with it the TLS sessions its handshakes
/// left, so a fresh connection to an appliance this process has talked to resumes (no
/// certificate exchange, signature or verification: measured in `bench agent`).
fn shared_configs() -> &'static Mutex<HashMap<Vec<String>, Arc<rustls::ClientConfig>>> {
    static CONFIGS: OnceLock<Mutex<HashMap<Vec<String>, Arc<rustls::ClientConfig>>>> =
        OnceLock::new();
    CONFIGS.get_or_init(Mutex::default)
}

/// The client configuration for `pin`: shared per set of fingerprints (see
/// [`shared_configs`]); a trust-on-first-use one is never shared, so a session it made is
/// never resumed by a client that pins.
fn client_config(pin: &Pin) -> Arc<rustls::ClientConfig> {
    let make = |pin: Pin| {
        let v = Arc::new(PinVerifier::new(pin));
        let mut cfg = v.client_config();
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(RESUMPTION_SESSIONS);
        Arc::new(cfg)
    };
    match pin {
        Pin::FirstUse => make(Pin::FirstUse),
        Pin::Fingerprints(f) => {
            let mut key = f.clone();
            key.sort();
            key.dedup();
            let mut m = shared_configs().lock().unwrap_or_else(|e| e.into_inner());
            m.entry(key.clone())
                .or_insert_with(|| make(Pin::Fingerprints(key)))
                .clone()
        }
    }
}

/// Forgets every TLS session this process keeps for resumption: the next connection to each
/// appliance makes a full handshake (its certificate checked against the pins again). For
/// measuring that cost, and after the pins change.
pub fn forget_tls_sessions() {
    shared_configs()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// A TLS connection over ureq's transport.
struct TlsTransport {
    buffers: ureq::unversioned::transport::LazyBuffers,
    stream: rustls::StreamOwned<
        rustls::ClientConnection,
        ureq::unversioned::transport::TransportAdapter,
    >,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport").finish_non_exhaustive()
    }
}

impl ureq::unversioned::transport::Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn ureq::unversioned::transport::Buffers {
        &mut self.buffers
    }

    fn transmit_output(
        &mut self,
        amount: usize,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<(), ureq::Error> {
        use std::io::Write;
        use ureq::unversioned::transport::Buffers;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(
        &mut self,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<bool, ureq::Error> {
        use std::io::Read;
        use ureq::unversioned::transport::Buffers;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let n = self.stream.read(input)?;
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

impl<In: ureq::unversioned::transport::Transport> ureq::unversioned::transport::Connector<In>
    for PinnedTls
{
    type Out = ureq::unversioned::transport::Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ureq::unversioned::transport::ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        use ureq::unversioned::transport::{Either, LazyBuffers, TransportAdapter};
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let Some(config) = &self.config else {
            return Err(ureq::Error::Io(std::io::Error::other(NoPin)));
        };
        let host = details
            .uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| ureq::Error::BadUri(format!("'{host}' is not a host name")))?;
        let mut conn = rustls::ClientConnection::new(config.clone(), name)
            .map_err(|e| ureq::Error::Io(std::io::Error::other(e)))?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        if let Err(e) = conn.complete_io(&mut sock) {
            // A pin mismatch comes out as itself, so the caller can say which is which.
            if let Some(m) = find_mismatch(&e) {
                *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen {
                    fingerprint: Some(m.got.clone()),
                    resumed: false,
                };
                return Err(ureq::Error::Io(std::io::Error::other(m.clone())));
            }
            return Err(e.into());
        }
        let presented = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| crate::tls::fingerprint(c));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Seen {
            fingerprint: presented,
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        };
        let stream = rustls::StreamOwned { conn, sock };
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(TlsTransport { buffers, stream })))
    }
}

/// A ureq agent for `timeout`, with TLS pinned by `pin` (None: https refused); `seen`
/// receives what each handshake showed.
fn make_agent(timeout: Duration, pin: Option<&Pin>, seen: Arc<Mutex<Seen>>) -> ureq::Agent {
    use ureq::unversioned::transport::{Connector, TcpConnector};
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(Duration::from_secs(5).min(timeout)))
        .build();
    let tls = PinnedTls {
        config: pin.map(client_config),
        seen,
    };
    let connector = ().chain(TcpConnector::default()).chain(tls);
    ureq::Agent::with_parts(
        config,
        connector,
        ureq::unversioned::resolver::DefaultResolver::default(),
    )
}

/// A client of one agent's API.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    timeout: Duration,
    pin: Option<Pin>,
    seen: Arc<Mutex<Seen>>,
}

/// A reader that reports its progress (bytes read so far, total).
struct Progress<'a, R> {
    inner: R,
    sent: u64,
    total: u64,
    report: &'a mut dyn FnMut(u64, u64),
}

impl<R: std::io::Read> std::io::Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        (self.report)(self.sent, self.total);
        Ok(n)
    }
}

/// A raw response: status and body text.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl RawResponse {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Client {
    /// A client of the agent at `base` ("http://127.0.0.1:9999"), with an optional token.
    /// No certificate is pinned: `https://` bases are refused until [`Client::with_pin`].
    pub fn new(base: &str, token: Option<&str>) -> Client {
        let timeout = Duration::from_secs(60);
        let seen = Arc::new(Mutex::new(Seen::default()));
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            agent: make_agent(timeout, None, seen.clone()),
            timeout,
            pin: None,
            seen,
        }
    }

    /// A client of the agent at `base` whose certificate must have `fingerprint` (see
    /// [`crate::tls::fingerprint`]).
    pub fn pinned(base: &str, token: Option<&str>, fingerprint: &str) -> Client {
        Client::new(base, token).with_pin(Pin::Fingerprints(vec![fingerprint.to_string()]))
    }

    /// The same client accepting, on `https://`, the certificates `pin` allows. Clients
    /// pinned to the same fingerprints share TLS sessions (a fresh connection resumes one).
    pub fn with_pin(mut self, pin: Pin) -> Client {
        self.seen = Arc::new(Mutex::new(Seen::default()));
        self.agent = make_agent(self.timeout, Some(&pin), self.seen.clone());
        self.pin = Some(pin);
        self
    }

    /// The fingerprint of the certificate the server presented last (https only), also when
    /// it was refused.
    pub fn seen_fingerprint(&self) -> Option<String> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fingerprint
            .clone()
    }

    /// Whether the last TLS handshake resumed a session (https only).
    pub fn resumed(&self) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).resumed
    }

    /// The same client with `timeout` for a whole request (60 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self.agent = make_agent(timeout, self.pin.as_ref(), self.seen.clone());
        self
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn http_err(&self, url: &str, e: ureq::Error) -> ClientError {
        if let ureq::Error::Io(io) = &e {
            if let Some(m) = find_mismatch(io) {
                return ClientError::Pin {
                    url: url.into(),
                    mismatch: m.clone(),
                };
            }
            if io.get_ref().is_some_and(|i| i.is::<NoPin>()) {
                return ClientError::Unpinned { url: url.into() };
            }
        }
        ClientError::Http {
            url: url.into(),
            source: Box::new(e),
        }
    }

    /// Any request; `body` is sent as JSON when given. Errors only for transport failures.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        auth: bool,
    ) -> Result<RawResponse, ClientError> {
        let url = self.url(path);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if auth {
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        if body.is_some() {
            req = req.header("Content-Type", "application/json");
        }
        let req = req
            .body(body.map(<[u8]>::to_vec).unwrap_or_default())
            .map_err(|e| ClientError::NotFound(format!("bad request {method} {url}: {e}")))?;
        let mut resp = self.agent.run(req).map_err(|e| self.http_err(&url, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.http_err(&url, e))?;
        Ok(RawResponse { status, body })
    }

    /// A phone's claim of its credential (`POST /v1/pairing/claim?code=CODE`, no bearer
    /// token: the claim code authenticates it): the Hello frame out, the answer's status and
    /// frame (a Welcome or a Refusal, `format::pairing`) back. Over HTTPS the client is
    /// pinned to the fingerprint of the QR code.
    pub fn pairing_claim(&self, code: &str, hello: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
        let url = self.url(&format!("{}?code={code}", crate::pairing::CLAIM_PATH));
        let req = ureq::http::Request::builder()
            .method("POST")
            .uri(&url)
            .header("Content-Type", crate::pairing::api::FRAME_TYPE)
            .body(hello.to_vec())
            .map_err(|e| ClientError::NotFound(format!("bad request POST {url}: {e}")))?;
        let mut resp = self.agent.run(req).map_err(|e| self.http_err(&url, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_vec()
            .map_err(|e| self.http_err(&url, e))?;
        Ok((status, body))
    }

    fn check<T: DeserializeOwned>(&self, path: &str, r: RawResponse) -> Result<T, ClientError> {
        if !(200..300).contains(&r.status) {
            let v = r.json();
            return Err(ClientError::Api {
                url: self.url(path),
                status: r.status,
                error: v["error"].as_str().unwrap_or(&r.body).to_string(),
                hint: v["hint"].as_str().unwrap_or("").to_string(),
            });
        }
        serde_json::from_str(&r.body).map_err(|e| ClientError::Api {
            url: self.url(path),
            status: r.status,
            error: format!("unexpected answer: {e}"),
            hint: String::new(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.raw("GET", path, None, true)?;
        self.check(path, r)
    }

    fn send<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialisable body"));
        let r = self.raw(method, path, bytes.as_deref(), true)?;
        self.check(path, r)
    }

    /// `GET /v1/system`.
    pub fn system(&self) -> Result<SystemInfo, ClientError> {
        self.get("/v1/system")
    }

    /// `GET /v1/services`.
    pub fn services(&self) -> Result<Vec<ServiceView>, ClientError> {
        self.get("/v1/services")
    }

    /// `GET /v1/instances`.
    pub fn instances(&self) -> Result<Vec<InstanceView>, ClientError> {
        self.get("/v1/instances")
    }

    /// `GET /v1/instances/{id}`.
    pub fn instance(&self, id: &str) -> Result<InstanceView, ClientError> {
        self.get(&format!("/v1/instances/{id}"))
    }

    /// `POST /v1/instances`: synthesises an instance and returns it once it answers.
    pub fn start(&self, service: &str) -> Result<InstanceView, ClientError> {
        self.send(
            "POST",
            "/v1/instances",
            Some(&serde_json::json!({ "service": service })),
        )
    }

    /// `POST /v1/instances/{id}/handoff`: hands the instance off to the agent at `to` and
    /// returns it once moved (state `moved`, `moved_to` set). Takes as long as the handoff:
    /// use [`Client::with_timeout`] for slow links.
    pub fn handoff(
        &self,
        id: &str,
        to: &str,
        downtime_ms: Option<u32>,
    ) -> Result<InstanceView, ClientError> {
        self.send(
            "POST",
            &format!("/v1/instances/{id}/handoff"),
            Some(&HandoffRequest {
                to: to.into(),
                downtime_ms,
            }),
        )
    }

    /// `POST /v1/handoff/incoming` (agent to agent, with the peer secret as the token).
    pub fn handoff_incoming(&self, req: &IncomingRequest) -> Result<Receiving, ClientError> {
        self.send("POST", "/v1/handoff/incoming", Some(req))
    }

    /// `GET /v1/handoff/incoming/{id}` (agent to agent, with the peer secret): an instance
    /// this appliance handed to the one asked, as it runs there.
    pub fn received_instance(&self, id: &str) -> Result<InstanceView, ClientError> {
        self.get(&format!("/v1/handoff/incoming/{id}"))
    }

    /// Where instance `id` runs now: follows `moved_to` from agent to agent (at most
    /// [`MAX_HOPS`]) and returns a client of the agent that runs it (with this client's
    /// token) and its view there.
    pub fn resolve(&self, id: &str) -> Result<(Client, InstanceView), ClientError> {
        let mut c = self.clone();
        let mut id = id.to_string();
        for _ in 0..=MAX_HOPS {
            let v = c.instance(&id)?;
            match (&v.state, &v.moved_to) {
                (State::Moved, Some(m)) => {
                    c.base = m.agent.trim_end_matches('/').to_string();
                    id = m.instance.clone();
                }
                _ => return Ok((c, v)),
            }
        }
        Err(ClientError::NotFound(format!(
            "instance {id} moved more than {MAX_HOPS} times in a row"
        )))
    }

    /// `GET /v1/devices` (operator): the paired devices.
    pub fn devices(&self) -> Result<Vec<crate::devices::DeviceView>, ClientError> {
        self.get("/v1/devices")
    }

    /// `DELETE /v1/devices/{id}` (operator): revokes a device's credential and stops the
    /// instances it runs.
    pub fn revoke_device(&self, id: &str) -> Result<crate::devices::Revoked, ClientError> {
        self.send("DELETE", &format!("/v1/devices/{id}"), None::<&()>)
    }

    /// `POST /v1/instances/{id}/stop`.
    pub fn stop(&self, id: &str) -> Result<InstanceView, ClientError> {
        self.send("POST", &format!("/v1/instances/{id}/stop"), None::<&()>)
    }

    /// `DELETE /v1/instances/{id}`: stops and forgets it.
    pub fn delete(&self, id: &str) -> Result<InstanceView, ClientError> {
        self.send("DELETE", &format!("/v1/instances/{id}"), None::<&()>)
    }

    /// `PUT /v1/services/{name}/overlay`: uploads (streams) an overlay file as the service's
    /// next version.
    pub fn upload_overlay(
        &self,
        name: &str,
        file: &std::path::Path,
    ) -> Result<ServiceView, ClientError> {
        self.upload(
            &format!("/v1/services/{name}/overlay"),
            file,
            &mut |_, _| {},
        )
    }

    /// `PUT path` with the file `file` as the body (streamed), calling `progress(sent,
    /// total)` as it goes; the answer parsed as `T`.
    pub fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        file: &std::path::Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        let f = std::fs::File::open(file)
            .map_err(|e| ClientError::Io(format!("cannot open {}", file.display()), e))?;
        let total = f
            .metadata()
            .map_err(|e| ClientError::Io(format!("cannot inspect {}", file.display()), e))?
            .len();
        let mut reader = Progress {
            inner: f,
            sent: 0,
            total,
            report: progress,
        };
        // A stated length (not chunks): an agent refusing the upload before reading it
        // (401, 413) then answers a client that can read its answer.
        let mut req = self
            .agent
            .put(&url)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", total.to_string());
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req
            .send(ureq::SendBody::from_reader(&mut reader))
            .map_err(|e| self.http_err(&url, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.http_err(&url, e))?;
        self.check(path, RawResponse { status, body })
    }

    /// `GET /v1/instances/{id}/console` + `query`: the text, where the next read starts, and
    /// whether the instance still runs.
    pub fn console(&self, id: &str, query: &str) -> Result<(String, u64, bool), ClientError> {
        let path = format!("/v1/instances/{id}/console{query}");
        let url = self.url(&path);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| self.http_err(&url, e))?;
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let next = header("x-console-offset").and_then(|v| v.parse().ok());
        let live = header("x-console-live").as_deref() == Some("true");
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.http_err(&url, e))?;
        match next {
            Some(n) if status == 200 => Ok((body, n, live)),
            _ => self.check(&path, RawResponse { status, body }),
        }
    }

    /// `DELETE path`, expecting 204.
    pub fn delete_path(&self, path: &str) -> Result<(), ClientError> {
        let r = self.raw("DELETE", path, None, true)?;
        if r.status == 204 {
            return Ok(());
        }
        self.check::<serde_json::Value>(path, r).map(drop)
    }

    /// `GET path`, the answer parsed as `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get(path)
    }

    /// `method path` with the JSON `body`, the answer parsed as `T`.
    pub fn send_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(method, path, Some(body))
    }

    /// `GET /v1/services/{name}/overlay` into `out`; returns the bytes written.
    pub fn download_overlay(&self, name: &str, out: &std::path::Path) -> Result<u64, ClientError> {
        self.download(&format!("/v1/services/{name}/overlay"), out)
            .map(|(n, _, _)| n)
    }

    /// `GET path` (a file) into `out`: the bytes written, their SHA-256 (hex) and the
    /// `X-Content-Sha256` the appliance announced.
    pub fn download(
        &self,
        path: &str,
        out: &std::path::Path,
    ) -> Result<(u64, String, Option<String>), ClientError> {
        use sha2::Digest;
        let url = self.url(path);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.http_err(&url, e))?;
        if resp.status().as_u16() != 200 {
            let status = resp.status().as_u16();
            let body = resp.into_body().read_to_string().unwrap_or_default();
            return self.check(path, RawResponse { status, body });
        }
        let announced = resp
            .headers()
            .get("x-content-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut f = std::fs::File::create(out)
            .map_err(|e| ClientError::Io(format!("cannot create {}", out.display()), e))?;
        let mut r = resp.into_body().into_reader();
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            let k = std::io::Read::read(&mut r, &mut buf)
                .map_err(|e| ClientError::Io(format!("cannot download {url}"), e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            std::io::Write::write_all(&mut f, &buf[..k])
                .map_err(|e| ClientError::Io(format!("cannot write {}", out.display()), e))?;
            n += k as u64;
        }
        Ok((n, crate::store::hex(&h.finalize()), announced))
    }

    /// Round trip of `GET /v1/system`, ms (best of `tries`).
    pub fn rtt_ms(&self, tries: usize) -> Result<f64, ClientError> {
        let mut best = f64::INFINITY;
        for _ in 0..tries.max(1) {
            let t0 = Instant::now();
            let r = self.raw("GET", "/v1/system", None, false)?;
            if r.status != 200 {
                return self.check("/v1/system", r);
            }
            best = best.min(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    }
}

/// A connection to an instance's service that follows the instance when it is handed off.
pub struct Session {
    api: Client,
    id: String,
    endpoint: String,
    conn: Option<GuestConn>,
    timeout: Duration,
    /// How long a request keeps trying to reach the instance after a break.
    pub patience: Duration,
    /// Reconnections so far (each after a break).
    pub reconnects: u32,
}

impl Session {
    /// A session with instance `id` of the agent `api` (resolved at once).
    pub fn open(api: &Client, id: &str, timeout: Duration) -> Result<Session, ClientError> {
        let (api, v) = api.resolve(id)?;
        Ok(Session {
            api,
            id: v.id,
            endpoint: v.endpoint,
            conn: None,
            timeout,
            patience: Duration::from_secs(30),
            reconnects: 0,
        })
    }

    /// The endpoint in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The agent that runs the instance, as last resolved.
    pub fn agent(&self) -> &str {
        self.api.base()
    }

    /// The instance's id on that agent.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends `request` and returns the reply; on a broken or refused connection re-resolves
    /// the instance (following a move), reconnects and sends again, for up to `patience`.
    pub fn request(&mut self, request: &str) -> Result<String, ClientError> {
        let deadline = Instant::now() + self.patience;
        loop {
            let tried = match self.conn.as_mut() {
                Some(c) => c.request(request),
                None => {
                    GuestConn::connect(self.endpoint.as_str(), self.timeout).and_then(|mut c| {
                        let r = c.request(request);
                        self.conn = Some(c);
                        r
                    })
                }
            };
            match tried {
                Ok(r) => return Ok(r),
                Err(e) => {
                    self.conn = None;
                    if Instant::now() >= deadline {
                        return Err(ClientError::NotFound(format!(
                            "instance {} at {} did not answer within {:?}: {}",
                            self.id,
                            self.endpoint,
                            self.patience,
                            crate::store::error_chain(&e)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    // Where is it now? (Still here while it is being handed off.)
                    if let Ok((api, v)) = self.api.resolve(&self.id) {
                        if v.endpoint != self.endpoint || api.base() != self.api.base() {
                            tracing::info!(from = %self.endpoint, to = %v.endpoint, agent = api.base(), "instance moved; reconnecting");
                        }
                        self.api = api;
                        self.id = v.id;
                        if !v.endpoint.is_empty() {
                            self.endpoint = v.endpoint;
                        }
                    }
                    self.reconnects += 1;
                }
            }
        }
    }
}

/// How long one appliance's probe may take (connection, handshake and the round trips).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The environment variable naming the client's pin store file (see [`PinStore`]).
pub const PINS_ENV: &str = "CLOUDLET_PINS";

/// One appliance the client trusts: its id and certificate fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PinEntry {
    /// The appliance id (TXT `id`, `GET /v1/system` → `id`).
    pub id: String,
    /// SHA-256 of its certificate (TXT `fp`, `GET /v1/system` → `fingerprint`).
    pub fingerprint: String,
    /// A name for people.
    #[serde(default)]
    pub name: String,
}

/// The appliances this client has paired with (or pinned by hand): a JSON array of
/// [`PinEntry`] in `$CLOUDLET_PINS`, else `$XDG_CONFIG_HOME/cloudlet/pins.json`, else
/// `~/.config/cloudlet/pins.json`. A missing file is an empty store.
#[derive(Clone, Debug)]
pub struct PinStore {
    path: PathBuf,
}

impl PinStore {
    /// The store at `path`.
    pub fn at(path: impl Into<PathBuf>) -> PinStore {
        PinStore { path: path.into() }
    }

    /// The user's store (see the type's doc).
    pub fn user() -> PinStore {
        if let Some(p) = std::env::var_os(PINS_ENV).filter(|p| !p.is_empty()) {
            return PinStore::at(p);
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("."));
        PinStore::at(config.join("cloudlet").join("pins.json"))
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry.
    pub fn entries(&self) -> Result<Vec<PinEntry>, ClientError> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| ClientError::Pins(self.path.clone(), format!("damaged: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ClientError::Pins(self.path.clone(), e.to_string())),
        }
    }

    /// The fingerprint pinned for appliance `id`.
    pub fn get(&self, id: &str) -> Option<String> {
        self.entries()
            .ok()?
            .into_iter()
            .find(|p| p.id == id)
            .map(|p| p.fingerprint)
    }

    /// Pins `fingerprint` for appliance `id` (replacing what was pinned for it).
    pub fn add(&self, id: &str, fingerprint: &str, name: &str) -> Result<PinEntry, ClientError> {
        let fingerprint = crate::tls::parse_fingerprint(fingerprint)
            .map_err(|e| ClientError::Pins(self.path.clone(), e.to_string()))?;
        if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ClientError::Pins(
                self.path.clone(),
                format!("'{id}' is not an appliance id (1-64 characters, no spaces)"),
            ));
        }
        let mut v = self.entries()?;
        v.retain(|p| p.id != id);
        let e = PinEntry {
            id: id.into(),
            fingerprint,
            name: name.into(),
        };
        v.push(e.clone());
        self.save(&v)?;
        Ok(e)
    }

    /// Removes the pins of appliance `what` (an id) or of certificate `what` (a
    /// fingerprint, in any usual spelling); returns those removed.
    pub fn remove(&self, what: &str) -> Result<Vec<PinEntry>, ClientError> {
        let fp = crate::tls::parse_fingerprint(what).ok();
        let (gone, kept): (Vec<PinEntry>, Vec<PinEntry>) = self
            .entries()?
            .into_iter()
            .partition(|p| p.id == what || Some(&p.fingerprint) == fp.as_ref());
        if !gone.is_empty() {
            self.save(&kept)?;
        }
        Ok(gone)
    }

    /// Writes `v` whole (a temporary file, then a rename).
    fn save(&self, v: &[PinEntry]) -> Result<(), ClientError> {
        let io = |e: std::io::Error| ClientError::Pins(self.path.clone(), e.to_string());
        if let Some(d) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let json = serde_json::to_string_pretty(v).expect("pins serialise") + "\n";
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &self.path))
            .map_err(io)
    }
}

/// How far a discovered appliance is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// It answered over HTTPS with the certificate pinned for its id.
    Pinned,
    /// Plain HTTP on a loopback address (an agent on this machine).
    Local,
    /// Anything else: no pin for it, a certificate other than the pinned one, plain HTTP on
    /// the network, or no answer.
    Unverified,
}

/// A discovered appliance with its measured round trip and score.
#[derive(Clone, Debug, Serialize)]
pub struct Ranked {
    /// What mDNS said.
    pub appliance: Appliance,
    /// Its API URL.
    pub url: String,
    /// Best round trip to its API, ms (None: unreachable).
    pub rtt_ms: Option<f64>,
    /// Higher is better; unreachable appliances score 0.
    pub score: f64,
    /// Whether it proved to be a paired appliance.
    pub trust: Trust,
    /// The fingerprint of the certificate it presented (https only).
    pub fingerprint: Option<String>,
    /// Why the probe failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Ranked {
    /// A client of this appliance's API, pinned to the certificate it presented when that
    /// is the pinned one.
    pub fn client(&self, token: Option<&str>) -> Client {
        let c = Client::new(&self.url, token);
        match (&self.fingerprint, self.trust) {
            (Some(fp), Trust::Pinned) => c.with_pin(Pin::Fingerprints(vec![fp.clone()])),
            _ => c,
        }
    }
}

/// The score of an appliance: free cores (reserved cores − load, at least 0.1) × free memory
/// for service VMs (GiB, at least 1/16) × the fraction of VM slots free, divided by
/// (1 + RTT / 5 ms), so a nearby idle cloudlet wins over a far one and a full one scores 0.
pub fn score(a: &Appliance, rtt_ms: f64) -> f64 {
    let cores = a.txt_num("cores").unwrap_or(1.0);
    let load = a.txt_num("load").unwrap_or(0.0);
    let free_cores = (cores - load).max(0.1);
    let mem = (a.txt_num("memfree").unwrap_or(0.0) / 1024.0).max(1.0 / 16.0);
    let slots = a
        .txt
        .get("vms")
        .and_then(|v| v.split_once('/'))
        .and_then(|(n, m)| Some((n.parse::<f64>().ok()?, m.parse::<f64>().ok()?)))
        .map(|(n, m)| if m > 0.0 { ((m - n) / m).max(0.0) } else { 0.0 })
        .unwrap_or(1.0);
    free_cores * mem * slots / (1.0 + rtt_ms / 5.0)
}

/// Probes one appliance: up to 3 round trips of `GET /v1/system` within `timeout`, over
/// https pinned to what `pins` holds for its id (any certificate when nothing is pinned
/// for it, which leaves it unverified).
fn probe(a: Appliance, url: String, pins: &[PinEntry], timeout: Duration) -> Ranked {
    let id = a.txt.get("id").cloned().unwrap_or_default();
    let pinned = pins
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.fingerprint.clone());
    let https = url.starts_with("https://");
    let pin = match &pinned {
        Some(fp) => Pin::Fingerprints(vec![fp.clone()]),
        None => Pin::FirstUse,
    };
    let c = Client::new(&url, None).with_timeout(timeout).with_pin(pin);
    let t0 = Instant::now();
    let mut best: Option<f64> = None;
    let mut error = None;
    let mut answered_id = None;
    for _ in 0..3 {
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        let t = Instant::now();
        match c.raw("GET", "/v1/system", None, false) {
            Ok(r) if r.status == 200 => {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                best = Some(best.map_or(ms, |b: f64| b.min(ms)));
                answered_id = r.json()["id"].as_str().map(str::to_string);
            }
            Ok(r) => {
                error = Some(format!("GET /v1/system answered {}", r.status));
                break;
            }
            Err(e) => {
                error = Some(crate::store::error_chain(&e));
                break;
            }
        }
    }
    if best.is_some() {
        error = None;
    }
    let ip_loopback = url
        .trim_start_matches("http://")
        .rsplit_once(':')
        .and_then(|(h, _)| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    let seen = c.seen_fingerprint();
    let trust = if best.is_none() {
        Trust::Unverified
    } else if https {
        // The handshake passed the pin, and the appliance says it is the one pinned.
        if pinned.is_some() && seen == pinned && answered_id.as_deref() == Some(id.as_str()) {
            Trust::Pinned
        } else {
            Trust::Unverified
        }
    } else if ip_loopback {
        Trust::Local
    } else {
        Trust::Unverified
    };
    let s = best.map(|r| score(&a, r)).unwrap_or(0.0);
    Ranked {
        appliance: a,
        url,
        rtt_ms: best,
        score: s,
        trust,
        fingerprint: seen,
        error,
    }
}

/// Probes each appliance in parallel (each within [`PROBE_TIMEOUT`]), checks it against
/// `pins` and sorts them best first.
pub fn rank(found: Vec<Appliance>, pins: &[PinEntry]) -> Vec<Ranked> {
    rank_within(found, pins, PROBE_TIMEOUT)
}

/// Most appliances probed at once; beyond them (a flood of advertisements) the rest are
/// listed unprobed and unverified, so the whole stays within one probe deadline.
pub const MAX_PROBES: usize = 64;

/// As [`rank`], each probe within `timeout`.
pub fn rank_within(mut found: Vec<Appliance>, pins: &[PinEntry], timeout: Duration) -> Vec<Ranked> {
    // Paired appliances are probed first, whatever else announces itself.
    found.sort_by_key(|a| !pins.iter().any(|p| a.txt.get("id") == Some(&p.id)));
    let mut v: Vec<Ranked> = std::thread::scope(|s| {
        let mut probes = Vec::new();
        let mut rest = Vec::new();
        for a in found {
            let Some(url) = a.url() else { continue };
            if probes.len() < MAX_PROBES {
                probes.push(s.spawn(move || probe(a, url, pins, timeout)));
            } else {
                rest.push(Ranked {
                    appliance: a,
                    url,
                    rtt_ms: None,
                    score: 0.0,
                    trust: Trust::Unverified,
                    fingerprint: None,
                    error: Some(format!(
                        "not probed: more than {MAX_PROBES} appliances announced"
                    )),
                });
            }
        }
        let mut v: Vec<Ranked> = probes.into_iter().filter_map(|p| p.join().ok()).collect();
        v.extend(rest);
        v
    });
    v.sort_by(|a, b| b.score.total_cmp(&a.score));
    v
}

/// Browses for `window` and returns the ranked appliances.
pub fn discover_ranked(window: Duration, pins: &[PinEntry]) -> Result<Vec<Ranked>, ClientError> {
    Ok(rank(browse(window)?, pins))
}

/// Browses until an appliance whose id (TXT `id`) or instance name is `who` has been
/// resolved (or `window` passes), and returns the ranked appliances.
pub fn discover_ranked_until(
    window: Duration,
    who: &str,
    pins: &[PinEntry],
) -> Result<Vec<Ranked>, ClientError> {
    let found = browse_until(window, |f| {
        f.iter()
            .any(|a| a.instance == who || a.txt.get("id").is_some_and(|i| i == who))
    })?;
    Ok(rank(found, pins))
}

/// The best of `ranked` to use without asking: reachable, with room, and, once `pins` holds
/// any appliance, pinned (or local) only.
pub fn choose(ranked: Vec<Ranked>, pins: &[PinEntry]) -> Option<Ranked> {
    ranked
        .into_iter()
        .filter(|r| pins.is_empty() || r.trust != Trust::Unverified)
        .find(|r| r.score > 0.0)
}

/// The best appliance found within `window` (see [`choose`]).
pub fn best(window: Duration, pins: &[PinEntry]) -> Result<Ranked, ClientError> {
    let ranked = discover_ranked(window, pins)?;
    let n = ranked.len();
    let unverified = ranked
        .iter()
        .filter(|r| r.trust == Trust::Unverified && r.score > 0.0)
        .count();
    choose(ranked, pins).ok_or_else(|| {
        if !pins.is_empty() && unverified > 0 {
            ClientError::NotFound(format!(
                "{unverified} of {n} appliance(s) found answered, but none proved to be a paired one (its certificate pinned): not choosing an unverified one (pass --agent URL with --fingerprint to use one anyway)"
            ))
        } else {
            ClientError::NotFound(format!(
                "no reachable cloudlet with free capacity answered mDNS within {window:?} (is an agent running with discovery on? pass --agent URL to skip discovery)"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn app(cores: &str, load: &str, mem: &str, vms: &str) -> Appliance {
        let mut txt = BTreeMap::new();
        txt.insert("cores".into(), cores.into());
        txt.insert("load".into(), load.into());
        txt.insert("memfree".into(), mem.into());
        txt.insert("vms".into(), vms.into());
        Appliance {
            instance: "x".into(),
            host: "x.local.".into(),
            addrs: vec!["127.0.0.1".parse().unwrap()],
            port: 1,
            txt,
            resolved_ms: 0.0,
        }
    }

    #[test]
    fn ranking_prefers_idle_near_and_free() {
        let idle = app("4", "0.0", "8192", "0/8");
        let busy = app("4", "3.9", "8192", "0/8");
        let full = app("4", "0.0", "8192", "8/8");
        let small = app("4", "0.0", "512", "0/8");
        assert!(score(&idle, 1.0) > score(&busy, 1.0));
        assert!(score(&idle, 1.0) > score(&idle, 50.0));
        assert_eq!(score(&full, 1.0), 0.0);
        assert!(score(&idle, 1.0) > score(&small, 1.0));
        // A far idle one still beats a near overloaded one by less than a near idle one.
        assert!(score(&idle, 20.0) > score(&busy, 1.0));
        assert_eq!(idle.url().unwrap(), "http://127.0.0.1:1");
        // With a certificate announced: HTTPS off loopback, and on it for a wildcard listen.
        let mut tls = idle.clone();
        tls.txt.insert("fp".into(), "ab".repeat(32));
        tls.txt.insert("tls".into(), "lan".into());
        assert_eq!(tls.url().unwrap(), "http://127.0.0.1:1");
        tls.addrs.push("10.0.0.2".parse().unwrap());
        assert_eq!(tls.url().unwrap(), "https://10.0.0.2:1");
        tls.addrs.remove(1);
        tls.txt.insert("tls".into(), "all".into());
        assert_eq!(tls.url().unwrap(), "https://127.0.0.1:1");
    }

    /// An HTTPS server in this process (on 127.0.0.1, TLS forced as on a LAN address) with
    /// a fresh certificate; returns its URL and fingerprint.
    fn tls_server(rt: &tokio::runtime::Runtime, name: &str) -> (String, String) {
        let d = std::env::temp_dir().join(format!("agent-client-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let cert = crate::tls::ApplianceCert::load_or_create(&d, "0123456789ab").unwrap();
        let fp = cert.fingerprint().to_string();
        let config = cert.server_config().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        let url = rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("https://{}", l.local_addr().unwrap());
            let l = crate::daemon::TlsListener::new(l, config);
            let app = axum::Router::new().route(
                "/v1/system",
                axum::routing::get(|| async {
                    axum::Json(serde_json::json!({"id": "0123456789ab"}))
                }),
            );
            tokio::spawn(async move { axum::serve(l, app).await });
            url
        });
        (url, fp)
    }

    #[test]
    fn https_is_pinned_and_a_stalled_handshake_stalls_nobody() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, fp) = tls_server(&rt, "pin");
        // A client that connects and never says anything does not hold up the others.
        let addr = url.trim_start_matches("https://").to_string();
        let _silent: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        let ok = Client::pinned(&url, None, &fp)
            .with_timeout(Duration::from_secs(5))
            .raw("GET", "/v1/system", None, false)
            .unwrap();
        assert_eq!(
            (ok.status, ok.json()["id"].as_str()),
            (200, Some("0123456789ab"))
        );

        // Another certificate: refused, naming both fingerprints.
        let wrong = "cd".repeat(32);
        let e = Client::pinned(&url, None, &wrong)
            .raw("GET", "/v1/system", None, false)
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ClientError::Pin { .. }), "{e:?}");
        assert!(msg.contains(&fp) && msg.contains(&wrong), "{msg}");

        // No pin: refused before anything is sent; trust on first use shows what it saw.
        let e = Client::new(&url, None)
            .raw("GET", "/v1/system", None, false)
            .unwrap_err();
        assert!(matches!(e, ClientError::Unpinned { .. }), "{e:?}");
        assert!(e.to_string().contains("--trust-first-use"), "{e}");
        let c = Client::new(&url, None).with_pin(Pin::FirstUse);
        assert_eq!(c.raw("GET", "/v1/system", None, false).unwrap().status, 200);
        assert_eq!(c.seen_fingerprint(), Some(fp.clone()));
    }

    #[test]
    fn fresh_clients_pinned_alike_resume_the_tls_session() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (url, fp) = tls_server(&rt, "resume");
        let get = |c: &Client| {
            let r = c.raw("GET", "/v1/system", None, false).unwrap();
            assert_eq!(r.status, 200);
            (c.resumed(), c.seen_fingerprint())
        };
        // The first connection makes a full handshake; every later client pinned to the
        // same certificate resumes, and still knows which certificate it is talking to.
        let (resumed, seen) = get(&Client::pinned(&url, None, &fp));
        assert!(!resumed);
        assert_eq!(seen.as_deref(), Some(fp.as_str()));
        for _ in 0..3 {
            let (resumed, seen) = get(&Client::pinned(&url, None, &fp));
            assert!(resumed, "a fresh client resumes");
            assert_eq!(seen.as_deref(), Some(fp.as_str()));
        }
        // A client pinned to another certificate shares nothing: full handshake, refused.
        let wrong = "ef".repeat(32);
        let e = Client::pinned(&url, None, &wrong)
            .raw("GET", "/v1/system", None, false)
            .unwrap_err();
        assert!(matches!(e, ClientError::Pin { .. }), "{e:?}");
        // Trust on first use never resumes a pinned client's session.
        let c = Client::new(&url, None).with_pin(Pin::FirstUse);
        assert!(!get(&c).0);
        // Forgotten sessions: a full handshake again.
        forget_tls_sessions();
        assert!(!get(&Client::pinned(&url, None, &fp)).0);
        assert!(get(&Client::pinned(&url, None, &fp)).0);
    }

    #[test]
    fn a_flood_of_silent_appliances_costs_one_probe_deadline() {
        // A listener that accepts and never answers, announced 70 times.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let held: Vec<_> = l.incoming().flatten().collect();
            drop(held);
        });
        let found: Vec<Appliance> = (0..70)
            .map(|i| {
                let mut a = app("4", "0.0", "8192", "0/8");
                a.instance = format!("silent-{i}");
                a.port = port;
                a.txt.insert("id".into(), format!("{i:012x}"));
                a
            })
            .collect();
        let pins = vec![PinEntry {
            id: format!("{:012x}", 69),
            fingerprint: "ab".repeat(32),
            name: String::new(),
        }];
        let t0 = Instant::now();
        let r = rank_within(found, &pins, Duration::from_millis(300));
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(r.len(), 70);
        assert!(r
            .iter()
            .all(|r| r.rtt_ms.is_none() && r.trust == Trust::Unverified));
        let unprobed: Vec<_> = r
            .iter()
            .filter(|r| r.error.as_deref().is_some_and(|e| e.contains("not probed")))
            .collect();
        assert_eq!(unprobed.len(), 70 - MAX_PROBES);
        // The paired one (last announced) was probed all the same.
        let paired = r
            .iter()
            .find(|r| r.appliance.instance == "silent-69")
            .unwrap();
        assert!(
            !paired.error.as_deref().unwrap_or("").contains("not probed"),
            "{paired:?}"
        );
        assert!(choose(r, &pins).is_none());
    }

    #[test]
    fn pins_are_kept_per_appliance() {
        let d = std::env::temp_dir().join(format!("agent-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = PinStore::at(d.join("sub/pins.json"));
        assert!(s.entries().unwrap().is_empty());
        s.add("0123456789ab", &"AB".repeat(32), "hall").unwrap();
        s.add("ba9876543210", &"cd".repeat(32), "").unwrap();
        s.add("0123456789ab", &"ef".repeat(32), "hall").unwrap();
        assert_eq!(s.get("0123456789ab"), Some("ef".repeat(32)));
        assert_eq!(s.entries().unwrap().len(), 2);
        let e = s.add("x", "not-hex", "").unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(s.add("", &"ab".repeat(32), "").is_err());
        // Unpinned by id or by fingerprint (any spelling); nothing matching: nothing removed.
        let colons: Vec<String> = (0..32).map(|_| "CD".to_string()).collect();
        let gone = s.remove(&colons.join(":")).unwrap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, "ba9876543210");
        assert!(s.remove("nobody").unwrap().is_empty());
        assert_eq!(s.remove("0123456789ab").unwrap().len(), 1);
        assert!(s.entries().unwrap().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
