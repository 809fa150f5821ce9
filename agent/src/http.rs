//! The client API (HTTP/JSON, versioned under `/v1`), the web manager at `/` and `/metrics`.
//!
//! Every route is in [`ROUTES`] and described in `/v1/openapi.json` (a test keeps the two in
//! step). Mutating requests (anything but GET/HEAD) need `Authorization: Bearer <token>`
//! (401 otherwise): the operator's (or a paired device's) token, except on the handoff routes
//! between appliances (`/v1/handoff/...`), which take only a trusted peer's secret (see
//! [`crate::auth`]). Errors are JSON `{"error": "...", "hint": "..."}` with the status code
//! saying what kind: 400 malformed request, 401 unauthenticated, 404 unknown name, 409 wrong
//! state, 413 upload too large, 422 overlay or handoff refused, 502 the handoff's target or
//! vmm failed, 503 no capacity (with `Retry-After`).
//!
//! A moved instance (handed off to another appliance) stays listed here as `moved`; `GET
//! /v1/instances/{id}` answers 200 with `moved_to` (the target agent, the instance's id and
//! URL there, its endpoint) and a `Location` header holding that URL.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::auth::{Credentials, PeerStore, Principal, Role};
use crate::board::Board;
use crate::handoff::{HandoffError, HandoffRequest, IncomingRequest, Source};
use crate::metrics::Metrics;
use crate::pairing::api as pairing;
use crate::store::{error_chain, BaseInfo, Store, StoreError};
use crate::supervisor::{InstanceRecord, Supervisor, SupervisorError};

/// The API version in paths.
pub const API_VERSION: &str = "v1";
/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");
/// The web manager page.
pub const INDEX_HTML: &str = include_str!("web/index.html");

/// Every (method, path) the router serves, as in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/system"),
    ("GET", "/v1/bases"),
    ("GET", "/v1/services"),
    ("GET", "/v1/services/{name}"),
    ("DELETE", "/v1/services/{name}"),
    ("GET", "/v1/services/{name}/overlay"),
    ("PUT", "/v1/services/{name}/overlay"),
    ("GET", "/v1/instances"),
    ("POST", "/v1/instances"),
    ("GET", "/v1/instances/{id}"),
    ("DELETE", "/v1/instances/{id}"),
    ("POST", "/v1/instances/{id}/stop"),
    ("POST", "/v1/instances/{id}/handoff"),
    ("GET", "/v1/appliances"),
    ("POST", "/v1/handoff/incoming"),
    ("DELETE", "/v1/handoff/incoming/{id}"),
    ("GET", "/v1/apps"),
    ("GET", "/v1/apps/{name}"),
    ("GET", "/v1/apps/{name}/download"),
    ("GET", "/v1/pairing/window"),
    ("POST", "/v1/pairing/window"),
    ("DELETE", "/v1/pairing/window"),
    ("POST", "/v1/pairing/claim"),
];

/// Shared state of the handlers.
pub struct AppState {
    /// The board.
    pub board: Board,
    /// Data directory.
    pub store: Store,
    /// Instances.
    pub sup: Arc<Supervisor>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Who may mutate.
    pub creds: Credentials,
    /// The appliances trusted for handoff.
    pub peers: PeerStore,
    /// The pairing window and exchange.
    pub pairing: Arc<crate::pairing::Pairing>,
    /// When the agent started.
    pub started: Instant,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    hint: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, error: impl Into<String>, hint: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.into(),
            hint: hint.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({ "error": self.error, "hint": self.hint })),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cloudlet\""),
            );
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let msg = error_chain(&e);
        match e {
            StoreError::NoService(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                msg,
                "GET /v1/services lists the services this cloudlet offers",
            ),
            StoreError::NoBase(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                msg,
                "GET /v1/bases lists the staged base images",
            ),
            StoreError::NoApp(_) => {
                ApiError::new(StatusCode::NOT_FOUND, msg, "GET /v1/apps lists the app store")
            }
            StoreError::BadName(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                msg,
                "names are lower-case letters, digits, '.', '_' and '-'",
            ),
            StoreError::BadOverlay(_) | StoreError::OverlayBase(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                msg,
                "upload an overlay made by `image-builder overlay` for a base staged here (GET /v1/bases); nothing was installed",
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                msg,
                "see the agent's log",
            ),
        }
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        let msg = error_chain(&e);
        match e {
            SupervisorError::Store(s) => s.into(),
            SupervisorError::Full(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                msg,
                "stop an instance (DELETE /v1/instances/{id}) or use another cloudlet",
            ),
            SupervisorError::NoInstance(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                msg,
                "GET /v1/instances lists the instances",
            ),
            SupervisorError::Conflict(..) => {
                ApiError::new(StatusCode::CONFLICT, msg, "retry when the instance has settled")
            }
            SupervisorError::StartFailed { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                msg,
                "the instance is kept as `failed`: GET /v1/instances/{id} shows it; DELETE removes it",
            ),
            SupervisorError::ReceiveFailed(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                msg,
                "this appliance's vmm could not receive the handoff; see its agent's log",
            ),
            SupervisorError::SocketPath(_) | SupervisorError::InstanceDir(..) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                msg,
                "see the agent's log",
            ),
        }
    }
}

