//! Warm standbys: for each service started here, one VM synthesised ahead of need, checked
//! with one verified request and left idle, so that the next start of that service is only
//! a hand-out rather than a spawn and a synthesis (see `Supervisor::start`).
//!
//! ```text
//!   start of S ──▶ a live standby of S made from S's current overlay? ──yes──▶ Running (no VM work)
//!        │                                            no (none, stale, or dead) ──▶ spawn + synthesise
//!        └──▶ afterwards, in the background: `vmm ram-image` (S's shared RAM image, once), then
//!             `vmm synthesize` for S ──Ready──▶ one `health` ──▶ standby (idle, waiting)
//! ```
//!
//! A standby is a `vmm synthesize` whose instance id, directory, control socket and port
//! forward are already chosen; it is not an instance (not listed, no record) until a start
//! takes it, but it holds a slot of the board's limits like one. It is handed out only once
//! its guest answered `health`, so the guest's first run (its first touches of memory, which
//! cost most under shadow paging) is off the start's path; nothing else reaches it before its
//! client, so every instance still starts from the service's own snapshot but for that one
//! stateless request. Its directory holds [`PID_FILE`], so that an agent restarted after a
//! crash kills it and removes the directory: standbys are never re-adopted (one is cheap to
//! make again).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use crate::supervisor::InstanceRecord;

/// In a standby's directory: its vmm's process id.
pub const PID_FILE: &str = "standby.pid";

/// A synthesised, paused VM of one service.
pub struct Standby {
    /// Its future instance record (id, files); state and times are set when taken.
    pub rec: InstanceRecord,
    /// The overlay it was made from (a replaced service's standby is stale).
    pub overlay_sha256: String,
    /// Its vmm.
    pub child: crate::supervisor::VmmChild,
    /// Our end of its report channel (Ready already read).
    pub report: tokio::net::UnixStream,
    /// Where its guest's service will answer, and the synthesis time, ms.
    pub ready: (SocketAddr, Option<f64>),
    /// Its spawn → first verified reply (`ok health`), ms.
    pub answered_ms: f64,
}

/// The standbys of one supervisor, by service, and the services whose standby is being made.
#[derive(Default)]
pub struct Pool {
    ready: BTreeMap<String, Standby>,
    /// Service → (guest memory of the standby being made, MiB; still wanted).
    making: BTreeMap<String, (u64, bool)>,
    /// No standby is made any more (the agent is exiting).
    closed: bool,
    /// Service → the overlay file (SHA-256, inode, change time) whose shared RAM image was
    /// last written or found up to date.
    imaged: BTreeMap<String, String>,
}

impl Pool {
    /// Takes the standby of `service`.
    pub fn take(&mut self, service: &str) -> Option<Standby> {
        self.ready.remove(service)
    }

    /// Claims the making of a standby of `service` needing `mem_mib`: false when it has one,
    /// one is being made, or the pool is closed.
    pub fn begin(&mut self, service: &str, mem_mib: u64) -> bool {
        if self.closed || self.ready.contains_key(service) || self.making.contains_key(service) {
            return false;
        }
        self.making.insert(service.to_string(), (mem_mib, true));
        true
    }

    /// The making of the standby of `service` ended with `made`; returns it back when it is no
    /// longer wanted (to be discarded).
    pub fn end(&mut self, service: &str, made: Option<Standby>) -> Option<Standby> {
        let wanted = self.making.remove(service).is_some_and(|(_, w)| w);
        match made {
            Some(s) if wanted && !self.closed => {
                self.ready.insert(service.to_string(), s);
                None
            }
            other => other,
        }
    }

    /// Takes the standbys of `service` (of every service: `None`) out of the pool; one being
    /// made is discarded when done.
    pub fn drain(&mut self, service: Option<&str>) -> Vec<Standby> {
        for (s, m) in self.making.iter_mut() {
            if service.is_none_or(|x| x == s) {
                m.1 = false;
            }
        }
        match service {
            Some(s) => self.ready.remove(s).into_iter().collect(),
            None => std::mem::take(&mut self.ready).into_values().collect(),
        }
    }

    /// Makes no standby any more.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Whether a wanted standby of `service` is being made.
    pub fn wanted(&self, service: &str) -> bool {
        self.making.get(service).is_some_and(|m| m.1)
    }

    /// How many standbys are being made.
    pub fn in_making(&self) -> usize {
        self.making.len()
    }

    /// Standbys made or being made, and their guest memory, MiB (they hold slots of the
    /// board's limits).
    pub fn usage(&self) -> (u32, u64) {
        let ready = self.ready.values().map(|s| s.rec.info.mem_mib);
        let making = self.making.values().map(|m| m.0);
        ready
            .chain(making)
            .fold((0, 0), |(n, m), mib| (n + 1, m + mib))
    }

    /// The overlay file (see [`Pool::set_imaged`]) whose shared RAM image `service` last had
    /// ensured.
    pub fn imaged(&self, service: &str) -> Option<&str> {
        self.imaged.get(service).map(String::as_str)
    }

    /// `service`'s shared RAM image is up to date for the overlay file `key` (its SHA-256,
    /// inode and change time).
    pub fn set_imaged(&mut self, service: &str, key: &str) {
        self.imaged.insert(service.into(), key.into());
    }

    /// The services with a standby made.
    pub fn services(&self) -> BTreeSet<String> {
        self.ready.keys().cloned().collect()
    }
}

/// Ends a standby: kills its vmm and removes its directory.
pub async fn discard(mut s: Standby) {
    let _ = s.child.start_kill();
    let _ = s.child.wait().await;
    if let Some(dir) = s.rec.api_sock.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// After an agent restart: kills the standbys a previous agent left (directories of
/// `instances` holding [`PID_FILE`] and no record) with `kill(pid, sock)` and removes them.
pub fn remove_orphans(instances: &Path, kill: impl Fn(u32, &Path)) {
    let Ok(rd) = std::fs::read_dir(instances) else {
        return;
    };
    for e in rd.flatten() {
        let dir = e.path();
        let pid_file = dir.join(PID_FILE);
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        if dir.with_extension("json").exists() {
            continue;
        }
        if let Ok(pid) = text.trim().parse::<u32>() {
            kill(pid, &dir.join("vm.sock"));
        }
        let _ = std::fs::remove_dir_all(&dir);
        tracing::info!(
            "removed a warm standby left by a previous agent: {}",
            dir.display()
        );
    }
}
