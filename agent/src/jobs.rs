//! Background builds of service versions on the appliance: the customisation `image-builder
//! overlay --script` runs (restore the base, run console commands, snapshot, diff, compress),
//! as a child process whose typed progress stream (`format::progress`) the job follows; the
//! agent never links the builder (or the vmm).
//!
//! ```text
//!   POST /v1/services/{name}/build ──▶ Job{running} ──spawn──▶ image-builder overlay --progress json
//!        │                                  ▲ step, command i/n (from its stdout, line by line)
//!        └─▶ 202 {job}                      │
//!   done ──▶ Store::install_version: verified (every chunk, a staged base), not yet current
//!        ──▶ trial: one VM synthesised from it answers a verified `health` ──▶ current version
//!   failed (a refused command, a dead builder, a bad overlay, a trial VM that does not
//!   answer) ──▶ Job{failed, error}, the new version removed: the catalogue as it was (an
//!   edited service keeps its current version)
//! ```
//!
//! Each job is kept as `DATA/jobs/ID.json` (rewritten at each step), so builds outlive an
//! agent restart honestly: a job found `running` at start was cut short — it is marked
//! failed ("the agent restarted during the build"), the version it was trying is removed
//! (the previous one stays current), and finished jobs stay listable ([`KEPT`] of them, for
//! [`KEPT_SECS`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use format::progress::Step;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::store::{error_chain, hide_paths, unix_now, Store};

/// Jobs kept (the oldest finished ones are forgotten beyond this).
pub const KEPT: usize = 64;
/// How long a finished job stays listable across restarts, seconds (a week).
pub const KEPT_SECS: u64 = 7 * 24 * 3600;

/// A build as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// `j-` and 8 hex digits.
    pub id: String,
    /// The service it makes (`create`) or the next version of (`edit`).
    pub service: String,
    /// `create` or `edit`.
    pub kind: String,
    /// The base it customises.
    pub base: String,
    /// The console commands.
    pub script: String,
    /// The files placed on the guest's disk before the commands.
    #[serde(default)]
    pub files: Vec<JobFile>,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The step under way or last done (`starting`, `restore`, `command`, `snapshot`,
    /// `diff`, `verify`, `done`, `failed`).
    pub step: String,
    /// Commands run so far, and in the script.
    pub commands_done: u32,
    /// Commands in the script.
    pub commands_total: u32,
    /// 0-100.
    pub percent: u32,
    /// The guest's replies, one per command run.
    pub replies: Vec<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The version it installed.
    pub version: Option<u32>,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// How long it took, ms, once ended.
    pub took_ms: Option<f64>,
    /// The trial of the new version: its VM's spawn → first verified reply, ms.
    #[serde(default)]
    pub trial_ms: Option<f64>,
    /// The version installed and being tried (not yet current), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trying: Option<u32>,
}

/// A file a build places: where, its size and SHA-256.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobFile {
    /// `/dev/vda@OFFSET` (`format::disk_file`).
    pub path: String,
    /// Its length.
    pub bytes: u64,
    /// Hex SHA-256 of its content.
    pub sha256: String,
    /// Whether it is on the guest's disk yet.
    #[serde(default)]
    pub placed: bool,
}

/// Why a build does not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The service is being built already (by this job).
    #[error("being built already (job {0})")]
    Busy(String),
    /// The board has no slot for the build's VM.
    #[error("no capacity: {0}")]
    Full(String),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    /// Service name.
    pub service: String,
    /// Base name.
    pub base: String,
    /// Console commands (`,`-separated, `:` between words).
    pub script: String,
    /// Files to place on the guest's disk: (`/dev/vda@OFFSET`, content), checked.
    pub files: Vec<(String, Vec<u8>)>,
    /// Description (a new service's, or a new one for an edited service).
    pub description: Option<String>,
    /// Whether the service exists (`edit`).
    pub edit: bool,
}

/// The jobs of one agent.
pub struct Jobs {
    builder: PathBuf,
    store: Store,
    sup: Arc<crate::supervisor::Supervisor>,
    table: Mutex<BTreeMap<String, Job>>,
}

impl Jobs {
    /// Jobs running `builder` (the `image-builder` binary) on `sup`'s store; `sup` tries each
    /// new version out before it becomes current.
    pub fn new(builder: PathBuf, sup: Arc<crate::supervisor::Supervisor>) -> Arc<Jobs> {
        let store = sup.store().clone();
        let table = recover(&store);
        Arc::new(Jobs {
            builder,
            store,
            sup,
            table: Mutex::new(table),
        })
    }