impl From<HandoffError> for ApiError {
    fn from(e: HandoffError) -> Self {
        let msg = error_chain(&e);
        let still = " The instance still runs here.";
        match e {
            HandoffError::Supervisor(s) => s.into(),
            HandoffError::BadTarget(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                msg,
                "send {\"to\": \"http://HOST:PORT\"}, the target agent's base URL",
            ),
            HandoffError::SelfTarget(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                msg,
                "name another appliance's agent",
            ),
            HandoffError::NotPeer(..) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                msg,
                "trust each other first: `agent add-peer ID --secret S` on both appliances (each with the other's id, the same secret)",
            ),
            ref r if r.target_status() == Some(503) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                msg,
                format!("the target has no room; try another appliance.{still}"),
            ),
            HandoffError::Refused(_) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                msg,
                format!("the target's error says why (401: it does not trust this appliance; 422: it does not hold the base).{still}"),
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                msg,
                format!("see both agents' logs.{still}"),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What the API shows of an instance.
pub type InstanceView = crate::supervisor::Instance;

fn view(r: &InstanceRecord, host: Option<&str>) -> InstanceView {
    let mut v = r.info.clone();
    // An instance listening on every address is reached at the host the client used.
    if let (Ok(sa), Some(h)) = (v.endpoint.parse::<std::net::SocketAddr>(), host) {
        if sa.ip().is_unspecified() {
            let h = h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h);
            v.endpoint = format!("{h}:{}", sa.port());
        }
    }
    v.synthesis_ms = v.synthesis_ms.map(round2);
    v.first_reply_ms = v.first_reply_ms.map(round2);
    v
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn host_of(h: &HeaderMap) -> Option<&str> {
    h.get(header::HOST).and_then(|v| v.to_str().ok())
}

/// The router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/system", get(system))
        .route("/v1/bases", get(bases))
        .route("/v1/services", get(services))
        .route("/v1/services/{name}", get(service).delete(delete_service))
        .route(
            "/v1/services/{name}/overlay",
            put(upload_overlay).get(download_overlay),
        )
        .route("/v1/instances", get(instances).post(start_instance))
        .route("/v1/instances/{id}", get(instance).delete(delete_instance))
        .route("/v1/instances/{id}/stop", post(stop_instance))
        .route("/v1/instances/{id}/handoff", post(handoff_instance))
        .route("/v1/appliances", get(appliances))
        .route("/v1/handoff/incoming", post(incoming_handoff))
        .route(
            "/v1/handoff/incoming/{id}",
            axum::routing::delete(abort_incoming),
        )
        .route("/v1/apps", get(apps))
        .route("/v1/apps/{name}", get(app))
        .route("/v1/apps/{name}/download", get(download_app))
        .route(
            "/v1/pairing/window",
            get(pairing::window)
                .post(pairing::open_window)
                .delete(pairing::close_window),
        )
        .route(crate::pairing::CLAIM_PATH, post(pairing::claim))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
        "GET /v1/openapi.json describes every route",
    )
}

/// Counts requests by matched route and status, and logs them.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    st.metrics.request(&route, method.as_str(), status);
    tracing::debug!(%method, path, status, ms = t0.elapsed().as_secs_f64() * 1e3, "api");
    resp
}

