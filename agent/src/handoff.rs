//! VM handoff between appliances, the agents' part (the vmms stream the VM itself, see
//! `format::handoff`).
//!
//! ```text
//!  client ── POST /v1/instances/ID/handoff {"to": URL} ──▶ source agent
//!     source: ID running → handing_off
//!     source ── GET URL/v1/system ──▶ target: its appliance id → the peer secret for it
//!     source ── POST URL/v1/handoff/incoming (Bearer: peer secret)
//!               {from, instance, service, base_id, mem_mib} ──▶ target agent
//!         target: base held (by content id)? 422 · room (max_vms, memory)? 503
//!                 new instance `receiving`; `vmm receive --listen IP:0`, env VMM_HANDOFF_TOKEN
//!                 ◀── Listening{addr} ── answers 201 {instance_id, listen, token}
//!     source ── ApiRequest::Handoff{to: listen, token, downtime_ms} ──▶ its vmm (blocking)
//!         its vmm ── the VM ──▶ target vmm; progress on the report channel → `handoff`
//!     HandedOff(stats): source ID → moved (moved_to: target URL, instance, endpoint)
//!                       target instance → running on the vmm's Ready + a verified `health`
//!     source ── GET URL/v1/handoff/incoming/TID (Bearer: peer secret) ──▶ its endpoint
//!     Error / failure:  source ID → running again (the VM never left), error shown;
//!                       source ── DELETE URL/v1/handoff/incoming/TID ──▶ target: its
//!                       `vmm receive` is killed, the instance and its files removed
//! ```
//!
//! Trust: the target accepts the incoming request only with the secret it shares with the
//! source (`DATA/peers.json`, see [`crate::auth::PeerStore`]); the vmm-to-vmm stream then
//! carries the one-time 32-byte token the target made for this handoff.
//!
//! Over HTTPS (a target on a network address) the source pins the target's certificate: the
//! peer entry holds its fingerprint (`agent add-peer ID --secret S --fingerprint FP`, the
//! fingerprint as the target's `GET /v1/system` or start-up line shows it; it is set by the
//! operator, not learnt from the network). The first `GET /v1/system` accepts only the
//! certificates of trusted peers, and every later call only that peer's. A peer entry without
//! a fingerprint can be reached over plain HTTP only (loopback, for development).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use format::control::{self as wire, ApiRequest, ApiResponse};
use serde::{Deserialize, Serialize};

use crate::auth::PeerStore;
use crate::client::{Client, ClientError};
use crate::store::{error_chain, Store};
use crate::supervisor::{InstanceRecord, MovedTo, Receiving, Supervisor, SupervisorError};

/// The pause the source aims for when the request names none, ms.
pub const DEFAULT_DOWNTIME_MS: u32 = 20;
/// Longest a handoff may take (the vmm's answer is awaited this long).
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the source waits for the target's instance to answer after the handoff.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(25);

/// `POST /v1/instances/{id}/handoff`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandoffRequest {
    /// The target agent's base URL (`http://HOST:PORT`).
    pub to: String,
    /// The pause to aim for, ms (default [`DEFAULT_DOWNTIME_MS`]).
    #[serde(default)]
    pub downtime_ms: Option<u32>,
}

/// `POST /v1/handoff/incoming` (source agent → target agent); answered with
/// [`Receiving`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IncomingRequest {
    /// The source appliance's id.
    pub from: String,
    /// The instance's id on the source.
    pub instance: String,
    /// The service it runs.
    pub service: String,
    /// The content id (64 hex digits) of the base it runs on.
    pub base_id: String,
    /// Its guest RAM, MiB.
    pub mem_mib: u64,
}

