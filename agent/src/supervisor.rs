//! The supervisor: one `vmm synthesize` process per service-VM instance.
//!
//! ```text
//!   POST /v1/instances ──▶ reserve a slot (max_vms, memory) ──▶ a socket pair
//!        ──▶ spawn `vmm synthesize --base B --overlay O --forward IP:0=10.0.2.15:80
//!                   --api-sock instances/ID/vm.sock --serial instances/ID/serial.log
//!                   --report-fd 0 --no-stdin --confine instances/ID
//!                   --cgroup …/vm-ID/tasks --jail UID:UID`
//!                   (its standard input: the vmm's end of the pair; spawned into a pid
//!                   namespace of its own, in its own cgroup: see crate::jail, crate::cgroup)
//!        ──▶ await its report: Ready (synthesis timings, the forward's bound port) or
//!            Failed (why, and a kind) or end of file (it died)
//!        ──▶ one `health` request to the guest (again only if it fails) ──▶ Running
//!        ──▶ in the background, the service's next instance as a warm standby (`crate::warm`):
//!            the same spawn, Ready, `ok health`, then it idles; the next start of the service
//!            hands it out (Running at once)
//!
//!   Starting ──ok health──▶ Running ──stop──▶ Stopping ──Exited──▶ Stopped
//!      │                      │
//!      └──Failed / exit / timeout──▶ Failed ◀──vmm exits on its own (crash, kill)
//!
//!   handoff, source:  Running ──begin──▶ HandingOff ──HandedOff──▶ Moved (moved_to)
//!                                          └──error──▶ Running (vmm alive) / Failed (vmm gone)
//!   handoff, target:  `vmm receive` ──Listening──▶ Receiving ──Ready + ok health──▶ Running
//!                                          └──Failed / end / timeout / abort──▶ removed, no files
//! ```
//!
//! Every step is an event the agent awaits (the report, the guest's reply, the `Exited`
//! report or the process's exit): nothing polls, and nothing reads the vmm's log, which is
//! kept for people. Each vmm runs in its own process group with stdio going to files, so
//! neither a Ctrl-C at the agent's terminal nor the agent's death reaches it. Its state is
//! kept in `instances/ID.json` ([`InstanceRecord`]); a restarted agent re-adopts instances
//! whose process is alive and answers `Status` on its control socket (postcard frames, see
//! `format::control`), and kills and reports the rest, so a vmm is never leaked. Stopping sends
//! `ApiRequest::Stop` and kills the process if it has not exited after [`STOP_GRACE`]; the
//! vmm reports `Exited` once its guest is stopped and its ports are closed, before the kernel
//! releases the VM.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use format::control::{
    self as wire, ApiRequest, ApiResponse, Failed, HandoffPhase, HandoffProgress, HandoffStats,
    Report,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::board::NetworkMode;
use crate::metrics::Metrics;
use crate::store::{error_chain, new_id, unix_now, Store, StoreError};

/// The guest's service address behind the forward.
pub const GUEST_SERVICE: &str = "10.0.2.15:80";
/// How long a start may take before the instance is failed.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a handoff's target waits for the VM to arrive before it gives up.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(600);
/// The environment variable that hands `vmm receive` its session token (64 hex digits).
pub const HANDOFF_TOKEN_ENV: &str = "VMM_HANDOFF_TOKEN";
/// How long a stopped vmm gets to exit before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Life-cycle state of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The vmm is synthesising; no verified reply yet.
    Starting,
    /// The guest answered `health`.
    Running,
    /// A stop was requested.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// The vmm exited on its own, or the start failed.
    Failed,
    /// Target of a handoff: `vmm receive` listens or receives; no VM runs here yet.
    Receiving,
    /// Source of a handoff: the VM still runs (and serves) here while it is sent.
    HandingOff,
    /// Handed off: the VM runs on another appliance (`moved_to` says where); nothing runs
    /// here.
    Moved,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 8] = [
        State::Starting,
        State::Running,
        State::Stopping,
        State::Stopped,
        State::Failed,
        State::Receiving,
        State::HandingOff,
        State::Moved,
    ];

    /// Holds a slot (counts against the limits).
    pub fn active(self) -> bool {
        matches!(
            self,
            State::Starting
                | State::Running
                | State::Stopping
                | State::Receiving
                | State::HandingOff
        )
    }

    /// Lower-case name (as in JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Receiving => "receiving",
            State::HandingOff => "handing_off",
            State::Moved => "moved",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for State {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What the API shows of an instance: its record without the host paths.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Instance {
    /// Instance id (`i-` and 8 hex digits).
    pub id: String,
    /// Service it runs.
    pub service: String,
    /// Base image it was synthesised from.
    pub base: String,
    /// Life-cycle state.
    pub state: State,
    /// Where clients reach the guest's service ("IP:PORT").
    pub endpoint: String,
    /// The vmm's own synthesis time (checks → vCPUs running), ms.
    pub synthesis_ms: Option<f64>,
    /// vmm spawn → first verified reply (`ok health`) from the guest, ms.
    pub first_reply_ms: Option<f64>,
    /// Guest RAM, MiB (counted against the board's memory).
    pub mem_mib: u64,
    /// When it was created (Unix seconds).
    pub created_unix: u64,
    /// The vmm's process id (while it may be alive).
    pub pid: Option<u32>,
    /// How the vmm ended ("exit status 0", "killed by signal 9").
    pub exit: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// True when a restarted agent took it over.
    #[serde(default)]
    pub adopted: bool,
    /// The last handoff of it from here (source side): progress, then the result.
    #[serde(default)]
    pub handoff: Option<HandoffInfo>,
    /// Where it went, once `moved`.
    #[serde(default)]
    pub moved_to: Option<MovedTo>,
    /// The appliance it was handed off from (its id), when it arrived by handoff.
    #[serde(default)]
    pub received_from: Option<String>,
    /// True when it started from a warm standby (synthesised and checked ahead, handed out on
    /// the start); `first_reply_ms` is then the standby's own spawn → `ok health`.
    #[serde(default)]
    pub warm_start: bool,
    /// Who started it ("operator", "device:<id>"); a device sees and manages only its own.
    /// None for instances received by handoff (the operator's).
    #[serde(default)]
    pub owner: Option<String>,
    /// The version of its service it was synthesised from (None: received by handoff).
    #[serde(default)]
    pub version: Option<u32>,
}

/// A handoff as the source shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HandoffInfo {
    /// The target agent's base URL.
    pub to: String,
    /// `connecting`, `delta`, `rounds`, `paused`, `done` or `failed`.
    pub phase: String,
    /// Rounds of pages sent (0: the δ against the base).
    pub round: u32,
    /// Bytes on the wire so far.
    pub bytes: u64,
    /// Pages dirtied during the last round.
    pub dirty_pages: u64,
    /// Measured link bandwidth, bytes per second (0 until known).
    pub bandwidth_bps: u64,
    /// The pause (source's pause → target's resume), ms, once done.
    pub downtime_ms: Option<f64>,
    /// Request → target running, ms, once done.
    pub total_ms: Option<f64>,
    /// Why it failed (the VM then still runs here).
    pub error: Option<String>,
    /// When it started (Unix seconds).
    pub started_unix: u64,
}

impl HandoffInfo {
    /// A handoff to `to` that is just starting.
    pub fn new(to: &str) -> HandoffInfo {
        HandoffInfo {
            to: to.into(),
            phase: "connecting".into(),
            round: 0,
            bytes: 0,
            dirty_pages: 0,
            bandwidth_bps: 0,
            downtime_ms: None,
            total_ms: None,
            error: None,
            started_unix: unix_now(),
        }
    }
}

/// The phase's name as [`HandoffInfo::phase`] shows it.
pub fn phase_name(p: HandoffPhase) -> &'static str {
    match p {
        HandoffPhase::Connecting => "connecting",
        HandoffPhase::Delta => "delta",
        HandoffPhase::Rounds => "rounds",
        HandoffPhase::Paused => "paused",
        HandoffPhase::Done => "done",
        HandoffPhase::Failed => "failed",
    }
}

/// Where a moved instance runs now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MovedTo {
    /// The target agent's base URL.
    pub agent: String,
    /// The instance's id there.
    pub instance: String,
    /// Its URL there (`AGENT/v1/instances/ID`).
    pub url: String,
    /// Its service endpoint there ("IP:PORT"), when known.
    pub endpoint: Option<String>,
}

/// `instances/ID.json`: what the API shows, and the instance's files on this host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceRecord {
    /// What the API shows.
    #[serde(flatten)]
    pub info: Instance,
    /// The vmm's control socket.
    pub api_sock: PathBuf,
    /// The guest's serial console log.
    pub serial_log: PathBuf,
    /// The vmm's own log.
    pub vmm_log: PathBuf,
}