/// Requires a valid bearer credential on every mutating request: a peer's secret on the
/// handoff routes between appliances, the operator's (or a device's) token elsewhere. The
/// principal goes into the request's extensions.
async fn authenticate(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    // The one exception: a device without a credential yet claims one with the pairing
    // window's one-time claim code, which the claim handler checks.
    if *req.method() == Method::POST && req.uri().path() == crate::pairing::CLAIM_PATH {
        return next.run(req).await;
    }
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer_route = req.uri().path().starts_with("/v1/handoff/");
    let (roles, hint): (&[Role], &str) = if peer_route {
        (
            &[Role::Peer],
            "this route is for appliances that trust each other: send `Authorization: Bearer <secret>` with the secret in both appliances' DATA/peers.json (`agent add-peer`)",
        )
    } else {
        (
            &[Role::Operator, Role::Device],
            "send `Authorization: Bearer <token>` with the token from the board config (api.token)",
        )
    };
    match st.creds.check_role(h, roles) {
        Ok(p) => {
            tracing::debug!(principal = %p.name, "authenticated");
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(why) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "{} {} needs authentication: {why}",
                req.method(),
                req.uri().path()
            ),
            hint,
        )
        .into_response(),
    }
}

async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let counts = st.sup.counts();
    let (active, mem) = st.sup.usage();
    let (max, mem_max) = st.sup.limits();
    let rss = crate::sysinfo::own_rss_kib() as f64 / 1024.0;
    let text = st.metrics.render(
        &counts,
        &[
            (
                "cloudlet_instances_active",
                "Instances holding a slot.",
                f64::from(active),
            ),
            (
                "cloudlet_instances_max",
                "max_vms of the board.",
                f64::from(max),
            ),
            (
                "cloudlet_vm_memory_used_mib",
                "Guest memory of active instances, MiB.",
                mem as f64,
            ),
            (
                "cloudlet_vm_memory_mib",
                "Memory reserved for service VMs, MiB.",
                mem_max as f64,
            ),
            (
                "cloudlet_agent_rss_mib",
                "Resident memory of the agent, MiB.",
                rss,
            ),
        ],
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `GET /v1/system`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SystemInfo {
    /// Appliance id.
    pub id: String,
    /// Board name.
    pub board: String,
    /// Agent version.
    pub version: String,
    /// API version.
    pub api: String,
    /// Host CPUs.
    pub cores: u32,
    /// CPUs reserved for service VMs.
    pub vm_cpus: u32,
    /// 1-minute load average.
    pub load1: f64,
    /// Host memory, MiB.
    pub mem_total_mib: u64,
    /// Host memory available, MiB.
    pub mem_free_mib: u64,
    /// Memory reserved for service VMs, MiB.
    pub vm_memory_mib: u64,
    /// Of which in use by instances, MiB.
    pub vm_memory_used_mib: u64,
    /// Active instances.
    pub instances: u32,
    /// max_vms of the board.
    pub max_vms: u32,
    /// Staged base images.
    pub bases: Vec<BaseInfo>,
    /// Service names.
    pub services: Vec<String>,
    /// Digest of the service catalogue (as in the mDNS TXT `svcs`).
    pub services_digest: String,
    /// Seconds since the agent started.
    pub uptime_s: u64,
}

/// The system snapshot (also used for the mDNS TXT record).
pub fn system_info(st: &AppState) -> SystemInfo {
    let h = crate::sysinfo::host_load();
    let (active, used) = st.sup.usage();
    SystemInfo {
        id: st.store.id().into(),
        board: st.board.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        api: API_VERSION.into(),
        cores: h.cores,
        vm_cpus: st.board.cpus,
        load1: h.load1,
        mem_total_mib: h.mem_total_mib,
        mem_free_mib: h.mem_free_mib,
        vm_memory_mib: st.board.memory_mib,
        vm_memory_used_mib: used,
        instances: active,
        max_vms: st.board.max_vms,
        bases: st.store.bases(),
        services: st.store.services().into_iter().map(|s| s.name).collect(),
        services_digest: st.store.catalogue_digest(),
        uptime_s: st.started.elapsed().as_secs(),
    }
}

async fn system(State(st): State<Arc<AppState>>) -> ApiResult<Json<SystemInfo>> {
    let st2 = st.clone();
    let info = tokio::task::spawn_blocking(move || system_info(&st2))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), ""))?;
    Ok(Json(info))
}

async fn bases(State(st): State<Arc<AppState>>) -> Json<Vec<BaseInfo>> {
    Json(st.store.bases())
}