    /// Writes job `j`'s record (`DATA/jobs/ID.json`); a failure is logged, the job goes on.
    fn persist(&self, j: &Job) {
        if let Err(e) = save(&self.store, j) {
            tracing::warn!(job = %j.id, "cannot keep the job's record: {e}");
        }
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<Job> {
        let mut v: Vec<Job> = self.table.lock().expect("jobs").values().cloned().collect();
        v.sort_by(|a, b| b.started_unix.cmp(&a.started_unix).then(b.id.cmp(&a.id)));
        v
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<Job> {
        self.table.lock().expect("jobs").get(id).cloned()
    }

    /// A running job of `service`, if any.
    pub fn running_for(&self, service: &str) -> Option<Job> {
        self.table
            .lock()
            .expect("jobs")
            .values()
            .find(|j| j.service == service && j.state == "running")
            .cloned()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        let now = {
            let mut t = self.table.lock().expect("jobs");
            let Some(j) = t.get_mut(id) else {
                return;
            };
            f(j);
            j.clone()
        };
        self.persist(&now);
    }

    /// Starts building `spec` in the background, its VMs (`mem_mib` of guest RAM) in a slot
    /// of the board taken now; returns the job (`running`), or why it cannot start.
    pub fn start(self: &Arc<Self>, spec: BuildSpec, mem_mib: u64) -> Result<Job, StartError> {
        let total = spec
            .script
            .split(',')
            .filter(|c| !c.trim().is_empty())
            .count() as u32;
        let job = Job {
            id: format!("j-{}", crate::store::new_id(4)),
            service: spec.service.clone(),
            kind: if spec.edit { "edit" } else { "create" }.into(),
            base: spec.base.clone(),
            script: spec.script.clone(),
            files: spec
                .files
                .iter()
                .map(|(path, data)| {
                    use sha2::Digest;
                    JobFile {
                        path: path.clone(),
                        bytes: data.len() as u64,
                        sha256: format!("{:x}", sha2::Sha256::digest(data)),
                        placed: false,
                    }
                })
                .collect(),
            state: "running".into(),
            step: "starting".into(),
            commands_done: 0,
            commands_total: total,
            percent: 0,
            replies: Vec::new(),
            error: None,
            version: None,
            started_unix: unix_now(),
            took_ms: None,
            trial_ms: None,
            trying: None,
        };
        let slot = {
            let mut t = self.table.lock().expect("jobs");
            if let Some(j) = t
                .values()
                .find(|j| j.service == spec.service && j.state == "running")
            {
                return Err(StartError::Busy(j.id.clone()));
            }
            if t.len() >= KEPT {
                let old = t
                    .values()
                    .filter(|j| j.state != "running")
                    .min_by_key(|j| j.started_unix)
                    .map(|j| j.id.clone());
                if let Some(o) = old {
                    t.remove(&o);
                    let _ = std::fs::remove_file(job_path(&self.store, &o));
                }
            }
            // The slot is taken under the jobs' lock, so a refused build leaves no job.
            let slot = self
                .sup
                .reserve_build(&job.id, mem_mib)
                .map_err(|e| match e {
                    crate::supervisor::SupervisorError::Full(why) => StartError::Full(why),
                    other => StartError::Full(other.to_string()),
                })?;
            t.insert(job.id.clone(), job.clone());
            slot
        };
        self.persist(&job);
        let me = Arc::clone(self);
        let id = job.id.clone();
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let r = me.run(&id, &spec).await;
            drop(slot);
            let ms = (t0.elapsed().as_secs_f64() * 1e4).round() / 10.0;
            let audit = crate::audit::Audit::in_dir(me.store.root());
            match r {
                Ok(version) => {
                    tracing::info!(job = %id, service = %spec.service, version, "build done");
                    audit.record(
                        "service.built",
                        serde_json::json!({"job": id, "service": spec.service, "version": version, "ms": ms}),
                    );
                    me.update(&id, |j| {
                        j.trying = None;
                        j.state = "done".into();
                        j.step = "done".into();
                        j.percent = 100;
                        j.version = Some(version);
                        j.took_ms = Some(ms);
                    });
                }
                Err(e) => {
                    tracing::warn!(job = %id, service = %spec.service, "build failed: {e}");
                    let shown = hide_paths(&e);
                    audit.record(
                        "service.build_failed",
                        serde_json::json!({"job": id, "service": spec.service, "reason": shown}),
                    );
                    me.update(&id, |j| {
                        j.trying = None;
                        j.state = "failed".into();
                        j.step = "failed".into();
                        j.error = Some(shown);
                        j.took_ms = Some(ms);
                    });
                }
            }
        });
        Ok(job)
    }