/// Why a start or stop was refused.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// From the data directory (no such service, damaged record …).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The board's limits are reached.
    #[error("no capacity: {0}")]
    Full(String),
    /// No such instance.
    #[error("no instance '{0}'")]
    NoInstance(String),
    /// The operation does not fit the instance's state.
    #[error("instance {0} is {1}: {2}")]
    Conflict(String, &'static str, &'static str),
    /// The vmm did not come up.
    #[error("instance {id} failed to start")]
    StartFailed {
        /// Instance id.
        id: String,
        /// What happened.
        #[source]
        why: StartError,
    },
    /// The control socket's path does not fit a Unix socket address.
    #[error("the control socket path {0} is too long for a Unix socket: use a shorter --data-dir")]
    SocketPath(PathBuf),
    /// The instance's directory could not be created.
    #[error("cannot create {0}")]
    InstanceDir(PathBuf, #[source] std::io::Error),
    /// `vmm receive` did not come to listen (the target of a handoff).
    #[error("cannot receive a handoff")]
    ReceiveFailed(#[source] StartError),
}

/// Why a vmm did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The instance was deleted meanwhile.
    #[error("the instance vanished while starting")]
    Vanished,
    /// The vmm's log could not be opened.
    #[error("cannot open {0}")]
    Log(PathBuf, #[source] std::io::Error),
    /// The report channel could not be made.
    #[error("cannot make the vmm's report channel")]
    Channel(#[source] std::io::Error),
    /// The vmm could not be run.
    #[error("cannot run the vmm at {0} (build it with `cargo build --bins`, or pass --vmm)")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The vmm reported why it could not start.
    #[error("the vmm could not start ({:?}): {failed}", failed.kind)]
    Refused {
        /// Its report.
        failed: Failed,
    },
    /// The report channel broke or carried something else than a report.
    #[error("bad report from the vmm")]
    Report(#[source] wire::ApiError),
    /// The vmm reported a state other than Ready or Failed first.
    #[error("the vmm reported {0:?} before Ready")]
    Unexpected(Box<Report>),
    /// The vmm ended without a report, or before the guest answered.
    #[error("the vmm ended before the guest answered ({exit}); vmm log:\n{tail}")]
    Ended {
        /// How it ended.
        exit: String,
        /// The end of its log (for people).
        tail: String,
    },
    /// The vmm reported no port forward to reach the guest at.
    #[error("the vmm reported no port forward")]
    NoForward,
    /// Nothing within the start timeout.
    #[error("no reply to `health` within {0:?}; vmm log:\n{1}")]
    Timeout(Duration, String),
    /// No handoff session token could be made.
    #[error("cannot make a handoff token")]
    Token(#[source] crate::auth::AuthError),
}

/// A handoff being received: what the source needs to send it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Receiving {
    /// The new instance's id here.
    pub instance_id: String,
    /// Where `vmm receive` listens.
    pub listen: SocketAddr,
    /// The one-time session token (64 hex digits) the source's vmm must present.
    pub token: String,
}

/// Settings of the supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The address instances' forwarded ports listen on.
    pub host_ip: IpAddr,
    /// Guest networking.
    pub network: NetworkMode,
    /// Service VMs at once.
    pub max_vms: u32,
    /// Memory for service VMs, MiB.
    pub memory_mib: u64,
    /// Timeout of a start.
    pub start_timeout: Duration,
    /// Keep a warm standby per started service (see [`Supervisor::start`]).
    pub warm: bool,
    /// Start every vmm jailed (`vmm --jail`, a user of its own, in namespaces of its own:
    /// see [`crate::jail`]); off with `agent --no-jail`, for debugging.
    pub jail: bool,
    /// The appliance's cgroups (each VM gets its own inside).
    pub cgroups: Arc<crate::cgroup::Cgroups>,
}

struct Entry {
    rec: InstanceRecord,
    stop_requested: bool,
}

/// Supervises the instances of one data directory.
pub struct Supervisor {
    cfg: SupervisorConfig,
    store: Store,
    metrics: Arc<Metrics>,
    table: Mutex<BTreeMap<String, Entry>>,
    changed: watch::Sender<u64>,
    /// The warm standbys, by service, and the services whose standby is being made.
    warm: Mutex<crate::warm::Pool>,
    /// Signalled when the making of a standby ends.
    warm_made: tokio::sync::Notify,
    /// Builds holding a slot (their build VM, then their trial VM): job id → guest MiB.
    /// Locked after `table`, never before it.
    builds: Mutex<BTreeMap<String, u64>>,
    /// The VMs' user ids.
    jail_ids: crate::jail::JailIds,
}

/// A vmm process of ours and its cgroup, which is removed once the vmm has ended (when this
/// is dropped after the process was reaped).
#[derive(Debug)]
pub struct VmmChild {
    child: tokio::process::Child,
    cgroup: Option<Arc<crate::cgroup::VmCgroup>>,
}

impl std::ops::Deref for VmmChild {
    type Target = tokio::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.child
    }
}

impl std::ops::DerefMut for VmmChild {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.child
    }
}

impl VmmChild {
    /// Its cgroup, if it has one.
    pub fn cgroup(&self) -> Option<Arc<crate::cgroup::VmCgroup>> {
        self.cgroup.clone()
    }

    /// How it ended (see [`describe_exit_in`]).
    pub fn describe_exit(&self, st: std::process::ExitStatus) -> String {
        describe_exit_in(self.cgroup.as_deref(), st)
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            // A vmm left running (the agent exits without --stop-on-exit) keeps its cgroup.
            // The removal may wait for the vmm's last threads to leave: off the runtime.
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                std::thread::spawn(move || cg.remove());
            }
        }
    }
}

/// How a vmm in cgroup `cg` ended: a kill by the kernel's OOM killer in its own cgroup is
/// named as such; otherwise as [`describe_exit`].
pub fn describe_exit_in(
    cg: Option<&crate::cgroup::VmCgroup>,
    st: std::process::ExitStatus,
) -> String {
    if st.signal() == Some(nix::sys::signal::Signal::SIGKILL as i32) {
        if let Some(cg) = cg.filter(|c| c.oom_killed()) {
            return format!(
                "killed by the kernel's OOM killer: the VM outgrew its memory limit ({} MiB) in its own cgroup",
                cg.memory_mib()
            );
        }
    }
    describe_exit(st)
}

/// A build's slot on the board (its build VM, then its trial VM, one after the other);
/// given back when dropped.
pub struct BuildSlot {
    sup: Arc<Supervisor>,
    job: String,
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.sup.builds.lock().expect("builds").remove(&self.job);
    }
}

/// Active instances of `table` and their guest memory, MiB.
fn active_usage(table: &BTreeMap<String, Entry>) -> (u32, u64) {
    table
        .values()
        .filter(|e| e.rec.info.state.active())
        .fold((0, 0), |(n, m), e| (n + 1, m + e.rec.info.mem_mib))
}

/// Whether process `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_err() {
        return false;
    }
    // A zombie still "exists" for kill(2); its state letter in /proc/PID/stat is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// True when `pid` is a vmm whose command line names `sock` (guards against pid reuse).
fn is_our_vmm(pid: u32, sock: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let sock = sock.as_os_str().as_encoded_bytes();
            c.split(|&b| b == 0).any(|arg| arg == sock)
        })
        .unwrap_or(false)
}

/// Describes an exit status.
pub fn describe_exit(st: std::process::ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) if s == nix::sys::signal::Signal::SIGSYS as i32 => {
            "killed by its seccomp filter (SIGSYS): the vmm made a forbidden system call".into()
        }
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Describes an exit code the vmm reported.
fn describe_code(code: i32) -> String {
    format!("exit status {code}")
}

/// Reads one frame from an async stream: `Ok(None)` at end of file before it.
async fn read_message<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Option<T>, wire::ApiError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut buf = vec![0u8; wire::Frame::total_len(len)?];
    buf[..4].copy_from_slice(&len);
    r.read_exact(&mut buf[4..]).await?;
    wire::Frame::new_checked(&buf)?
        .message()?
        .map(Some)
        .map_err(wire::ApiError::Version)
}

