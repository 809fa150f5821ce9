//! The boot assessment (`cloudlet-update check-health`): the box is healthy once the agent on
//! it answers `GET /v1/system`, twice, a settle time apart, without restarting in between.
//! The agent's address comes from `DATA/api.url` (one URL per listen address, written at its
//! start); an
//! `https://` address is asked with the appliance's own certificate (`DATA/tls/cert.der`)
//! pinned, as `cloudlet info --fingerprint` would. It fails early when systemd says the agent
//! unit failed or restarted too often.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// Restarts of the agent unit at which the box is judged unhealthy.
pub const MAX_RESTARTS: u32 = 3;

/// What the check needs.
#[derive(Clone, Debug)]
pub struct HealthOptions {
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// How long to wait for an answer.
    pub timeout: Duration,
    /// The agent's systemd unit; `None` skips the unit check.
    pub unit: Option<String>,
    /// The `systemctl` to ask.
    pub systemctl: PathBuf,
    /// The boot time: an `api.url` older than this was written by an earlier boot's agent.
    pub since: Option<SystemTime>,
    /// How long the agent must stay up between the two answers that make the box healthy.
    pub settle: Duration,
}

/// Why the box is not healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The agent unit failed.
    #[error("the agent unit {unit} is {state} after {restarts} restarts")]
    UnitFailed {
        /// The unit.
        unit: String,
        /// Its ActiveState.
        state: String,
        /// Its NRestarts.
        restarts: u32,
    },
    /// No answer in time.
    #[error("no answer from the agent on GET /v1/system within {secs} s ({last})")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// What was seen last.
        last: String,
    },
}

/// A healthy agent.
#[derive(Clone, Debug)]
pub struct Healthy {
    /// The address that answered.
    pub url: String,
    /// The board it reported.
    pub board: String,
    /// Its version.
    pub version: String,
    /// Seconds the check took.
    pub secs: f64,
}

/// The agent unit's state and restart count (`systemctl show -p ActiveState,NRestarts`), or
/// `None` when systemd cannot be asked.
pub fn unit_state(systemctl: &Path, unit: &str) -> Option<(String, u32)> {
    let o = Command::new(systemctl)
        .args(["show", "-p", "ActiveState,NRestarts", unit])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let mut state = None;
    let mut restarts = 0;
    for l in text.lines() {
        if let Some(v) = l.strip_prefix("ActiveState=") {
            state = Some(v.trim().to_string());
        } else if let Some(v) = l.strip_prefix("NRestarts=") {
            restarts = v.trim().parse().unwrap_or(0);
        }
    }
    Some((state?, restarts))
}

/// One try: the agent's URL from `DATA/api.url` and its answer, or what is missing.
///
/// An `api.url` older than this boot is still tried: only a live agent answers, and on a box
/// without a real-time clock the clock may jump forward after the agent wrote it (`btime`
/// moves with it), so its time alone would fail a healthy boot. A failure says it was stale.
fn ask(opts: &HealthOptions) -> Result<Healthy, String> {
    let url_file = opts.data_dir.join("api.url");
    let meta = std::fs::metadata(&url_file)
        .map_err(|_| format!("{} not written yet", url_file.display()))?;
    let stale = match (opts.since, meta.modified()) {
        (Some(since), Ok(m)) if m < since => " (the address was written before this boot)",
        _ => "",
    };
    let text = std::fs::read_to_string(&url_file).map_err(|e| e.to_string())?;
    let urls: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    // Plain HTTP on loopback when the agent listens there, else its first HTTPS address.
    let url = urls
        .iter()
        .find(|u| u.starts_with("http://"))
        .or_else(|| urls.first())
        .ok_or_else(|| format!("{} is empty", url_file.display()))?;
    let client = if url.starts_with("https://") {
        let cert_file = opts.data_dir.join("tls/cert.der");
        let cert = std::fs::read(&cert_file)
            .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?;
        agent::client::Client::pinned(url, None, &agent::tls::fingerprint(&cert))
    } else {
        agent::client::Client::new(url, None)
    }
    .with_timeout(Duration::from_secs(5));
    let info = client.system().map_err(|e| format!("{e}{stale}"))?;
    Ok(Healthy {
        url: url.to_string(),
        board: info.board,
        version: info.version,
        secs: 0.0,
    })
}

/// The unit's restart count, or an error when it failed or restarted too often.
fn unit_ok(opts: &HealthOptions) -> Result<u32, HealthError> {
    let Some(unit) = &opts.unit else {
        return Ok(0);
    };
    let Some((state, restarts)) = unit_state(&opts.systemctl, unit) else {
        return Ok(0);
    };
    if state == "failed" || restarts >= MAX_RESTARTS {
        return Err(HealthError::UnitFailed {
            unit: unit.clone(),
            state,
            restarts,
        });
    }
    Ok(restarts)
}

/// Waits until the agent answers twice, `settle` apart, without its unit restarting in
/// between (healthy); fails when its unit fails or restarts [`MAX_RESTARTS`] times, or at the
/// timeout. The second answer keeps an agent that crashes soon after it starts from being
/// blessed.
pub fn check_health(opts: &HealthOptions) -> Result<Healthy, HealthError> {
    let t0 = Instant::now();
    let mut last = String::from("not asked yet");
    loop {
        let restarts = unit_ok(opts)?;
        match ask(opts) {
            Ok(first) if opts.settle.is_zero() => {
                return Ok(Healthy {
                    secs: t0.elapsed().as_secs_f64(),
                    ..first
                })
            }
            Ok(first) => {
                tracing::info!(
                    "the agent answered on {}; asking again in {} s",
                    first.url,
                    opts.settle.as_secs_f64()
                );
                std::thread::sleep(opts.settle);
                let again = unit_ok(opts)?;
                match ask(opts) {
                    Ok(h) if again == restarts => {
                        return Ok(Healthy {
                            secs: t0.elapsed().as_secs_f64(),
                            ..h
                        })
                    }
                    Ok(_) => {
                        last = format!("the agent restarted within {} s", opts.settle.as_secs_f64())
                    }
                    Err(why) => last = format!("answered once, then not: {why}"),
                }
                tracing::info!("agent not healthy yet: {last}");
            }
            Err(why) => {
                if why != last {
                    tracing::info!("agent not healthy yet: {why}");
                }
                last = why;
            }
        }
        if t0.elapsed() >= opts.timeout {
            return Err(HealthError::Timeout {
                secs: opts.timeout.as_secs(),
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