    /// Runs the builder for job `id`, follows its progress, installs the overlay; the
    /// version installed.
    async fn run(&self, id: &str, spec: &BuildSpec) -> Result<u32, String> {
        let out = self.store.tmp_path("build").with_extension("overlay");
        let snap = self.store.tmp_path("build-snapshot");
        let r = self.build(id, spec, &out, &snap).await;
        let _ = tokio::fs::remove_dir_all(&snap).await;
        let r = match r {
            Ok(()) => self.install(id, spec, &out).await,
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&out).await;
        r
    }

    /// Installs the built overlay `out` as the service's next version, tries it, and makes it
    /// current; removes it (the service, when new) when the trial fails.
    async fn install(
        &self,
        id: &str,
        spec: &BuildSpec,
        out: &std::path::Path,
    ) -> Result<u32, String> {
        self.update(id, |j| {
            j.step = "verify".into();
            j.percent = 90;
        });
        let (store, spec2, out2) = (self.store.clone(), spec.clone(), out.to_path_buf());
        let mut note = format!("customised on {}: {}", spec.base, spec.script);
        for (path, data) in &spec.files {
            note.push_str(&format!("; file {path} ({} bytes)", data.len()));
        }
        let (rec, v) = tokio::task::spawn_blocking(move || {
            // An edited service's description changes with its version, after the trial.
            let description = if spec2.edit {
                None
            } else {
                spec2.description.as_deref()
            };
            store.install_version(
                &spec2.service,
                &out2,
                description,
                false,
                &note,
                !spec2.edit,
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| error_chain(&e))?;
        let version = v.version;
        let trial = rec.at_version(&v);
        self.update(id, |j| {
            j.step = "trial".into();
            j.percent = 95;
            j.trying = Some(version);
        });
        match self.sup.trial(&trial).await {
            Ok(ms) => {
                self.update(id, |j| j.trial_ms = Some((ms * 100.0).round() / 100.0));
                if spec.edit {
                    self.store
                        .set_current(&spec.service, version)
                        .map_err(|e| error_chain(&e))?;
                    if let Some(d) = &spec.description {
                        self.store
                            .set_description(&spec.service, d)
                            .map_err(|e| error_chain(&e))?;
                    }
                    self.sup.drop_standbys(Some(&spec.service)).await;
                }
                Ok(version)
            }
            Err(why) => {
                let undo = if spec.edit {
                    self.store.remove_version(&spec.service, version)
                } else {
                    self.store.remove_service(&spec.service)
                };
                if let Err(e) = undo {
                    tracing::warn!(
                        job = id,
                        "cannot remove the version that failed its trial: {}",
                        error_chain(&e)
                    );
                }
                Err(format!(
                    "version {version} was built but its trial VM did not answer: {why}; it was removed"
                ))
            }
        }
    }

    async fn build(
        &self,
        id: &str,
        spec: &BuildSpec,
        out: &std::path::Path,
        snap: &std::path::Path,
    ) -> Result<(), String> {
        let mut file_args = Vec::new();
        for (i, (path, data)) in spec.files.iter().enumerate() {
            let host = snap.with_extension(format!("file{i}"));
            tokio::fs::write(&host, data)
                .await
                .map_err(|e| format!("cannot stage file {path}: {e}"))?;
            file_args.push(format!("--file={path}={}", host.display()));
        }
        let r = self.run_builder(id, spec, out, snap, &file_args).await;
        for i in 0..spec.files.len() {
            let _ = tokio::fs::remove_file(snap.with_extension(format!("file{i}"))).await;
        }
        r
    }

    async fn run_builder(
        &self,
        id: &str,
        spec: &BuildSpec,
        out: &std::path::Path,
        snap: &std::path::Path,
        file_args: &[String],
    ) -> Result<(), String> {
        let mut child = tokio::process::Command::new(&self.builder)
            .arg("overlay")
            .arg("--base")
            .arg(self.store.base_dir(&spec.base))
            .arg(format!("--script={}", spec.script))
            .args(file_args)
            .arg("--keep-snapshot")
            .arg(snap)
            .arg("--out")
            .arg(out)
            .args(["--progress", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.builder.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let errs = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut lines = BufReader::new(stdout).lines();
        let mut last: Option<Step> = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let step = match Step::parse(&line) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(job = id, "builder said {line:?}: {e}");
                    continue;
                }
            };
            self.update(id, |j| apply(j, &step));
            last = Some(step);
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        let stderr = errs.await.unwrap_or_default();
        match last {
            Some(Step::Done { .. }) if status.success() => Ok(()),
            Some(Step::Failed { error }) => Err(error),
            _ => Err(format!(
                "image-builder ended ({}) without finishing: {}",
                crate::supervisor::describe_exit(status),
                stderr.trim().lines().last().unwrap_or("no output")
            )),
        }
    }
}

/// `DATA/jobs/ID.json`.
fn job_path(store: &Store, id: &str) -> PathBuf {
    store.root().join("jobs").join(format!("{id}.json"))
}

/// Writes `j`'s record through a temporary file and a rename.
fn save(store: &Store, j: &Job) -> std::io::Result<()> {
    let path = job_path(store, &j.id);
    std::fs::create_dir_all(path.parent().expect("jobs/"))?;
    let tmp = path.with_extension("json.new");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(j).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// The jobs kept in `DATA/jobs/` at an agent's start: the newest [`KEPT`] younger than
/// [`KEPT_SECS`] (the rest are deleted); one still `running` was cut short by the restart:
/// it is marked failed, and the version it was trying removed (a new service with it), so
/// the previous version stays current.
fn recover(store: &Store) -> BTreeMap<String, Job> {
    let dir = store.root().join("jobs");
    let mut jobs: Vec<Job> = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            // A record half-written when the agent died.
            let _ = std::fs::remove_file(&p);
            continue;
        }
        match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Job>(&b).map_err(|e| e.to_string()))
        {
            Ok(j) if j.id.len() <= 64 && p.file_stem().is_some_and(|s| *s == *j.id) => jobs.push(j),
            Ok(_) | Err(_) => {
                tracing::warn!(file = %p.display(), "an unreadable job record: removed");
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    jobs.sort_by(|a, b| b.started_unix.cmp(&a.started_unix).then(b.id.cmp(&a.id)));
    let now = unix_now();
    let mut table = BTreeMap::new();
    for (n, mut j) in jobs.into_iter().enumerate() {
        if n >= KEPT || now.saturating_sub(j.started_unix) > KEPT_SECS {
            let _ = std::fs::remove_file(job_path(store, &j.id));
            continue;
        }
        if j.state == "running" {
            cut_short(store, &mut j);
            if let Err(e) = save(store, &j) {
                tracing::warn!(job = %j.id, "cannot keep the job's record: {e}");
            }
        }
        table.insert(j.id.clone(), j);
    }
    table
}

/// Marks job `j`, found running at start, failed, and removes what it left half-made.
fn cut_short(store: &Store, j: &mut Job) {
    let mut error = format!(
        "the agent restarted during the build (at step '{}'); nothing it made was kept",
        j.step
    );
    if let Some(v) = j.trying.take() {
        let undo = if j.kind == "edit" {
            store.remove_version(&j.service, v)
        } else {
            store.remove_service(&j.service)
        };
        if let Err(e) = undo {
            error.push_str(&format!(
                " (but version {v} could not be removed: {})",
                error_chain(&e)
            ));
        }
    }
    match store.service(&j.service) {
        Ok(s) if j.kind == "edit" => {
            error.push_str(&format!("; version {} is still current", s.version))
        }
        _ => error.push_str(&format!("; service '{}' was not made", j.service)),
    }
    tracing::warn!(job = %j.id, service = %j.service, "{error}");
    crate::audit::Audit::in_dir(store.root()).record(
        "service.build_failed",
        serde_json::json!({"job": j.id, "service": j.service, "reason": error}),
    );
    j.state = "failed".into();
    j.step = "failed".into();
    j.error = Some(error);
}

/// What a progress step does to a job.
fn apply(j: &mut Job, s: &Step) {
    let n = j.commands_total.max(1);
    match s {
        Step::File { index, .. } => {
            j.step = "file".into();
            if let Some(f) = index
                .checked_sub(1)
                .and_then(|i| j.files.get_mut(i as usize))
            {
                f.placed = true;
            }
            j.percent = 2;
        }
        Step::Restore => {
            j.step = "restore".into();
            j.percent = 5;
        }
        Step::Command {
            index,
            total,
            line,
            reply,
        } => {
            j.step = "command".into();
            j.commands_done = *index;
            j.commands_total = *total;
            j.replies.push(format!("{line} → {reply}"));
            j.percent = 10 + 60 * index / (*total).max(1);
        }
        Step::Snapshot => {
            j.step = "snapshot".into();
            j.percent = 10 + 60 * j.commands_done / n + 5;
        }
        Step::Diff => {
            j.step = "diff".into();
            j.percent = 80;
        }
        Step::Done { .. } => {
            j.step = "verify".into();
            j.percent = 90;
        }
        Step::Failed { .. } => {
            j.step = "failed".into();
        }
    }
}