/// Why a handoff did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// `to` is not an agent URL.
    #[error("'{0}' is not an agent URL (https://HOST:PORT, or http:// on loopback)")]
    BadTarget(String),
    /// The target's certificate is not pinned for it.
    #[error("appliance {id} at {url} presents certificate {seen}, which DATA/peers.json does not pin for it: add it with `agent add-peer {id} --secret … --fingerprint FP`, FP checked with the target's operator")]
    NotPinned {
        /// The target's id (or "?" when it did not answer).
        id: String,
        /// Its URL.
        url: String,
        /// The fingerprint it presented.
        seen: String,
    },
    /// From the instance table (no such instance, not running …).
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The target agent did not answer.
    #[error("cannot reach the target agent")]
    Unreachable(#[source] ClientError),
    /// The target is this appliance.
    #[error("the target is this appliance ({0})")]
    SelfTarget(String),
    /// No peer secret for the target.
    #[error(
        "appliance {0} at {1} is not a trusted peer of this one (no entry in DATA/peers.json)"
    )]
    NotPeer(String, String),
    /// The target refused the handoff.
    #[error("the target refused the handoff")]
    Refused(#[source] ClientError),
    /// The target's answer is not usable.
    #[error("the target's answer is not usable: {0}")]
    BadAnswer(String),
    /// The vmm's control socket failed.
    #[error("the vmm's control socket failed")]
    Vmm(#[source] wire::ApiError),
    /// The vmm could not hand the VM off (it still runs here).
    #[error("the vmm could not hand the VM off: {0}")]
    VmmRefused(String),
    /// The vmm answered something else.
    #[error("the vmm answered {0:?} to Handoff")]
    Unexpected(Box<ApiResponse>),
    /// The orchestration task died.
    #[error("the handoff task failed: {0}")]
    Task(String),
}

impl HandoffError {
    /// The HTTP status the target answered with, when it refused.
    pub fn target_status(&self) -> Option<u16> {
        match self {
            HandoffError::Refused(ClientError::Api { status, .. }) => Some(*status),
            _ => None,
        }
    }
}

/// `http(s)://HOST:PORT` without a trailing slash, or why not.
fn agent_url(to: &str) -> Result<String, HandoffError> {
    let t = to.trim().trim_end_matches('/');
    let rest = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
        .filter(|r| !r.is_empty() && !r.contains('/') && !r.contains(char::is_whitespace))
        .ok_or_else(|| HandoffError::BadTarget(to.into()))?;
    let _ = rest;
    Ok(t.to_string())
}

/// A client of the target agent `to`: pinned to `fingerprints` over HTTPS.
fn target_client(to: &str, token: Option<&str>, fingerprints: Vec<String>) -> Client {
    let c = Client::new(to, token);
    if to.starts_with("https://") {
        c.with_pin(crate::tls::Pin::Fingerprints(fingerprints))
    } else {
        c
    }
}

/// The host part of an agent URL (`http://10.0.0.2:9999` → `10.0.0.2`, IPv6 in brackets).
fn url_host(url: &str) -> &str {
    let rest = url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    match rest.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => rest,
    }
}

/// Where the source's vmm connects: the target's listening address, with an unspecified
/// IP replaced by the host the target agent was reached at.
pub fn stream_address(listen: std::net::SocketAddr, agent: &str) -> String {
    if listen.ip().is_unspecified() {
        format!("{}:{}", url_host(agent), listen.port())
    } else {
        listen.to_string()
    }
}

/// The 32 bytes of a 64-hex-digit token.
pub fn parse_token(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Sends `Handoff` to the vmm on `sock` and waits (up to [`HANDOFF_TIMEOUT`]) for its
/// answer.
fn vmm_handoff(sock: &Path, req: &ApiRequest) -> Result<ApiResponse, wire::ApiError> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_write_timeout(Some(wire::IO_TIMEOUT))?;
    s.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
    wire::write_frame(&mut s, req)?;
    wire::read_frame(&mut s)?.map_err(wire::ApiError::Version)
}

/// Runs a blocking call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, HandoffError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HandoffError::Task(e.to_string()))
}

/// What the source agent needs to hand its instances off.
#[derive(Clone)]
pub struct Source {
    /// The instances.
    pub sup: Arc<Supervisor>,
    /// The data directory (bases, this appliance's id).
    pub store: Store,
    /// The trusted appliances.
    pub peers: PeerStore,
}

impl Source {
    /// Hands instance `id` off to the agent at `req.to`; returns its record once it has
    /// moved. On any failure the instance runs here as before (see the module doc).
    pub async fn hand_off(
        &self,
        id: &str,
        req: &HandoffRequest,
    ) -> Result<InstanceRecord, HandoffError> {
        let to = agent_url(&req.to)?;
        let rec = self.sup.begin_handoff(id, &to)?;
        let mut receiving = None;
        let r = self.run(&rec, &to, req, &mut receiving).await;
        match r {
            Ok(moved) => Ok(moved),
            Err(e) => {
                if let Some((c, tid)) = receiving {
                    // Best effort: the target also gives up on its own after a timeout.
                    let path = format!("/v1/handoff/incoming/{tid}");
                    let _ = blocking(move || c.raw("DELETE", &path, None, true)).await;
                }
                self.sup.handoff_failed(id, &error_chain(&e));
                Err(e)
            }
        }
    }