/// Sends `health` to the guest at `addr` until it answers `ok health` (again only when a
/// try fails); returns the time since `t0`.
async fn first_health(addr: SocketAddr, t0: Instant) -> Duration {
    loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            crate::guest::request_async(addr, "health"),
        )
        .await
        {
            Ok(Ok(r)) if r == "ok health" => return t0.elapsed(),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Sends one request on a vmm's control socket and returns its answer.
pub async fn control_request(sock: &Path, req: &ApiRequest) -> Result<ApiResponse, wire::ApiError> {
    let mut s = tokio::net::UnixStream::connect(sock).await?;
    s.write_all(&wire::encode(req)?).await?;
    read_message(&mut s)
        .await?
        .ok_or_else(|| wire::ApiError::Io(std::io::ErrorKind::UnexpectedEof.into()))
}

impl Supervisor {
    /// A supervisor over `store`'s instances; call [`Supervisor::recover`] next.
    pub fn new(cfg: SupervisorConfig, store: Store, metrics: Arc<Metrics>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            cfg,
            store,
            metrics,
            table: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
            warm: Mutex::new(crate::warm::Pool::default()),
            warm_made: tokio::sync::Notify::new(),
            builds: Mutex::default(),
            jail_ids: crate::jail::JailIds::default(),
        })
    }

    /// The counters it keeps.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Bumped whenever an instance changes state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.store.instances_dir().join(format!("{id}.json"))
    }

    fn save(&self, rec: &InstanceRecord) {
        let p = self.record_path(&rec.info.id);
        let tmp = p.with_extension("json.tmp");
        let json = serde_json::to_string_pretty(rec).expect("a record serialises");
        if let Err(e) = std::fs::write(&tmp, json + "\n").and_then(|_| std::fs::rename(&tmp, &p)) {
            tracing::error!(instance = %rec.info.id, "cannot save {}: {e}", p.display());
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Option<InstanceRecord> {
        let rec = {
            let mut t = self.table.lock().expect("instance table");
            let e = t.get_mut(id)?;
            f(e);
            e.rec.clone()
        };
        self.save(&rec);
        self.notify();
        Some(rec)
    }

    /// All instances, oldest first.
    pub fn list(&self) -> Vec<InstanceRecord> {
        let t = self.table.lock().expect("instance table");
        let mut v: Vec<_> = t.values().map(|e| e.rec.clone()).collect();
        v.sort_by(|a, b| (a.info.created_unix, &a.info.id).cmp(&(b.info.created_unix, &b.info.id)));
        v
    }

    /// One instance.
    pub fn get(&self, id: &str) -> Option<InstanceRecord> {
        self.table
            .lock()
            .expect("instance table")
            .get(id)
            .map(|e| e.rec.clone())
    }

    /// (state, count) for every state.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let t = self.table.lock().expect("instance table");
        State::ALL
            .iter()
            .map(|s| {
                (
                    s.as_str(),
                    t.values().filter(|e| e.rec.info.state == *s).count(),
                )
            })
            .collect()
    }

    /// Active instances and the memory they hold, MiB.
    pub fn usage(&self) -> (u32, u64) {
        active_usage(&self.table.lock().expect("instance table"))
    }

    /// Slots held under the board's limits: the active instances and the builds (their
    /// VMs), with their guest memory, MiB; and how many of those slots are builds.
    fn held(&self, table: &BTreeMap<String, Entry>) -> (u32, u64, u32) {
        let (n, mem) = active_usage(table);
        let b = self.builds.lock().expect("builds");
        (
            n + b.len() as u32,
            mem + b.values().sum::<u64>(),
            b.len() as u32,
        )
    }

    /// Takes a slot for build `job` (its build VM of `mem_mib`, then its trial VM) under the
    /// board's limits, beside the instances (standbys give theirs up); or says which limit is
    /// reached.
    pub fn reserve_build(
        self: &Arc<Self>,
        job: &str,
        mem_mib: u64,
    ) -> Result<BuildSlot, SupervisorError> {
        let t = self.table.lock().expect("instance table");
        let (n, mem, builds) = self.held(&t);
        {
            let mut pool = self.warm.lock().expect("warm pool");
            let (wn, wmem) = pool.usage();
            if n + wn >= self.cfg.max_vms || mem + wmem + mem_mib > self.cfg.memory_mib {
                for w in pool.drain(None) {
                    tokio::spawn(crate::warm::discard(w));
                }
            }
        }
        if n >= self.cfg.max_vms {
            return Err(SupervisorError::Full(format!(
                "all {} service-VM slots of this board are in use (max_vms: {} instance(s), {builds} build(s)), and a build needs one for its build VM and its trial VM; stop an instance or build later",
                self.cfg.max_vms,
                n - builds
            )));
        }
        if mem + mem_mib > self.cfg.memory_mib {
            return Err(SupervisorError::Full(format!(
                "{mem} MiB of the board's {} MiB for service VMs are in use and a build's VM needs {mem_mib} MiB more; stop an instance or build later",
                self.cfg.memory_mib
            )));
        }
        self.builds
            .lock()
            .expect("builds")
            .insert(job.to_string(), mem_mib);
        Ok(BuildSlot {
            sup: Arc::clone(self),
            job: job.to_string(),
        })
    }

    /// Slots held by builds (their build or trial VM) and the memory they hold, MiB.
    pub fn build_usage(&self) -> (u32, u64) {
        let b = self.builds.lock().expect("builds");
        (b.len() as u32, b.values().sum())
    }

    /// The limits (max VMs, memory MiB).
    pub fn limits(&self) -> (u32, u64) {
        (self.cfg.max_vms, self.cfg.memory_mib)
    }

    /// Reads `instances/*.json` after an agent (re)start: re-adopts live vmms that answer on
    /// their control socket, kills live ones that do not, and marks the dead ones failed.
    pub async fn recover(self: &Arc<Self>) {
        let dir = self.store.instances_dir();
        crate::warm::remove_orphans(&dir, |pid, sock| {
            if pid_alive(pid) && is_our_vmm(pid, sock) {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let rec: InstanceRecord = match std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                Some(r) => r,
                None => {
                    tracing::warn!("ignoring unreadable instance record {}", p.display());
                    continue;
                }
            };
            let mut rec = rec;
            if rec.info.state == State::Receiving {
                // A handoff that had not arrived when the agent went: nobody will finish
                // it, so it leaves nothing behind.
                if let Some(pid) = rec.info.pid {
                    if pid_alive(pid) && is_our_vmm(pid, &rec.api_sock) {
                        signal(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                let _ = std::fs::remove_file(&p);
                let _ = std::fs::remove_dir_all(dir.join(&rec.info.id));
                tracing::warn!(instance = %rec.info.id, "dropped a handoff that was being received when the agent stopped");
                continue;
            }
            if rec.info.state == State::HandingOff {
                // The agent lost the handoff's answer: the vmm keeps the VM unless it went
                // (checked below); a moved VM's vmm has exited.
                if let Some(h) = rec.info.handoff.as_mut() {
                    h.phase = "failed".into();
                    h.error = Some("the agent restarted during the handoff".into());
                }
                rec.info.state = State::Running;
            }
            if rec.info.state.active() {
                let alive = rec
                    .info
                    .pid
                    .is_some_and(|pid| pid_alive(pid) && is_our_vmm(pid, &rec.api_sock));
                let answers = if alive {
                    matches!(
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            control_request(&rec.api_sock, &ApiRequest::Status),
                        )
                        .await,
                        Ok(Ok(ApiResponse::Status { .. }))
                    )
                } else {
                    false
                };
                if alive && answers && rec.info.state != State::Stopping {
                    rec.info.state = State::Running;
                    rec.info.adopted = true;
                    tracing::info!(instance = %rec.info.id, pid = ?rec.info.pid, endpoint = %rec.info.endpoint, "re-adopted a running instance");
                } else if alive {
                    let pid = rec.info.pid.unwrap_or(0);
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                    rec.info.state = State::Failed;
                    rec.info.exit = Some("killed by the agent".into());
                    rec.info.error = Some(
                        "its vmm did not answer on its control socket after an agent restart"
                            .into(),
                    );
                    rec.info.pid = None;
                    tracing::warn!(instance = %rec.info.id, pid, "killed an unresponsive vmm left from before the restart");
                } else {
                    rec.info.state = State::Failed;
                    rec.info.exit = Some("exited while the agent was down".into());
                    rec.info.error = Some("the vmm exited while the agent was not running".into());
                    rec.info.pid = None;
                    tracing::warn!(instance = %rec.info.id, "instance ended while the agent was down");
                }
            }
            let id = rec.info.id.clone();
            let adopt = rec.info.state == State::Running;
            self.save(&rec);
            self.table.lock().expect("instance table").insert(
                id.clone(),
                Entry {
                    rec,
                    stop_requested: false,
                },
            );
            if adopt {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.watch_adopted(id).await });
            }
        }
        self.notify();
    }

    /// Polls an adopted vmm (not our child, so no exit status) until it is gone.
    async fn watch_adopted(self: Arc<Self>, id: String) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Some(rec) = self.get(&id) else { return };
            let Some(pid) = rec.info.pid else { return };
            if !pid_alive(pid) {
                self.finished(
                    &id,
                    "exit status unknown: adopted after an agent restart".into(),
                );
                self.cfg.cgroups.remove_vm(&id);
                return;
            }
        }
    }

    /// Records `event` with `fields` in the data directory's audit log (the events list).
    fn event(&self, event: &str, fields: serde_json::Value) {
        crate::audit::Audit::in_dir(self.store.root()).record(event, fields);
    }

    /// Records that the vmm of `id` ended.
    fn finished(&self, id: &str, how: String) {
        let rec = self.update(id, |e| {
            e.rec.info.pid = None;
            if matches!(e.rec.info.state, State::HandingOff | State::Moved) {
                // A handed-off vmm exits 0 once the target runs the VM; the handoff's own
                // answer says how it went (see handoff_succeeded / handoff_failed).
            } else if e.stop_requested || e.rec.info.state == State::Stopping {
                e.rec.info.state = State::Stopped;
            } else if e.rec.info.state != State::Failed {
                e.rec.info.state = State::Failed;
                e.rec.info.error = Some(format!("the vmm ended unexpectedly ({how})"));
            }
            e.rec.info.exit = Some(how);
        });
        if let Some(r) = rec {
            let i = &r.info;
            if i.state == State::Failed {
                tracing::warn!(instance = %id, exit = ?i.exit, "instance failed; log: {}", r.vmm_log.display());
                self.event(
                    "instance.failed",
                    json!({"instance": id, "service": i.service, "reason": i.error, "exit": i.exit}),
                );
            } else {
                tracing::info!(instance = %id, "instance stopped");
                if i.state == State::Stopped {
                    self.event(
                        "instance.stopped",
                        json!({"instance": id, "service": i.service, "exit": i.exit}),
                    );
                }
            }
        }
    }

    /// Synthesises an instance of `service` for principal `owner` and waits for its first
    /// verified reply. With warm standbys on, an instance of a service started before is its
    /// standby resumed (see [`crate::warm`]), and a new standby is made in the background.
    pub async fn start(
        self: &Arc<Self>,
        service: &str,
        owner: &str,
    ) -> Result<InstanceRecord, SupervisorError> {
        let tt = Instant::now();
        let svc = self.store.service(service)?;
        let base = self.store.base(&svc.base)?;
        let standby = self
            .take_standby(&svc.name, svc.version, &svc.overlay_sha256)
            .await;
        let mut rec = match &standby {
            Some(w) => {
                let mut rec = w.rec.clone();
                rec.info.created_unix = unix_now();
                rec.info.warm_start = true;
                rec.info.pid = w.child.id();
                rec
            }
            None => self.new_record(&svc.name, &svc.base, base.mem_mib, State::Starting)?,
        };
        rec.info.version = Some(svc.version);
        rec.info.owner = Some(owner.into());
        let id = rec.info.id.clone();
        let dir = self.store.instances_dir().join(&id);
        if let Err(e) = self.reserve(&rec, &svc.name) {
            if let Some(w) = standby {
                crate::warm::discard(w).await;
            }
            return Err(e);
        }
        if standby.is_none() {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                self.table.lock().expect("instance table").remove(&id);
                return Err(SupervisorError::InstanceDir(dir, e));
            }
            self.save(&rec);
        }
        // A taken standby's record is written after its resume (see resume_standby).
        self.notify();
        let started = match standby {
            Some(w) => self.hand_out_standby(w, tt),
            None => self.launch(&id, &svc.name, svc.version, &svc.base).await,
        };
        match started {
            Ok(rec) => {
                self.refill(&svc, base.mem_mib);
                let me = Arc::clone(self);
                let ev = json!({
                    "instance": id, "service": svc.name, "version": svc.version,
                    "by": owner, "warm": rec.info.warm_start,
                    "start_ms": (tt.elapsed().as_secs_f64() * 1e5).round() / 100.0,
                });
                tokio::task::spawn_blocking(move || me.event("instance.started", ev));
                Ok(rec)
            }
            Err(why) => {
                self.metrics.start_failed();
                let msg = error_chain(&why);
                // The record (shown by the API) names no server path; the log keeps them.
                let shown = crate::store::hide_paths(&msg);
                self.update(&id, |e| {
                    e.rec.info.state = State::Failed;
                    e.rec.info.error = Some(shown);
                    e.rec.info.pid = None;
                });
                tracing::warn!(instance = %id, "start failed: {msg}");
                self.event(
                    "instance.failed",
                    json!({"instance": id, "service": svc.name, "version": svc.version,
                           "reason": crate::store::hide_paths(&msg)}),
                );
                Err(SupervisorError::StartFailed { id, why })
            }
        }
    }

    /// The standby of `service` when it was made from its version `version`, overlay `sha256`
    /// (a stale one is discarded in the background); one being made is awaited (it is ahead
    /// of a new spawn).
    async fn take_standby(
        &self,
        service: &str,
        version: u32,
        sha256: &str,
    ) -> Option<crate::warm::Standby> {
        let mut w = loop {
            let made = self.warm_made.notified();
            tokio::pin!(made);
            made.as_mut().enable();
            {
                let mut pool = self.warm.lock().expect("warm pool");
                if let Some(w) = pool.take(service) {
                    break w;
                }
                if !pool.wanted(service) {
                    return None;
                }
            }
            if tokio::time::timeout(self.cfg.start_timeout, made)
                .await
                .is_err()
            {
                return None;
            }
        };
        if let Ok(Some(st)) = w.child.try_wait() {
            tracing::warn!(
                service,
                "the warm standby's vmm had ended ({}): starting cold",
                w.child.describe_exit(st)
            );
            tokio::spawn(crate::warm::discard(w));
            return None;
        }
        if w.overlay_sha256 == sha256 && w.rec.info.version == Some(version) {
            return Some(w);
        }
        tracing::info!(service, "discarding a standby of a replaced overlay");
        tokio::spawn(crate::warm::discard(w));
        None
    }

    /// Hands the standby `w` out (already reserved as its instance): Running at once, since
    /// its guest runs and answered `health` before it waited. Its record is written after,
    /// off the request's path. `first_reply_ms` is the standby's own spawn → `ok health`.
    fn hand_out_standby(
        self: &Arc<Self>,
        w: crate::warm::Standby,
        t0: Instant,
    ) -> Result<InstanceRecord, StartError> {
        let crate::warm::Standby {
            rec,
            child,
            report,
            ready: (addr, synthesis_ms),
            answered_ms,
            ..
        } = w;
        let id = rec.info.id.clone();
        let rec = {
            let mut t = self.table.lock().expect("instance table");
            let e = t.get_mut(&id).ok_or(StartError::Vanished)?;
            if e.rec.info.state == State::Starting {
                e.rec.info.state = State::Running;
            }
            e.rec.info.endpoint = addr.to_string();
            e.rec.info.synthesis_ms = synthesis_ms;
            e.rec.info.first_reply_ms = Some(answered_ms);
            e.rec.clone()
        };
        self.notify();
        // Its record, then no more standby.pid, off the start's path: an agent that dies in
        // between leaves a standby without a record, which the next agent kills.
        let me = Arc::clone(self);
        let (sid, pid_file) = (
            id.clone(),
            rec.api_sock.with_file_name(crate::warm::PID_FILE),
        );
        tokio::task::spawn_blocking(move || {
            if let Some(now) = me.get(&sid) {
                me.save(&now);
            }
            let _ = std::fs::remove_file(pid_file);
        });
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.metrics.start_latency(ms);
        tracing::info!(instance = %id, endpoint = %addr, start_ms = ms, warm = true, "instance running");
        let me = Arc::clone(self);
        tokio::spawn(async move { me.watch(id, child, report).await });
        Ok(rec)
    }

    /// In the background, makes a standby of service `svc` (its current version, `mem_mib` of
    /// guest RAM) when standbys are on, it has none, and the board has room for it beside
    /// the instances.
    fn refill(self: &Arc<Self>, svc: &crate::store::ServiceRecord, mem_mib: u64) {
        let service = svc.name.as_str();
        if !self.cfg.warm || !matches!(self.cfg.network, NetworkMode::User) {
            return;
        }
        {
            let t = self.table.lock().expect("instance table");
            let (n, mem, _) = self.held(&t);
            let mut pool = self.warm.lock().expect("warm pool");
            let (wn, wmem) = pool.usage();
            if n + wn + 1 > self.cfg.max_vms || mem + wmem + mem_mib > self.cfg.memory_mib {
                return;
            }
            if !pool.begin(service, mem_mib) {
                return;
            }
        }
        let me = Arc::clone(self);
        let svc = svc.clone();
        tokio::spawn(async move {
            let service = svc.name.as_str();
            if let Err(e) = me.ensure_ram_image(&svc).await {
                tracing::warn!(
                    service,
                    "no shared RAM image (instances then apply the overlay each): {e}"
                );
            }
            let made = match me.make_standby(&svc, mem_mib).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(service, "no warm standby: {e}");
                    None
                }
            };
            let unwanted = me.warm.lock().expect("warm pool").end(service, made);
            if let Some(w) = unwanted {
                crate::warm::discard(w).await;
            }
            me.warm_made.notify_waiters();
        });
    }

    /// Runs `vmm ram-image` for the current version of service `svc`: writes its shared RAM
    /// image (`format::ram_image`, beside the version's overlay) unless the one there is up
    /// to date. Instances synthesised afterwards map it copy-on-write and share its pages.
    /// Once done for an overlay file (its checksum, inode and change time: a file rewritten
    /// even with the same bytes voids its image), later standbys of it skip the run.
    async fn ensure_ram_image(&self, svc: &crate::store::ServiceRecord) -> Result<(), String> {
        let (service, sha256, base) = (svc.name.as_str(), &svc.overlay_sha256, &svc.base);
        let overlay = self.store.overlay_path(service, svc.version);
        let key = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&overlay).map_err(|e| format!("no overlay: {e}"))?;
            format!("{sha256}:{}:{}:{}", m.ino(), m.ctime(), m.ctime_nsec())
        };
        if self.warm.lock().expect("warm pool").imaged(service) == Some(key.as_str()) {
            return Ok(());
        }
        let out = tokio::process::Command::new(&self.cfg.vmm)
            .arg("ram-image")
            .arg("--base")
            .arg(self.store.base_dir(base))
            .arg("--overlay")
            .arg(&overlay)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.cfg.vmm.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        tracing::debug!(service, "{}", String::from_utf8_lossy(&out.stdout).trim());
        self.warm
            .lock()
            .expect("warm pool")
            .set_imaged(service, &key);
        Ok(())
    }

    /// Spawns `vmm synthesize` for a future instance of `service`, awaits Ready and one
    /// verified `health`; the guest then idles until a start takes it.
    async fn make_standby(
        &self,
        svc: &crate::store::ServiceRecord,
        mem_mib: u64,
    ) -> Result<crate::warm::Standby, String> {
        let (service, sha256, base) = (svc.name.as_str(), &svc.overlay_sha256, &svc.base);
        let mut rec = self
            .new_record(service, base, mem_mib, State::Starting)
            .map_err(|e| error_chain(&e))?;
        rec.info.version = Some(svc.version);
        let dir = self.store.instances_dir().join(&rec.info.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let args = self.synthesize_args(service, svc.version, base);
        let made = async {
            let (mut child, mut report, t0) = self.spawn_vmm(&rec, &args, &["-v"], None)?;
            if let Some(pid) = child.id() {
                let _ = std::fs::write(dir.join(crate::warm::PID_FILE), pid.to_string());
            }
            let deadline = tokio::time::Instant::from_std(t0 + self.cfg.start_timeout);
            let ready = self
                .await_ready(None, &rec, &mut child, &mut report, deadline)
                .await?
                .expect("a standby has no stop request");
            // One verified request before it waits: a standby is handed out only when its
            // guest answers, and the guest's first run (its first touches of memory, which
            // cost the host most under shadow paging) is behind it.
            let answered = tokio::time::timeout_at(deadline, first_health(ready.0, t0)).await;
            let Ok(answered) = answered else {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(StartError::Timeout(
                    self.cfg.start_timeout,
                    log_tail(&rec.vmm_log, 8),
                ));
            };
            Ok::<_, StartError>(crate::warm::Standby {
                rec: rec.clone(),
                overlay_sha256: sha256.to_string(),
                child,
                report,
                ready,
                answered_ms: answered.as_secs_f64() * 1e3,
            })
        };
        match made.await {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(error_chain(&e))
            }
        }
    }

    /// The data directory.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A trial of version `svc.version` of a service before it becomes current: one VM
    /// synthesised from it, checked with one verified `health`, then ended. Returns its spawn
    /// → first verified reply, ms, or why it did not come up.
    pub async fn trial(&self, svc: &crate::store::ServiceRecord) -> Result<f64, String> {
        let mem = self
            .store
            .base(&svc.base)
            .map_err(|e| error_chain(&e))?
            .mem_mib;
        let w = self.make_standby(svc, mem).await?;
        let ms = w.answered_ms;
        crate::warm::discard(w).await;
        Ok(ms)
    }

    /// Ends the standbys of `service` (of every service: `None`), e.g. when the service is
    /// replaced or removed, or the agent exits.
    pub async fn drop_standbys(&self, service: Option<&str>) {
        let gone = self.warm.lock().expect("warm pool").drain(service);
        for w in gone {
            crate::warm::discard(w).await;
        }
    }

    /// Ends every standby and makes no more (the agent is exiting); returns once those
    /// being made are gone too.
    pub async fn close_standbys(&self) {
        self.warm.lock().expect("warm pool").close();
        self.drop_standbys(None).await;
        let deadline = tokio::time::Instant::now() + self.cfg.start_timeout;
        loop {
            let made = self.warm_made.notified();
            tokio::pin!(made);
            made.as_mut().enable();
            if self.warm.lock().expect("warm pool").in_making() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, made).await.is_err() {
                tracing::warn!("a warm standby was still being made at exit");
                return;
            }
        }
    }

    /// The services with a warm standby ready.
    pub fn standbys(&self) -> std::collections::BTreeSet<String> {
        self.warm.lock().expect("warm pool").services()
    }

    /// Takes a slot for `rec` under the lock (so concurrent starts cannot overshoot the
    /// limits), or says which limit is reached.
    fn reserve(&self, rec: &InstanceRecord, what: &str) -> Result<(), SupervisorError> {
        let mut t = self.table.lock().expect("instance table");
        let (n, mem, builds) = self.held(&t);
        {
            // Standbys give their slots up to instances.
            let mut pool = self.warm.lock().expect("warm pool");
            let (wn, wmem) = pool.usage();
            if n + wn >= self.cfg.max_vms || mem + wmem + rec.info.mem_mib > self.cfg.memory_mib {
                for w in pool.drain(None) {
                    tokio::spawn(crate::warm::discard(w));
                }
            }
        }
        if n >= self.cfg.max_vms {
            let of_builds = if builds > 0 {
                format!(", {builds} of them by a build on the appliance")
            } else {
                String::new()
            };
            return Err(SupervisorError::Full(format!(
                "all {} service-VM slots of this board are in use (max_vms{of_builds}); stop an instance or try another cloudlet",
                self.cfg.max_vms
            )));
        }
        if mem + rec.info.mem_mib > self.cfg.memory_mib {
            return Err(SupervisorError::Full(format!(
                "{} MiB of the board's {} MiB for service VMs are in use and '{}' needs {} MiB more",
                mem, self.cfg.memory_mib, what, rec.info.mem_mib
            )));
        }
        t.insert(
            rec.info.id.clone(),
            Entry {
                rec: rec.clone(),
                stop_requested: false,
            },
        );
        Ok(())
    }

    /// A fresh record of a new instance in `state` (not yet in the table).
    fn new_record(
        &self,
        service: &str,
        base: &str,
        mem_mib: u64,
        state: State,
    ) -> Result<InstanceRecord, SupervisorError> {
        let id = format!("i-{}", new_id(4));
        let dir = self.store.instances_dir().join(&id);
        let sock = dir.join("vm.sock");
        if sock.as_os_str().len() >= 100 {
            return Err(SupervisorError::SocketPath(sock));
        }
        Ok(InstanceRecord {
            info: Instance {
                id,
                service: service.into(),
                base: base.into(),
                state,
                endpoint: String::new(),
                synthesis_ms: None,
                first_reply_ms: None,
                mem_mib,
                created_unix: unix_now(),
                pid: None,
                exit: None,
                error: None,
                adopted: false,
                handoff: None,
                moved_to: None,
                received_from: None,
                warm_start: false,
                owner: None,
                version: None,
            },
            api_sock: sock,
            serial_log: dir.join("serial.log"),
            vmm_log: dir.join("vmm.log"),
        })
    }

    /// Forgets an instance and removes its record and files (a handoff that did not arrive
    /// leaves nothing behind).
    fn discard(&self, id: &str) {
        self.table.lock().expect("instance table").remove(id);
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_dir_all(self.store.instances_dir().join(id));
        self.notify();
    }

    /// The target side of a handoff: registers an instance of `service` on base `base` (a
    /// base staged here) in state `receiving`, spawns `vmm receive` for it with a fresh
    /// one-time session token, and returns once the vmm listens. The instance turns
    /// `running` when the vmm reports `Ready` and the guest answers here; when the vmm
    /// fails, ends, or nothing arrives within [`RECEIVE_TIMEOUT`], it is killed and the
    /// instance and its files are removed.
    pub async fn receive(
        self: &Arc<Self>,
        service: &str,
        base: &str,
        from: &str,
    ) -> Result<Receiving, SupervisorError> {
        let b = self.store.base(base)?;
        let mut rec = self.new_record(service, base, b.mem_mib, State::Receiving)?;
        rec.info.received_from = Some(from.into());
        let id = rec.info.id.clone();
        self.reserve(&rec, service)?;
        let dir = self.store.instances_dir().join(&id);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            self.discard(&id);
            return Err(SupervisorError::InstanceDir(dir, e));
        }
        self.save(&rec);
        self.notify();
        match self.listen(&rec).await {
            Ok((listen, token, child, report)) => {
                let me = Arc::clone(self);
                let wid = id.clone();
                tokio::spawn(async move { me.await_arrival(wid, child, report).await });
                tracing::info!(instance = %id, service, %listen, "receiving a handoff");
                Ok(Receiving {
                    instance_id: id,
                    listen,
                    token,
                })
            }
            Err(why) => {
                self.metrics.handoff("target", "failed");
                tracing::warn!(instance = %id, "cannot receive a handoff: {}", error_chain(&why));
                self.discard(&id);
                Err(SupervisorError::ReceiveFailed(why))
            }
        }
    }

    /// Spawns `vmm receive` and awaits its `Listening` report.
    async fn listen(
        &self,
        rec: &InstanceRecord,
    ) -> Result<(SocketAddr, String, VmmChild, tokio::net::UnixStream), StartError> {
        let token = crate::auth::random_secret().map_err(StartError::Token)?;
        let mut args: Vec<std::ffi::OsString> = vec![
            "receive".into(),
            "--base".into(),
            self.store.base_dir(&rec.info.base).into(),
            "--listen".into(),
            SocketAddr::new(self.cfg.host_ip, 0).to_string().into(),
        ];
        args.extend(self.net_args().into_iter().map(Into::into));
        let (mut child, mut report, _) =
            self.spawn_vmm(rec, &args, &[], Some((HANDOFF_TOKEN_ENV, &token)))?;
        let first =
            tokio::time::timeout(self.cfg.start_timeout, read_message::<Report>(&mut report)).await;
        let why = match first {
            Ok(Ok(Some(Report::Listening { addr }))) => return Ok((addr, token, child, report)),
            Err(_) => StartError::Timeout(self.cfg.start_timeout, log_tail(&rec.vmm_log, 8)),
            Ok(Ok(Some(Report::Failed(failed)))) => StartError::Refused { failed },
            Ok(Ok(Some(r))) => StartError::Unexpected(Box::new(r)),
            Ok(Ok(None)) => StartError::Ended {
                exit: "before listening".into(),
                tail: log_tail(&rec.vmm_log, 8),
            },
            Ok(Err(e)) => StartError::Report(e),
        };
        let _ = child.start_kill();
        let _ = child.wait().await;
        Err(why)
    }

    /// Follows a `vmm receive` until the VM runs here (then supervises it like any other)
    /// or the handoff is over without it (then removes every trace).
    async fn await_arrival(
        self: Arc<Self>,
        id: String,
        mut child: VmmChild,
        mut report: tokio::net::UnixStream,
    ) {
        let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
        // Reports other than the outcome (e.g. progress) are skipped.
        let arrival = async {
            loop {
                match read_message::<Report>(&mut report).await {
                    Ok(Some(Report::Handoff(_) | Report::Listening { .. })) => {}
                    other => return other,
                }
            }
        };
        let outcome: Result<(SocketAddr, Instant), String> = tokio::select! {
            r = arrival => match r {
                Ok(Some(Report::Ready(ready))) => match (&self.cfg.network, ready.forwards.first()) {
                    (NetworkMode::User, Some(f)) => Ok((f.host, Instant::now())),
                    (NetworkMode::User, None) => Err("the vmm reported no port forward".into()),
                    (NetworkMode::Tap(_), _) => {
                        Ok((GUEST_SERVICE.parse().expect("a socket address"), Instant::now()))
                    }
                },
                Ok(Some(Report::Failed(f))) => Err(format!("the handoff did not arrive: {f}")),
                Ok(Some(r)) => Err(format!("the vmm reported {r:?} before Ready")),
                Ok(None) => Err("the vmm ended before the VM ran here".into()),
                Err(e) => Err(format!("bad report from the vmm: {}", error_chain(&e))),
            },
            _ = self.stop_requested(&id) => Err("aborted".into()),
            _ = tokio::time::sleep_until(deadline) => Err(format!("nothing arrived within {RECEIVE_TIMEOUT:?}")),
        };
        let cg = child.cgroup();
        let checked = match outcome {
            Ok((addr, t0)) => tokio::select! {
                took = first_health(addr, t0) => Ok((addr, took)),
                st = child.wait() => Err(format!(
                    "the vmm ended before the guest answered ({})",
                    st.map_or_else(|e| format!("wait failed: {e}"), |st| describe_exit_in(cg.as_deref(), st))
                )),
                _ = tokio::time::sleep(self.cfg.start_timeout) => {
                    Err(format!("no reply to `health` within {:?}", self.cfg.start_timeout))
                }
                _ = self.stop_requested(&id) => Err("aborted".into()),
            },
            Err(e) => Err(e),
        };
        match checked {
            Ok((addr, took)) => {
                self.metrics.handoff("target", "received");
                let ms = took.as_secs_f64() * 1e3;
                self.update(&id, |e| {
                    if e.rec.info.state == State::Receiving {
                        e.rec.info.state = State::Running;
                    }
                    e.rec.info.endpoint = addr.to_string();
                    e.rec.info.first_reply_ms = Some(ms);
                });
                tracing::info!(instance = %id, endpoint = %addr, "a handed-off instance runs here");
                self.watch(id, child, report).await;
            }
            Err(why) => {
                self.metrics.handoff("target", "failed");
                tracing::warn!(instance = %id, "handoff not received: {why}; vmm log:\n{}",
                    self.get(&id).map(|r| log_tail(&r.vmm_log, 8)).unwrap_or_default());
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.discard(&id);
            }
        }
    }

    /// Aborts a handoff being received (the source gave up): kills its `vmm receive` and
    /// removes the instance. Refused once the VM runs here. With `by`, only the appliance
    /// it comes from may abort it (another's instance is not found).
    pub async fn abort_receive(&self, id: &str, by: Option<&str>) -> Result<(), SupervisorError> {
        {
            let mut t = self.table.lock().expect("instance table");
            let e = t
                .get_mut(id)
                .filter(|e| by.is_none() || e.rec.info.received_from.as_deref() == by)
                .ok_or_else(|| SupervisorError::NoInstance(id.into()))?;
            if e.rec.info.state != State::Receiving {
                return Err(SupervisorError::Conflict(
                    id.into(),
                    e.rec.info.state.as_str(),
                    "only a handoff still being received can be aborted",
                ));
            }
            e.stop_requested = true;
        }
        self.notify();
        // The receiver's task discards it; wait (briefly) until it has.
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while self.get(id).is_some() {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                break;
            }
        }
        Ok(())
    }

    /// Source side: marks a running instance `handing_off` to `to`. Refused (409) unless it
    /// runs.
    pub fn begin_handoff(&self, id: &str, to: &str) -> Result<InstanceRecord, SupervisorError> {
        let rec = {
            let mut t = self.table.lock().expect("instance table");
            let e = t
                .get_mut(id)
                .ok_or_else(|| SupervisorError::NoInstance(id.into()))?;
            if e.rec.info.state != State::Running || e.stop_requested {
                return Err(SupervisorError::Conflict(
                    id.into(),
                    e.rec.info.state.as_str(),
                    "only a running instance can be handed off",
                ));
            }
            e.rec.info.state = State::HandingOff;
            e.rec.info.handoff = Some(HandoffInfo::new(to));
            e.rec.clone()
        };
        self.save(&rec);
        self.notify();
        Ok(rec)
    }

    /// Source side: a progress report of the vmm.
    pub fn handoff_progress(&self, id: &str, p: &HandoffProgress) {
        self.update(id, |e| {
            if e.rec.info.state != State::HandingOff {
                return;
            }
            if let Some(h) = e.rec.info.handoff.as_mut() {
                h.phase = phase_name(p.phase).into();
                h.round = p.round;
                h.bytes = p.bytes;
                h.dirty_pages = p.dirty_pages;
                h.bandwidth_bps = p.bandwidth_bps;
            }
        });
    }

    /// Source side: the VM runs on the target; the instance here becomes `moved`.
    pub fn handoff_succeeded(
        &self,
        id: &str,
        stats: &HandoffStats,
        moved: MovedTo,
    ) -> Option<InstanceRecord> {
        let downtime_ms = stats.downtime_us as f64 / 1e3;
        self.metrics
            .handoff_moved(stats.bytes, stats.rounds, downtime_ms);
        let rec = self.update(id, |e| {
            e.rec.info.state = State::Moved;
            e.rec.info.pid = None;
            if let Some(h) = e.rec.info.handoff.as_mut() {
                h.phase = "done".into();
                h.round = stats.rounds;
                h.bytes = stats.bytes;
                h.downtime_ms = Some(downtime_ms);
                h.total_ms = Some(stats.total_us as f64 / 1e3);
                h.error = None;
            }
            e.rec.info.moved_to = Some(moved);
        });
        tracing::info!(instance = %id, downtime_ms, bytes = stats.bytes, rounds = stats.rounds, "handed off");
        rec
    }

    /// Source side: the handoff failed. The instance is `running` again when its vmm still
    /// runs (it keeps the VM on any failure), `failed` when the vmm ended meanwhile.
    pub fn handoff_failed(&self, id: &str, why: &str) -> Option<InstanceRecord> {
        self.metrics.handoff("source", "failed");
        tracing::warn!(instance = %id, "handoff failed: {why}");
        self.update(id, |e| {
            if e.rec.info.state != State::HandingOff {
                return;
            }
            let alive = e.rec.info.pid.is_some_and(pid_alive);
            e.rec.info.state = if alive { State::Running } else { State::Failed };
            if !alive {
                e.rec.info.pid = None;
                e.rec.info.error = Some(crate::store::hide_paths(&format!(
                    "the vmm ended during a handoff: {why}"
                )));
            }
            if let Some(h) = e.rec.info.handoff.as_mut() {
                h.phase = "failed".into();
                h.error = Some(crate::store::hide_paths(why));
            }
        })
    }

    /// The guest network arguments of a vmm (port 0: the vmm binds a free port and reports
    /// it).
    fn net_args(&self) -> Vec<String> {
        match &self.cfg.network {
            NetworkMode::User => vec![
                "--forward".into(),
                format!("{}={GUEST_SERVICE}", SocketAddr::new(self.cfg.host_ip, 0)),
            ],
            NetworkMode::Tap(dev) => vec!["--tap".into(), dev.clone()],
        }
    }

    /// Spawns `vmm ARGS --api-sock S --serial F --report-fd N --confine DIR TAIL` (with `env`) for the
    /// instance `rec`, in its own process group with stdio to its log; records its pid.
    /// Returns the child, our end of the report channel, and the spawn time.
    fn spawn_vmm(
        &self,
        rec: &InstanceRecord,
        args: &[std::ffi::OsString],
        tail: &[&str],
        env: Option<(&str, &str)>,
    ) -> Result<(VmmChild, tokio::net::UnixStream, Instant), StartError> {
        let _ = std::fs::remove_file(&rec.api_sock);
        let log_err = |e| StartError::Log(rec.vmm_log.clone(), e);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rec.vmm_log)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        // The vmm's end becomes its standard input (it reads no input: `--no-stdin`), so no
        // other vmm started meanwhile inherits it (its end of file is this vmm's exit), and the
        // spawn needs no code in the child: std then spawns with posix_spawn (vfork), not
        // fork, which copies this multi-threaded process's page tables.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Channel)?;
        ours.set_nonblocking(true).map_err(StartError::Channel)?;
        let report = tokio::net::UnixStream::from_std(ours).map_err(StartError::Channel)?;
        let mut cmd = tokio::process::Command::new(&self.cfg.vmm);
        cmd.args(args)
            .arg("--api-sock")
            .arg(&rec.api_sock)
            .arg("--serial")
            .arg(&rec.serial_log)
            .arg("--report-fd")
            .arg("0")
            .arg("--no-stdin")
            // What it writes (socket, serial log, snapshots) stays in the instance's directory.
            .arg("--confine")
            .arg(rec.api_sock.parent().unwrap_or(Path::new(".")))
            .args(tail)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false)
            // The operator token stays with the agent.
            .env_remove(crate::auth::TOKEN_ENV);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        // Its own cgroup, joined before it allocates anything.
        let cgroup = self
            .cfg
            .cgroups
            .vm(&rec.info.id, rec.info.mem_mib)
            .map(Arc::new);
        for f in cgroup.iter().flat_map(|c| c.join_files()) {
            cmd.arg("--cgroup").arg(f);
        }
        let t0 = Instant::now();
        let spawned = if self.cfg.jail {
            // A user of its own, and pid 1 of a pid namespace of its own (see crate::jail).
            let id = self.jail_ids.take();
            cmd.arg("--jail").arg(format!("{id}:{id}"));
            let rt = tokio::runtime::Handle::current();
            crate::jail::spawn_in_namespaces(|| {
                let _in_runtime = rt.enter();
                cmd.spawn()
            })
        } else {
            cmd.spawn()
        };
        let child = match spawned {
            Ok(child) => VmmChild { child, cgroup },
            Err(e) => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                return Err(StartError::Spawn(self.cfg.vmm.clone(), e));
            }
        };
        let pid = child.id();
        self.update(&rec.info.id, |e| e.rec.info.pid = pid);
        Ok((child, report, t0))
    }

    /// The arguments of `vmm synthesize` for an instance of version `version` of `service`
    /// on `base`.
    fn synthesize_args(&self, service: &str, version: u32, base: &str) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "synthesize".into(),
            "--base".into(),
            self.store.base_dir(base).into(),
            "--overlay".into(),
            self.store.overlay_path(service, version).into(),
        ];
        args.extend(self.net_args().into_iter().map(Into::into));
        args
    }

    /// Spawns the vmm with a report channel, awaits its Ready report and the guest's first
    /// `ok health`.
    async fn launch(
        self: &Arc<Self>,
        id: &str,
        service: &str,
        version: u32,
        base: &str,
    ) -> Result<InstanceRecord, StartError> {
        let rec = self.get(id).ok_or(StartError::Vanished)?;
        let args = self.synthesize_args(service, version, base);
        let (mut child, mut report, t0) = self.spawn_vmm(&rec, &args, &["-v"], None)?;
        let deadline = tokio::time::Instant::from_std(t0 + self.cfg.start_timeout);
        let ready = self
            .await_ready(Some(id), &rec, &mut child, &mut report, deadline)
            .await?;
        self.until_healthy(id, child, report, ready, t0, deadline)
            .await
    }

    /// Awaits the Ready report of a vmm just spawned for `rec` (an instance `id` in the table,
    /// or a standby when `None`): its service address and synthesis time, or `None` when a
    /// stop came first. Reaps the vmm when it failed.
    async fn await_ready(
        &self,
        id: Option<&str>,
        rec: &InstanceRecord,
        child: &mut VmmChild,
        report: &mut tokio::net::UnixStream,
        deadline: tokio::time::Instant,
    ) -> Result<Option<(SocketAddr, Option<f64>)>, StartError> {
        let stop = async {
            match id {
                Some(id) => self.stop_requested(id).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            r = read_message::<Report>(report) => r,
            _ = stop => return Ok(None),
            _ = tokio::time::sleep_until(deadline) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(StartError::Timeout(self.cfg.start_timeout, log_tail(&rec.vmm_log, 8)));
            }
        };
        let ready = match first {
            Ok(Some(Report::Ready(ready))) => ready,
            other => {
                // After Failed or at end of file the vmm exits on its own.
                if matches!(other, Ok(Some(Report::Exited { .. })) | Err(_)) {
                    let _ = child.start_kill();
                }
                let st = child.wait().await;
                let exit = st.map_or_else(
                    |e| format!("wait failed: {e}"),
                    |st| child.describe_exit(st),
                );
                if let Some(id) = id {
                    self.update(id, |e| e.rec.info.exit = Some(exit.clone()));
                }
                return Err(match other {
                    Ok(Some(Report::Failed(failed))) => StartError::Refused { failed },
                    Ok(Some(r)) => StartError::Unexpected(Box::new(r)),
                    Ok(None) => StartError::Ended {
                        exit,
                        tail: log_tail(&rec.vmm_log, 8),
                    },
                    Err(e) => StartError::Report(e),
                });
            }
        };
        let addr = match (&self.cfg.network, ready.forwards.first()) {
            (NetworkMode::User, Some(f)) => f.host,
            (NetworkMode::User, None) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(StartError::NoForward);
            }
            (NetworkMode::Tap(_), _) => GUEST_SERVICE.parse().expect("a socket address"),
        };
        Ok(Some((addr, ready.synthesis.map(|t| t.total_ms()))))
    }

    /// The guest of instance `id` runs (`ready`: its address and synthesis time, `None` when
    /// a stop came first): one verified request (again only if that fails), then the instance
    /// is Running, with its first reply counted from `t0`, and its vmm is followed.
    async fn until_healthy(
        self: &Arc<Self>,
        id: &str,
        mut child: VmmChild,
        report: tokio::net::UnixStream,
        ready: Option<(SocketAddr, Option<f64>)>,
        t0: Instant,
        deadline: tokio::time::Instant,
    ) -> Result<InstanceRecord, StartError> {
        let mut first_reply = None;
        let cg = child.cgroup();
        if let Some((addr, _)) = ready {
            let tail = || log_tail(&self.get(id).map(|r| r.vmm_log).unwrap_or_default(), 8);
            tokio::select! {
                took = first_health(addr, t0) => first_reply = Some(took),
                _ = self.stop_requested(id) => {}
                st = child.wait() => {
                    let exit = st.map_or_else(|e| format!("wait failed: {e}"), |st| describe_exit_in(cg.as_deref(), st));
                    self.update(id, |e| e.rec.info.exit = Some(exit.clone()));
                    return Err(StartError::Ended { exit, tail: tail() });
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(StartError::Timeout(self.cfg.start_timeout, tail()));
                }
            }
        }
        let first_ms = first_reply.map(|d| d.as_secs_f64() * 1e3);
        let rec = self
            .update(id, |e| {
                if e.rec.info.state == State::Starting {
                    e.rec.info.state = State::Running;
                }
                // Recorded with the first reply (a record written earlier would delay it).
                if let Some((addr, synthesis_ms)) = ready {
                    e.rec.info.endpoint = addr.to_string();
                    e.rec.info.synthesis_ms = synthesis_ms;
                }
                e.rec.info.first_reply_ms = first_ms;
            })
            .ok_or(StartError::Vanished)?;
        if let Some(ms) = first_ms {
            self.metrics.start_latency(ms);
            tracing::info!(instance = %id, service = %rec.info.service, endpoint = %rec.info.endpoint, first_reply_ms = ms, synthesis_ms = ?rec.info.synthesis_ms, warm = rec.info.warm_start, "instance running");
        }
        let me = Arc::clone(self);
        let wid = id.to_string();
        tokio::spawn(async move { me.watch(wid, child, report).await });
        Ok(rec)
    }

    /// Resolves once a stop of `id` is requested (or it is gone).
    async fn stop_requested(&self, id: &str) {
        let mut rx = self.changed.subscribe();
        loop {
            let stop = self
                .table
                .lock()
                .expect("instance table")
                .get(id)
                .is_none_or(|e| e.stop_requested);
            if stop || rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Follows a running vmm of ours: its `Exited` report (the guest stopped, its ports
    /// closed), then its exit status.
    async fn watch(
        self: Arc<Self>,
        id: String,
        mut child: VmmChild,
        mut report: tokio::net::UnixStream,
    ) {
        // A stop during the start leaves Ready unread.
        loop {
            match read_message::<Report>(&mut report).await {
                Ok(Some(Report::Exited { code })) => {
                    self.finished(&id, describe_code(code));
                    break;
                }
                Ok(Some(Report::Handoff(p))) => self.handoff_progress(&id, &p),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let how = match child.wait().await {
            Ok(st) => child.describe_exit(st),
            Err(e) => format!("wait failed: {e}"),
        };
        self.finished(&id, how);
    }

    /// Stops an instance: `Stop` over its control socket, a kill after [`STOP_GRACE`]. Returns
    /// once the vmm has reported its guest stopped (or, for one adopted after an agent
    /// restart, once its process is gone).
    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<InstanceRecord, SupervisorError> {
        if let Some(mut r) = self.get(id).filter(|r| r.info.state == State::Receiving) {
            // Nothing runs here yet: stopping a reception aborts it (and removes it).
            self.abort_receive(id, None).await?;
            r.info.state = State::Stopped;
            r.info.pid = None;
            return Ok(r);
        }
        let (pid, sock, adopted) = {
            let mut t = self.table.lock().expect("instance table");
            let e = t
                .get_mut(id)
                .ok_or_else(|| SupervisorError::NoInstance(id.into()))?;
            if !e.rec.info.state.active() {
                return Ok(e.rec.clone());
            }
            if e.rec.info.state == State::HandingOff {
                return Err(SupervisorError::Conflict(
                    id.into(),
                    e.rec.info.state.as_str(),
                    "it is being handed off; stop it once it has moved or the handoff failed",
                ));
            }
            e.stop_requested = true;
            if e.rec.info.state == State::Running {
                e.rec.info.state = State::Stopping;
            }
            (e.rec.info.pid, e.rec.api_sock.clone(), e.rec.info.adopted)
        };
        if let Some(r) = self.get(id) {
            self.save(&r);
        }
        self.notify();
        if let Some(pid) = pid {
            let asked = tokio::time::timeout(
                Duration::from_secs(2),
                control_request(&sock, &ApiRequest::Stop),
            )
            .await;
            if !matches!(asked, Ok(Ok(ApiResponse::Ok))) {
                tracing::info!(instance = %id, "the vmm did not take Stop on its socket; killing it");
                signal(pid, nix::sys::signal::Signal::SIGKILL);
            }
            if !self.ended_within(id, pid, adopted, STOP_GRACE).await {
                tracing::warn!(instance = %id, pid, "the vmm did not exit after Stop; killing it");
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                self.ended_within(id, pid, adopted, Duration::from_secs(2))
                    .await;
            }
        }
        self.update(id, |e| {
            e.rec.info.pid = None;
            if e.rec.info.state.active() {
                e.rec.info.state = State::Stopped;
            }
        })
        .ok_or_else(|| SupervisorError::NoInstance(id.into()))
    }

    /// Waits up to `limit` for the vmm of `id` to end: for ours, until its watcher records
    /// it (an event); for an adopted one (not our child, no report channel), by polling
    /// its pid.
    async fn ended_within(&self, id: &str, pid: u32, adopted: bool, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if adopted {
            while pid_alive(pid) {
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return true;
        }
        let mut rx = self.changed.subscribe();
        loop {
            if self.get(id).is_none_or(|r| r.info.pid.is_none()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.get(id).is_none_or(|r| r.info.pid.is_none()),
            }
        }
    }

    /// Stops (if needed) and forgets an instance, removing its files.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<InstanceRecord, SupervisorError> {
        let rec = self.stop(id).await?;
        self.table.lock().expect("instance table").remove(id);
        let _ = std::fs::remove_file(self.record_path(id));
        let _ = std::fs::remove_dir_all(self.store.instances_dir().join(id));
        self.notify();
        Ok(rec)
    }

    /// Stops every active instance (agent shutdown with --stop-on-exit).
    pub async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .list()
            .into_iter()
            .filter(|r| r.info.state.active())
            .map(|r| r.info.id)
            .collect();
        for id in ids {
            if let Err(e) = self.stop(&id).await {
                tracing::warn!(instance = %id, "stop at shutdown failed: {}", error_chain(&e));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A base directory `mem_mib` MiB large that loads (sizes only; no VM can run on it).
    pub(crate) fn fake_base(dir: &Path, mem_mib: u64, id_digit: char) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("kernel"), b"k").unwrap();
        std::fs::write(dir.join("state"), b"s").unwrap();
        let m = std::fs::File::create(dir.join("memory")).unwrap();
        m.set_len(mem_mib << 20).unwrap();
        let manifest = format::base::Manifest {
            version: format::base::MANIFEST_VERSION,
            id: id_digit.to_string().repeat(64),
            mem_mib,
            kernel_bytes: 1,
            state_bytes: 1,
            memory_bytes: mem_mib << 20,
            memory_disk_bytes: 0,
            cmdline: String::new(),
            disk_bytes: None,
        };
        std::fs::write(dir.join(format::base::MANIFEST), manifest.to_json()).unwrap();
    }

    /// A supervisor over a fresh data directory with base `micro` (1 MiB) staged, whose vmm
    /// does not exist.
    pub(crate) fn scratch_supervisor(
        name: &str,
        max_vms: u32,
        memory_mib: u64,
    ) -> (Arc<Supervisor>, Store, PathBuf) {
        let d = std::env::temp_dir().join(format!("agent-sup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let store = Store::open(&d.join("data")).unwrap();
        fake_base(&d.join("base"), 1, 'a');
        store.stage_base("micro", &d.join("base")).unwrap();
        let sup = Supervisor::new(
            SupervisorConfig {
                vmm: d.join("no-such-vmm"),
                host_ip: "127.0.0.1".parse().unwrap(),
                network: NetworkMode::User,
                max_vms,
                memory_mib,
                start_timeout: Duration::from_secs(2),
                warm: false,
                jail: false,
                cgroups: Arc::new(crate::cgroup::Cgroups::none()),
            },
            store.clone(),
            Arc::new(Metrics::default()),
        );
        (sup, store, d)
    }

    /// Puts a running instance whose "vmm" is this test process into the table.
    pub(crate) fn running(sup: &Supervisor) -> String {
        running_for(sup, "operator")
    }

    /// As [`running`], started by principal `owner`.
    pub(crate) fn running_for(sup: &Supervisor, owner: &str) -> String {
        let mut rec = sup.new_record("model", "micro", 1, State::Running).unwrap();
        rec.info.owner = Some(owner.into());
        rec.info.pid = Some(std::process::id());
        rec.info.endpoint = "127.0.0.1:1".into();
        sup.reserve(&rec, "model").unwrap();
        sup.save(&rec);
        rec.info.id
    }

    /// As [`running_for`], with a real process standing for its vmm (a `sleep`, adopted:
    /// stopping it kills that process); the caller reaps the child.
    pub(crate) fn running_process(sup: &Supervisor, owner: &str) -> (String, std::process::Child) {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let mut rec = sup.new_record("model", "micro", 1, State::Running).unwrap();
        rec.info.owner = Some(owner.into());
        rec.info.pid = Some(child.id());
        rec.info.adopted = true;
        rec.info.endpoint = "127.0.0.1:1".into();
        sup.reserve(&rec, "model").unwrap();
        sup.save(&rec);
        (rec.info.id, child)
    }

    fn state(sup: &Supervisor, id: &str) -> State {
        sup.get(id).unwrap().info.state
    }

    #[tokio::test]
    async fn a_handoff_moves_the_instance_or_leaves_it_running() {
        let (sup, _store, d) = scratch_supervisor("handoff", 4, 1024);
        let id = running(&sup);
        assert!(matches!(
            sup.begin_handoff("i-nope", "http://x:1"),
            Err(SupervisorError::NoInstance(_))
        ));
        let r = sup.begin_handoff(&id, "http://10.0.0.2:9999").unwrap();
        assert_eq!(r.info.state, State::HandingOff);
        assert_eq!(r.info.handoff.as_ref().unwrap().phase, "connecting");
        // One handoff at a time, and no stop in the middle of one; it holds its slot.
        assert!(matches!(
            sup.begin_handoff(&id, "http://10.0.0.3:9999"),
            Err(SupervisorError::Conflict(_, "handing_off", _))
        ));
        assert!(matches!(
            sup.stop(&id).await,
            Err(SupervisorError::Conflict(..))
        ));
        assert_eq!(sup.usage(), (1, 1));
        sup.handoff_progress(
            &id,
            &HandoffProgress {
                phase: HandoffPhase::Rounds,
                round: 2,
                bytes: 5000,
                dirty_pages: 7,
                bandwidth_bps: 1_000_000,
            },
        );
        let h = sup.get(&id).unwrap().info.handoff.unwrap();
        assert_eq!(
            (
                h.phase.as_str(),
                h.round,
                h.bytes,
                h.dirty_pages,
                h.bandwidth_bps
            ),
            ("rounds", 2, 5000, 7, 1_000_000)
        );
        // A failure while the vmm lives: running again, the error shown.
        let r = sup.handoff_failed(&id, "link cut").unwrap();
        assert_eq!(r.info.state, State::Running);
        let h = r.info.handoff.unwrap();
        assert_eq!(
            (h.phase.as_str(), h.error.as_deref()),
            ("failed", Some("link cut"))
        );
        assert!(r.info.error.is_none());
        // Progress after the end changes nothing.
        sup.handoff_progress(
            &id,
            &HandoffProgress {
                phase: HandoffPhase::Delta,
                round: 0,
                bytes: 1,
                dirty_pages: 0,
                bandwidth_bps: 0,
            },
        );
        assert_eq!(sup.get(&id).unwrap().info.handoff.unwrap().phase, "failed");

        // Success, with the source vmm's exit seen first: moved, not failed; slot freed.
        sup.begin_handoff(&id, "http://10.0.0.2:9999").unwrap();
        sup.finished(&id, "exit status 0".into());
        assert_eq!(state(&sup, &id), State::HandingOff);
        let stats = HandoffStats {
            rounds: 3,
            bytes: 1 << 20,
            downtime_us: 4200,
            total_us: 900_000,
            ..Default::default()
        };
        let moved = MovedTo {
            agent: "http://10.0.0.2:9999".into(),
            instance: "i-0000beef".into(),
            url: "http://10.0.0.2:9999/v1/instances/i-0000beef".into(),
            endpoint: Some("10.0.0.2:40000".into()),
        };
        let r = sup.handoff_succeeded(&id, &stats, moved.clone()).unwrap();
        assert_eq!(r.info.state, State::Moved);
        assert_eq!(r.info.moved_to, Some(moved));
        assert_eq!(r.info.pid, None);
        let h = r.info.handoff.unwrap();
        assert_eq!(
            (h.phase.as_str(), h.round, h.downtime_ms),
            ("done", 3, Some(4.2))
        );
        assert_eq!(sup.usage(), (0, 0));
        sup.finished(&id, "exit status 0".into());
        assert_eq!(
            state(&sup, &id),
            State::Moved,
            "the vmm's exit does not fail it"
        );
        // The record on disk says the same (a restarted agent shows it moved).
        let disk: InstanceRecord =
            serde_json::from_str(&std::fs::read_to_string(sup.record_path(&id)).unwrap()).unwrap();
        assert_eq!(disk.info.state, State::Moved);
        assert!(!State::Moved.active() && State::Receiving.active());

        // A failure after the vmm died: failed.
        let id2 = running(&sup);
        sup.begin_handoff(&id2, "http://10.0.0.2:9999").unwrap();
        sup.finished(&id2, "killed by signal 9".into());
        let r = sup
            .handoff_failed(&id2, "the vmm's control socket failed")
            .unwrap();
        assert_eq!(r.info.state, State::Failed);
        assert!(r.info.error.unwrap().contains("during a handoff"));
        let m = sup.metrics.render(&[], &[]);
        assert!(
            m.contains("cloudlet_handoffs_total{role=\"source\",outcome=\"failed\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("cloudlet_handoffs_total{role=\"source\",outcome=\"moved\"} 1"),
            "{m}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_receiver_that_does_not_come_up_leaves_nothing() {
        let (sup, store, d) = scratch_supervisor("receive", 1, 1024);
        let e = sup
            .receive("model", "micro", "0123456789ab")
            .await
            .unwrap_err();
        assert!(
            matches!(e, SupervisorError::ReceiveFailed(StartError::Spawn(..))),
            "{e:?}"
        );
        assert!(sup.list().is_empty());
        assert_eq!(
            std::fs::read_dir(store.instances_dir()).unwrap().count(),
            0,
            "no record, no directory"
        );
        assert!(matches!(
            sup.receive("model", "nope", "0123456789ab").await,
            Err(SupervisorError::Store(StoreError::NoBase(_)))
        ));
        // Full: the one slot is taken.
        let r = running(&sup);
        // Only a reception can be aborted, and only by the appliance it comes from.
        assert!(matches!(
            sup.abort_receive(&r, None).await,
            Err(SupervisorError::Conflict(_, "running", _))
        ));
        sup.update(&r, |e| {
            e.rec.info.received_from = Some("0123456789ab".into())
        });
        assert!(matches!(
            sup.abort_receive(&r, Some("ba9876543210")).await,
            Err(SupervisorError::NoInstance(_))
        ));
        assert!(matches!(
            sup.receive("model", "micro", "0123456789ab").await,
            Err(SupervisorError::Full(_))
        ));
        assert_eq!(std::fs::read_dir(store.instances_dir()).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_restart_drops_unfinished_receptions_and_readopts_a_source() {
        let (sup, store, d) = scratch_supervisor("recover", 4, 1024);
        let mut rec = sup
            .new_record("model", "micro", 1, State::Receiving)
            .unwrap();
        std::fs::create_dir_all(store.instances_dir().join(&rec.info.id)).unwrap();
        std::fs::write(
            store.instances_dir().join(&rec.info.id).join("vmm.log"),
            b"x",
        )
        .unwrap();
        sup.save(&rec);
        // A source whose vmm is gone: failed, with the handoff marked failed.
        rec = sup
            .new_record("model", "micro", 1, State::HandingOff)
            .unwrap();
        rec.info.handoff = Some(HandoffInfo::new("http://10.0.0.2:1"));
        sup.save(&rec);
        let again = Supervisor::new(sup.cfg.clone(), store.clone(), Arc::new(Metrics::default()));
        again.recover().await;
        let v = again.list();
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].info.id, rec.info.id);
        assert_eq!(v[0].info.state, State::Failed);
        assert_eq!(v[0].info.handoff.as_ref().unwrap().phase, "failed");
        assert_eq!(std::fs::read_dir(store.instances_dir()).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