/// A service as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// Base image name.
    pub base: String,
    /// Free text.
    pub description: String,
    /// Overlay size, bytes.
    pub overlay_bytes: u64,
    /// Overlay SHA-256, hex.
    pub overlay_sha256: String,
    /// Guest RAM of an instance, MiB.
    pub mem_mib: Option<u64>,
    /// Instances of it holding a slot.
    pub instances: usize,
}

fn service_view(st: &AppState, r: crate::store::ServiceRecord) -> ServiceView {
    let n = st
        .sup
        .list()
        .iter()
        .filter(|i| i.info.service == r.name && i.info.state.active())
        .count();
    ServiceView {
        mem_mib: st.store.base(&r.base).ok().map(|b| b.mem_mib),
        name: r.name,
        base: r.base,
        description: r.description,
        overlay_bytes: r.overlay_bytes,
        overlay_sha256: r.overlay_sha256,
        instances: n,
    }
}

async fn services(State(st): State<Arc<AppState>>) -> Json<Vec<ServiceView>> {
    Json(
        st.store
            .services()
            .into_iter()
            .map(|r| service_view(&st, r))
            .collect(),
    )
}

async fn service(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ServiceView>> {
    let r = st.store.service(&name)?;
    Ok(Json(service_view(&st, r)))
}

async fn delete_service(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.store.remove_service(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/instances` body.
#[derive(Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Service name.
    pub service: String,
}

async fn start_instance(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<InstanceView>)> {
    let req: StartRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON: {e}"),
            "send {\"service\": \"NAME\"}",
        )
    })?;
    let rec = st.sup.start(&req.service).await?;
    Ok((StatusCode::CREATED, Json(view(&rec, host_of(&headers)))))
}

async fn instances(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Json<Vec<InstanceView>> {
    Json(
        st.sup
            .list()
            .iter()
            .map(|r| view(r, host_of(&headers)))
            .collect(),
    )
}

async fn instance(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let r = st.sup.get(&id).ok_or(SupervisorError::NoInstance(id))?;
    let mut resp = Json(view(&r, host_of(&headers))).into_response();
    if let Some(m) = &r.info.moved_to {
        if let Ok(v) = HeaderValue::from_str(&m.url) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
    }
    Ok(resp)
}

/// `POST /v1/instances/{id}/handoff`: runs on its own task, so a client that goes away
/// does not cut a handoff short.
async fn handoff_instance(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<InstanceView>> {
    let req: HandoffRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON: {e}"),
            "send {\"to\": \"http://HOST:PORT\"} (and optionally \"downtime_ms\")",
        )
    })?;
    let src = Source {
        sup: st.sup.clone(),
        store: st.store.clone(),
        peers: st.peers.clone(),
    };
    let rec = tokio::spawn(async move { src.hand_off(&id, &req).await })
        .await
        .map_err(|e| ApiError::from(HandoffError::Task(e.to_string())))??;
    Ok(Json(view(&rec, host_of(&headers))))
}

/// `GET /v1/appliances` query.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct BrowseQuery {
    /// How long to browse, ms (100 ..= 5000, default 1500).
    pub window_ms: Option<u64>,
}

/// Another appliance seen over mDNS.
#[derive(Serialize, Debug)]
pub struct Found {
    /// Its API's base URL.
    pub url: Option<String>,
    /// What it announced.
    #[serde(flatten)]
    pub appliance: crate::discovery::Appliance,
}

/// `GET /v1/appliances`: the other appliances announcing `_cloudlet._tcp` (handoff
/// targets for the web manager).
async fn appliances(
    State(st): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<BrowseQuery>,
) -> ApiResult<Json<Vec<Found>>> {
    let window = std::time::Duration::from_millis(q.window_ms.unwrap_or(1500).clamp(100, 5000));
    let me = st.store.id().to_string();
    let found = tokio::task::spawn_blocking(move || crate::discovery::browse(window))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), ""))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                error_chain(&e),
                "mDNS browsing is not possible here; enter the target's URL instead",
            )
        })?;
    Ok(Json(
        found
            .into_iter()
            .filter(|a| a.txt.get("id") != Some(&me))
            .map(|a| Found {
                url: a.url(),
                appliance: a,
            })
            .collect(),
    ))
}

/// `POST /v1/handoff/incoming` (from a trusted peer): checks the base and the room, starts
/// `vmm receive`, answers where it listens and the session token.
async fn incoming_handoff(
    State(st): State<Arc<AppState>>,
    axum::Extension(who): axum::Extension<Principal>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<crate::supervisor::Receiving>)> {
    let req: IncomingRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON: {e}"),
            "send {from, instance, service, base_id, mem_mib}",
        )
    })?;
    if who.name != format!("peer:{}", req.from) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "the credential is {}'s, but the request says it comes from appliance {}",
                who.name, req.from
            ),
            "send the secret shared with this appliance",
        ));
    }
    let Some(base) = st.store.bases().into_iter().find(|b| b.id == req.base_id) else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "base {} is not staged here, so instance {} of '{}' cannot be received",
                req.base_id, req.instance, req.service
            ),
            "stage the same base on this appliance first (`agent stage-base`); GET /v1/bases lists what it holds",
        ));
    };
    tracing::info!(from = %req.from, instance = %req.instance, service = %req.service, base = %base.name, "incoming handoff");
    let r = st.sup.receive(&req.service, &base.name, &req.from).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// `DELETE /v1/handoff/incoming/{id}`: the source gave up.
async fn abort_incoming(
    State(st): State<Arc<AppState>>,
    axum::Extension(who): axum::Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let from = who.name.strip_prefix("peer:").unwrap_or(&who.name);
    st.sup.abort_receive(&id, Some(from)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_instance(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<InstanceView>> {
    let r = st.sup.stop(&id).await?;
    Ok(Json(view(&r, host_of(&headers))))
}

async fn delete_instance(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<InstanceView>> {
    let r = st.sup.delete(&id).await?;
    Ok(Json(view(&r, host_of(&headers))))
}

async fn stream_file(path: std::path::PathBuf, sha256: &str, name: &str) -> ApiResult<Response> {
    let f = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot open {}: {e}", path.display()),
            "see the agent's log",
        )
    })?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 16));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
            (header::ETAG, format!("\"{sha256}\"")),
            (
                header::HeaderName::from_static("x-content-sha256"),
                sha256.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

async fn download_overlay(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let r = st.store.service(&name)?;
    stream_file(
        st.store.overlay_path(&name),
        &r.overlay_sha256,
        &format!("{name}.overlay"),
    )
    .await
}

/// Streams the upload into `tmp/`, refusing more than the board's limit, then verifies and
/// installs it (rename); nothing is installed on any failure.
async fn upload_overlay(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<ServiceView>)> {
    crate::store::check_name(&name)?;
    let limit = st.board.max_upload_bytes;
    let too_big = |n: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the overlay is {n} bytes or more; this board accepts at most {limit} bytes"),
            "raise api.max_upload_mib in the board config, or make a smaller overlay; nothing was installed",
        )
    };
    if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if n > limit {
            return Err(too_big(n));
        }
    }
    let tmp = st.store.tmp_path("upload");
    let internal = |e: std::io::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the upload: {e}"),
            "check the data directory's free space",
        )
    };
    let result: ApiResult<u64> = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(internal)?;
        let mut n = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("the upload broke off: {e}"),
                    "retry the upload",
                )
            })?;
            n += chunk.len() as u64;
            if n > limit {
                return Err(too_big(n));
            }
            f.write_all(&chunk).await.map_err(internal)?;
        }
        f.sync_all().await.map_err(internal)?;
        Ok(n)
    }
    .await;
    let n = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let existed = st.store.service(&name).is_ok();
    let store = st.store.clone();
    let tmp2 = tmp.clone();
    let name2 = name.clone();
    let installed =
        tokio::task::spawn_blocking(move || store.install_service(&name2, &tmp2, None, false))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), ""))?;
    let _ = tokio::fs::remove_file(&tmp).await;
    let rec = installed?;
    tracing::info!(service = %name, bytes = n, "overlay uploaded and installed");
    let code = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(service_view(&st, rec))))
}

async fn apps(State(st): State<Arc<AppState>>) -> Json<Vec<crate::store::AppRecord>> {
    Json(st.store.apps())
}

async fn app(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::store::AppRecord>> {
    Ok(Json(st.store.app(&name)?))
}

async fn download_app(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let a = st.store.app(&name)?;
    stream_file(st.store.app_file(&a), &a.sha256, &a.file).await
}

/// True for loopback or unspecified listen addresses (for logging the URL).
pub fn shown_ip(ip: IpAddr) -> IpAddr {
    if ip.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        for (method, path) in ROUTES {
            let op = &paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from openapi.json"))
                [method.to_ascii_lowercase()];
            assert!(op.is_object(), "{method} {path} missing from openapi.json");
            assert!(
                op["responses"].is_object(),
                "{method} {path} has no responses"
            );
        }
        let documented: usize = paths
            .values()
            .map(|p| {
                p.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "put", "post", "delete"].contains(&k.as_str()))
                    .count()
            })
            .sum();
        assert_eq!(
            documented,
            ROUTES.len(),
            "openapi.json documents routes that do not exist"
        );
    }

    use crate::auth::TokenStore;
    use crate::client::{Client, RawResponse};
    use crate::supervisor::tests::{fake_base, running, scratch_supervisor};

    const OPERATOR: &str = "operator-token";

    /// An agent in this process on 127.0.0.1:0 over a scratch data directory (base `micro`
    /// staged, its content id all `base_digit`s; no vmm). Returns its URL and state.
    async fn serve(name: &str, max_vms: u32, base_digit: char) -> (String, Arc<AppState>) {
        let (sup, store, d) = scratch_supervisor(name, max_vms, 1024);
        if base_digit != 'a' {
            fake_base(&d.join("base2"), 1, base_digit);
            store.stage_base("micro", &d.join("base2")).unwrap();
        }
        let peers = PeerStore::in_dir(store.root());
        let st = Arc::new(AppState {
            board: Board::shipped("dev").unwrap(),
            store,
            metrics: sup.metrics(),
            sup,
            creds: Credentials::default()
                .with(Arc::new(TokenStore::new(OPERATOR, "operator")))
                .with(Arc::new(peers.clone())),
            peers,
            pairing: Arc::new(crate::pairing::Pairing::new(
                Default::default(),
                Arc::new(crate::pairing::MemoryIssuer::new(
                    std::time::Duration::from_secs(60),
                )),
            )),
            started: Instant::now(),
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let app = router(st.clone());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, st)
    }

    async fn call(
        url: &str,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> RawResponse {
        let (c, m, p, b) = (
            Client::new(url, token),
            method.to_string(),
            path.to_string(),
            body.to_string(),
        );
        tokio::task::spawn_blocking(move || {
            c.raw(&m, &p, (!b.is_empty()).then_some(b.as_bytes()), true)
        })
        .await
        .unwrap()
        .unwrap()
    }

    fn says(r: &RawResponse, status: u16, needle: &str) {
        assert_eq!(r.status, status, "{r:?}");
        assert!(r.body.contains(needle), "{needle:?} not in {r:?}");
    }

    fn incoming(from: &str, base_digit: char) -> String {
        serde_json::to_string(&IncomingRequest {
            from: from.into(),
            instance: "i-00000001".into(),
            service: "model".into(),
            base_id: base_digit.to_string().repeat(64),
            mem_mib: 1,
        })
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_incoming_handoff_takes_a_peer_secret_a_held_base_and_room() {
        let (url, st) = serve("incoming", 1, 'a').await;
        let secret = "s".repeat(32);
        st.peers.add("0123456789ab", "source", &secret).unwrap();
        let path = "/v1/handoff/incoming";
        let good = incoming("0123456789ab", 'a');
        says(
            &call(&url, None, "POST", path, &good).await,
            401,
            "peers.json",
        );
        says(
            &call(&url, Some(OPERATOR), "POST", path, &good).await,
            401,
            "peer",
        );
        says(
            &call(&url, Some("s-wrong-secret-xxxxxxxx"), "POST", path, &good).await,
            401,
            "not valid",
        );
        // The secret is another appliance's than the one the request names.
        let other = incoming("ba9876543210", 'a');
        says(
            &call(&url, Some(&secret), "POST", path, &other).await,
            401,
            "ba9876543210",
        );
        // A peer's secret opens nothing else.
        says(
            &call(
                &url,
                Some(&secret),
                "POST",
                "/v1/instances",
                r#"{"service":"model"}"#,
            )
            .await,
            401,
            "only the handoff routes",
        );
        says(
            &call(&url, Some(&secret), "POST", path, "{").await,
            400,
            "malformed",
        );
        // A base not held here.
        let r = call(
            &url,
            Some(&secret),
            "POST",
            path,
            &incoming("0123456789ab", 'c'),
        )
        .await;
        says(&r, 422, "is not staged here");
        assert!(r.json()["hint"].as_str().unwrap().contains("stage-base"));
        // Held, with room, but the receiver does not come up (no vmm here): nothing is left.
        let r = call(&url, Some(&secret), "POST", path, &good).await;
        says(&r, 500, "cannot receive a handoff");
        assert!(st.sup.list().is_empty());
        assert_eq!(
            std::fs::read_dir(st.store.instances_dir()).unwrap().count(),
            0
        );
        // No room.
        running(&st.sup);
        let r = call(&url, Some(&secret), "POST", path, &good).await;
        says(&r, 503, "max_vms");
        says(
            &call(
                &url,
                Some(&secret),
                "DELETE",
                "/v1/handoff/incoming/i-nope",
                "",
            )
            .await,
            404,
            "no instance",
        );
        let m = call(&url, None, "GET", "/metrics", "").await.body;
        assert!(
            m.contains("cloudlet_handoffs_total{role=\"target\",outcome=\"failed\"} 1"),
            "{m}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_handoff_leaves_the_instance_running_here() {
        let (a, sa) = serve("source", 4, 'a').await;
        let (b, sb) = serve("target", 1, 'a').await;
        let (c, sc) = serve("other-base", 4, 'c').await;
        let id = running(&sa.sup);
        let ho = format!("/v1/instances/{id}/handoff");
        let to = |u: &str| format!(r#"{{"to":"{u}"}}"#);
        let state = || sa.sup.get(&id).unwrap().info;

        says(&call(&a, None, "POST", &ho, &to(&b)).await, 401, "Bearer");
        says(
            &call(&a, Some(OPERATOR), "POST", &ho, "{").await,
            400,
            "malformed",
        );
        says(
            &call(&a, Some(OPERATOR), "POST", &ho, &to("b:1")).await,
            400,
            "not an agent URL",
        );
        says(
            &call(
                &a,
                Some(OPERATOR),
                "POST",
                "/v1/instances/i-nope/handoff",
                &to(&b),
            )
            .await,
            404,
            "no instance",
        );
        says(
            &call(&a, Some(OPERATOR), "POST", &ho, &to(&a)).await,
            422,
            "this appliance",
        );
        // B is not a peer of A.
        let r = call(&a, Some(OPERATOR), "POST", &ho, &to(&b)).await;
        says(&r, 422, "not a trusted peer");
        assert!(r.json()["hint"].as_str().unwrap().contains("add-peer"));
        let v = state();
        assert_eq!(v.state, crate::supervisor::State::Running);
        assert!(v
            .handoff
            .unwrap()
            .error
            .unwrap()
            .contains("not a trusted peer"));
        // A trusts B, B does not trust A: B answers 401, A 502, and A's VM stays.
        let secret = "t".repeat(40);
        sa.peers.add(sb.store.id(), "b", &secret).unwrap();
        let r = call(&a, Some(OPERATOR), "POST", &ho, &to(&b)).await;
        says(&r, 502, "401");
        assert!(r.json()["hint"]
            .as_str()
            .unwrap()
            .contains("still runs here"));
        assert_eq!(state().state, crate::supervisor::State::Running);
        // Both trust each other, B is full: 503 from A too.
        sb.peers.add(sa.store.id(), "a", &secret).unwrap();
        running(&sb.sup);
        let r = call(&a, Some(OPERATOR), "POST", &ho, &to(&b)).await;
        says(&r, 503, "max_vms");
        assert_eq!(state().state, crate::supervisor::State::Running);
        // C does not hold the base: 502 naming C's 422.
        sa.peers.add(sc.store.id(), "c", &secret).unwrap();
        sc.peers.add(sa.store.id(), "a", &secret).unwrap();
        let r = call(&a, Some(OPERATOR), "POST", &ho, &to(&c)).await;
        says(&r, 502, "is not staged here");
        let v = state();
        assert_eq!(v.state, crate::supervisor::State::Running);
        assert_eq!(v.handoff.unwrap().phase, "failed");
        let m = call(&a, None, "GET", "/metrics", "").await.body;
        assert!(
            m.contains("cloudlet_handoffs_total{role=\"source\",outcome=\"failed\"} 5"),
            "{m}"
        );
    }
}