    async fn run(
        &self,
        rec: &InstanceRecord,
        to: &str,
        req: &HandoffRequest,
        receiving: &mut Option<(Client, String)>,
    ) -> Result<InstanceRecord, HandoffError> {
        let id = rec.info.id.clone();
        // Over HTTPS, only a trusted peer's certificate is accepted even for this first call.
        let pinned: Vec<String> = self
            .peers
            .peers()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.fingerprint)
            .collect();
        let probe = target_client(to, None, pinned);
        let (c, url) = (probe.clone(), to.to_string());
        let sys = blocking(move || c.system()).await?.map_err(|e| match e {
            ClientError::Pin { mismatch, .. } => HandoffError::NotPinned {
                id: "?".into(),
                url: url.clone(),
                seen: mismatch.got,
            },
            ClientError::Unpinned { .. } => HandoffError::NotPinned {
                id: "?".into(),
                url: url.clone(),
                seen: "(none pinned for any peer)".into(),
            },
            e => HandoffError::Unreachable(e),
        })?;
        if sys.id == self.store.id() {
            return Err(HandoffError::SelfTarget(sys.id));
        }
        let peer = self
            .peers
            .peer(&sys.id)
            .ok_or_else(|| HandoffError::NotPeer(sys.id.clone(), to.into()))?;
        if to.starts_with("https://") {
            let seen = probe.seen_fingerprint().unwrap_or_default();
            if peer.fingerprint.as_deref() != Some(seen.as_str()) {
                return Err(HandoffError::NotPinned {
                    id: sys.id,
                    url: to.into(),
                    seen,
                });
            }
        }
        let target = target_client(
            to,
            Some(&peer.secret),
            peer.fingerprint.iter().cloned().collect(),
        );
        let base = self
            .store
            .base(&rec.info.base)
            .map_err(|e| HandoffError::Supervisor(e.into()))?;
        let incoming = IncomingRequest {
            from: self.store.id().into(),
            instance: id.clone(),
            service: rec.info.service.clone(),
            base_id: base.id,
            mem_mib: rec.info.mem_mib,
        };
        let c = target.clone();
        let r: Receiving = blocking(move || c.handoff_incoming(&incoming))
            .await?
            .map_err(|e| match e {
                e @ ClientError::Http { .. } => HandoffError::Unreachable(e),
                e => HandoffError::Refused(e),
            })?;
        *receiving = Some((target.clone(), r.instance_id.clone()));
        let token = parse_token(&r.token)
            .ok_or_else(|| HandoffError::BadAnswer("the token is not 64 hex digits".into()))?;
        let addr = stream_address(r.listen, to);
        tracing::info!(instance = %id, to, target_instance = %r.instance_id, stream = %addr, "handing off");
        let ask = ApiRequest::Handoff {
            to: addr,
            token,
            downtime_ms: req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS),
        };
        let sock = rec.api_sock.clone();
        let answer = blocking(move || vmm_handoff(&sock, &ask))
            .await?
            .map_err(HandoffError::Vmm)?;
        let stats = match answer {
            ApiResponse::HandedOff(s) => s,
            ApiResponse::Error(e) => return Err(HandoffError::VmmRefused(e)),
            other => return Err(HandoffError::Unexpected(Box::new(other))),
        };
        // The VM runs there now: nothing below may fail the handoff.
        *receiving = None;
        let tid = r.instance_id.clone();
        let endpoint = blocking(move || settled_endpoint(&target, &tid))
            .await
            .ok()
            .flatten();
        let moved = MovedTo {
            agent: to.into(),
            instance: r.instance_id.clone(),
            url: format!("{to}/v1/instances/{}", r.instance_id),
            endpoint,
        };
        self.sup
            .handoff_succeeded(&id, &stats, moved)
            .ok_or_else(|| HandoffError::Supervisor(SupervisorError::NoInstance(id)))
    }
}

/// The target instance's endpoint once it runs there (None if it does not within
/// [`SETTLE_TIMEOUT`]); asked with the peer secret `c` carries.
fn settled_endpoint(c: &Client, id: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
    while std::time::Instant::now() < deadline {
        match c.received_instance(id) {
            Ok(v) if v.state == "running" => return Some(v.endpoint),
            Ok(v) if !v.state.active() => return None,
            Err(ClientError::Api { status: 404, .. }) => return None,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_addresses_and_tokens() {
        assert_eq!(
            agent_url("http://10.0.0.2:9999/").unwrap(),
            "http://10.0.0.2:9999"
        );
        assert_eq!(
            agent_url("https://10.0.0.2:9999").unwrap(),
            "https://10.0.0.2:9999"
        );
        assert_eq!(url_host("https://10.0.0.2:9999"), "10.0.0.2");
        for bad in [
            "",
            "10.0.0.2:9999",
            "ftp://x",
            "https://",
            "http://",
            "http://a/b",
            "http://a b",
        ] {
            assert!(
                matches!(agent_url(bad), Err(HandoffError::BadTarget(_))),
                "{bad}"
            );
        }
        assert_eq!(url_host("http://10.0.0.2:9999"), "10.0.0.2");
        assert_eq!(url_host("http://[::1]:80"), "[::1]");
        assert_eq!(
            stream_address("0.0.0.0:4000".parse().unwrap(), "http://10.0.0.2:9999"),
            "10.0.0.2:4000"
        );
        assert_eq!(
            stream_address("10.0.0.3:4000".parse().unwrap(), "http://10.0.0.2:9999"),
            "10.0.0.3:4000"
        );
        let hex: String = (0..32).map(|i| format!("{i:02x}")).collect();
        let t = parse_token(&hex).unwrap();
        assert_eq!((t[0], t[31]), (0, 31));
        assert!(parse_token("ab").is_none());
        assert!(parse_token(&"zz".repeat(32)).is_none());
        assert!(parse_token(&"é".repeat(32)).is_none());
    }
}
