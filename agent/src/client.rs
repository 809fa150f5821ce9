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

use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::discovery::{browse, browse_until, Appliance};
use crate::guest::GuestConn;
use crate::handoff::{HandoffRequest, IncomingRequest};
use crate::http::{InstanceView, ServiceView, SystemInfo};
use crate::supervisor::{Receiving, State};

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
}

/// A client of one agent's API.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
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
    pub fn new(base: &str, token: Option<&str>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            agent,
        }
    }

    /// The same client with `timeout` for a whole request (60 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
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
                    let mut next = Client::new(&m.agent, c.token.as_deref());
                    next.agent = c.agent.clone();
                    c = next;
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

    /// `DELETE /v1/devices/{id}` (operator): revokes a device's credential.
    pub fn revoke_device(&self, id: &str) -> Result<crate::devices::DeviceView, ClientError> {
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

    /// `PUT /v1/services/{name}/overlay`: uploads (streams) an overlay file.
    pub fn upload_overlay(
        &self,
        name: &str,
        file: &std::path::Path,
    ) -> Result<ServiceView, ClientError> {
        let path = format!("/v1/services/{name}/overlay");
        let url = self.url(&path);
        let f = std::fs::File::open(file)
            .map_err(|e| ClientError::Io(format!("cannot open {}", file.display()), e))?;
        let mut req = self
            .agent
            .put(&url)
            .header("Content-Type", "application/octet-stream");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.send(f).map_err(|e| self.http_err(&url, e))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.http_err(&url, e))?;
        self.check(&path, RawResponse { status, body })
    }

    /// `GET /v1/services/{name}/overlay` into `out`; returns the bytes written.
    pub fn download_overlay(&self, name: &str, out: &std::path::Path) -> Result<u64, ClientError> {
        let path = format!("/v1/services/{name}/overlay");
        let url = self.url(&path);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| self.http_err(&url, e))?;
        if resp.status().as_u16() != 200 {
            let status = resp.status().as_u16();
            let body = resp.into_body().read_to_string().unwrap_or_default();
            return self.check(&path, RawResponse { status, body });
        }
        let mut f = std::fs::File::create(out)
            .map_err(|e| ClientError::Io(format!("cannot create {}", out.display()), e))?;
        let mut r = resp.into_body().into_reader();
        std::io::copy(&mut r, &mut f)
            .map_err(|e| ClientError::Io(format!("cannot write {}", out.display()), e))
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

/// Measures each appliance's RTT and sorts them best first.
pub fn rank(found: Vec<Appliance>) -> Vec<Ranked> {
    let mut v: Vec<Ranked> = found
        .into_iter()
        .filter_map(|a| {
            let url = a.url()?;
            let rtt = Client::new(&url, None).rtt_ms(3).ok();
            let s = rtt.map(|r| score(&a, r)).unwrap_or(0.0);
            Some(Ranked {
                appliance: a,
                url,
                rtt_ms: rtt,
                score: s,
            })
        })
        .collect();
    v.sort_by(|a, b| b.score.total_cmp(&a.score));
    v
}

/// Browses for `window` and returns the ranked appliances.
pub fn discover_ranked(window: Duration) -> Result<Vec<Ranked>, ClientError> {
    Ok(rank(browse(window)?))
}

/// Browses until an appliance whose id (TXT `id`) or instance name is `who` has been
/// resolved (or `window` passes), and returns the ranked appliances.
pub fn discover_ranked_until(window: Duration, who: &str) -> Result<Vec<Ranked>, ClientError> {
    let found = browse_until(window, |f| {
        f.iter()
            .any(|a| a.instance == who || a.txt.get("id").is_some_and(|i| i == who))
    })?;
    Ok(rank(found))
}

/// The best appliance found within `window`.
pub fn best(window: Duration) -> Result<Ranked, ClientError> {
    discover_ranked(window)?
        .into_iter()
        .find(|r| r.score > 0.0)
        .ok_or_else(|| {
            ClientError::NotFound(format!(
                "no reachable cloudlet with free capacity answered mDNS within {window:?} (is an agent running with discovery on? pass --agent URL to skip discovery)"
            ))
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
    }
}
