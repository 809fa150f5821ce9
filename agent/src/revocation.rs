//! What a device's credential ending does to what it runs: its instances are stopped.
//!
//! A revoked device must not keep using the appliance through instances it started before
//! (their endpoints need no credential), and an expired one has no one left to stop them. So:
//!
//! - `DELETE /v1/devices/{id}` stops the device's running instances at once and says which
//!   ([`stop_device_instances`]); `cloudlet revoke` prints how many.
//! - Every [`SWEEP_EVERY`] the daemon stops the instances of every device that is no longer
//!   active ([`sweep`]): expired, revoked by `agent revoke` (which only edits the data
//!   directory), or no longer paired.
//!
//! Each stop is an audit event `device.instances_stopped` (the device, why, the instances).
//! Stopped instances stay listed (state `stopped`) for the operator until deleted. An
//! instance in the middle of a handoff cannot be stopped; the next sweep tries again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::devices::DeviceStore;
use crate::store::error_chain;
use crate::supervisor::Supervisor;

/// How often the daemon looks for instances of devices no longer active.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The principal name of device `id`, as instances record their owner.
pub fn principal(device: &str) -> String {
    format!("device:{device}")
}

/// Stops every active instance device `device` started, records it in the audit log with
/// `why` (`revoked`, `expired`, `unpaired`) and returns the ids stopped.
pub async fn stop_device_instances(
    sup: &Arc<Supervisor>,
    devices: &DeviceStore,
    device: &str,
    why: &str,
) -> Vec<String> {
    let owner = principal(device);
    let ids: Vec<String> = sup
        .list()
        .into_iter()
        .filter(|r| r.info.state.active() && r.info.owner.as_deref() == Some(owner.as_str()))
        .map(|r| r.info.id)
        .collect();
    let mut stopped = Vec::new();
    for id in ids {
        match sup.stop(&id).await {
            Ok(_) => stopped.push(id),
            Err(e) => {
                tracing::warn!(instance = %id, device, "cannot stop the instance of a {why} device yet: {}", error_chain(&e))
            }
        }
    }
    if !stopped.is_empty() {
        devices.audit().record(
            "device.instances_stopped",
            json!({ "device": device, "why": why, "instances": stopped, "count": stopped.len() }),
        );
    }
    stopped
}

/// Stops the instances of every device that is not active any more; returns, per device,
/// the instances stopped.
pub async fn sweep(sup: &Arc<Supervisor>, devices: &DeviceStore) -> BTreeMap<String, Vec<String>> {
    let owners: Vec<String> = sup
        .list()
        .into_iter()
        .filter(|r| r.info.state.active())
        .filter_map(|r| r.info.owner?.strip_prefix("device:").map(str::to_string))
        .collect();
    let mut out = BTreeMap::new();
    if owners.is_empty() {
        return out;
    }
    let d = devices.clone();
    let Ok(Ok(list)) = tokio::task::spawn_blocking(move || d.list()).await else {
        // A damaged store authenticates no device either; its instances wait for a repair
        // (the operator sees the store's error in the log and the API).
        return out;
    };
    for owner in owners {
        if out.contains_key(&owner) {
            continue;
        }
        let why = match list.iter().find(|d| d.id == owner) {
            Some(d) if d.status == "active" => continue,
            Some(d) => d.status.clone(),
            None => "unpaired".into(),
        };
        let stopped = stop_device_instances(sup, devices, &owner, &why).await;
        out.insert(owner, stopped);
    }
    out
}

/// Runs [`sweep`] every [`SWEEP_EVERY`] until `stop` turns true.
pub async fn run(
    sup: Arc<Supervisor>,
    devices: DeviceStore,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        for (device, ids) in sweep(&sup, &devices).await {
            if !ids.is_empty() {
                tracing::info!(
                    device,
                    "stopped {} instance(s) of a device no longer trusted",
                    ids.len()
                );
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
