//! `cargo xtask bench agent`: the appliance agent as a client sees it.
//!
//! - `api_start_to_reply_p50_ms` / `_p99_ms`: `POST /v1/instances` sent → 201 received →
//!   connect to the returned endpoint → first verified `query 5` reply (the 16 MiB-model
//!   sample service of `cargo xtask demo`); the instance is then deleted (not timed). Beside
//!   it the agent's own figures for the same starts: `synthesis_p50_ms` (vmm: checks → vCPUs
//!   running) and `spawn_to_health_p50_ms` (vmm spawn → `ok health`), and `stop_p50_ms`
//!   (`DELETE` round trip).
//! - `agent_idle_rss_mib`: the agent's resident memory after the runs, idle for 1 s, with
//!   discovery on (target ≤ 16).
//! - `discovery_resolve_ms`: median over fresh `cloudlet discover` processes of the time
//!   from the start of browsing to the appliance's resolved record (PTR → SRV/TXT/A). The
//!   runs are 1.5 s apart: a responder multicasts a record at most once a second (RFC 6762
//!   §6), so back-to-back browsers would measure that rate limit, not discovery.
//! - `pairing_ms` (median) / `pairing_p99_ms`: a USB pairing against the fake phone of
//!   `usb-aoa` — AOA handshake at control level, re-enumeration, bulk claim, Challenge →
//!   Hello → Welcome with a credential issued — from the phone's arrival to the Welcome in
//!   its hands (`agent/examples/pairing_bench.rs`, release build; the fake re-enumerates at
//!   once, so this is the appliance's own cost).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::stats::{median, percentile};
use crate::demo::{api, discover, model_entry, prepare, Agent, Guest};
use crate::util::{cargo, require_kvm, step, target_dir};

/// Runs the benchmark; returns the named figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    if runs < 20 {
        bail!("bench agent needs --runs of at least 20 (it reports a p99)");
    }
    let work = target_dir().join("bench/agent-work");
    let p = prepare(&work)?;
    let mut agent = Agent::start(&p, &work.join("data"), &work.join("agent.log"))?;
    let addr = agent.addr.clone();
    let want = format!("ok query i=5 value={}", model_entry(5));

    step(&format!(
        "{runs} starts: POST /v1/instances → first verified reply"
    ));
    let (mut total, mut synth, mut health, mut stop) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t0 = Instant::now();
        let inst = api(
            &addr,
            "POST",
            "/v1/instances",
            Some(r#"{"service":"model"}"#),
        )?;
        let endpoint = inst["endpoint"].as_str().context("no endpoint")?;
        let mut g = Guest::connect(endpoint)?;
        g.expect("query 5", &want)?;
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(g);
        synth.push(inst["synthesis_ms"].as_f64().unwrap_or(f64::NAN));
        health.push(inst["first_reply_ms"].as_f64().unwrap_or(f64::NAN));
        let id = inst["id"].as_str().context("no id")?;
        let t = Instant::now();
        api(&addr, "DELETE", &format!("/v1/instances/{id}"), None)?;
        stop.push(t.elapsed().as_secs_f64() * 1e3);
    }

    step("discovery: fresh `cloudlet discover` processes until the record resolves");
    let mut resolve = vec![];
    for _ in 0..runs.min(10) {
        std::thread::sleep(Duration::from_millis(1500));
        let found = discover(&p.bin, &agent.id, 10_000)?;
        resolve.push(
            found["appliance"]["resolved_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }

    std::thread::sleep(Duration::from_secs(1));
    let pid = agent.pid().context("agent gone")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    agent.stop()?;

    step("USB pairings against the fake phone (agent/examples/pairing_bench.rs)");
    let out = cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "agent",
            "--example",
            "pairing_bench",
            "--",
        ])
        .arg((runs * 10).to_string())
        .output()
        .context("cannot run the pairing bench")?;
    if !out.status.success() {
        bail!(
            "the pairing bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pairing: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the pairing bench printed no JSON figures")?;

    let m = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    Ok(vec![
        ("api_start_to_reply_p50_ms".into(), m(&total)),
        (
            "api_start_to_reply_p99_ms".into(),
            percentile(&total, 99.0).unwrap_or(f64::NAN),
        ),
        ("synthesis_p50_ms".into(), m(&synth)),
        ("spawn_to_health_p50_ms".into(), m(&health)),
        ("stop_p50_ms".into(), m(&stop)),
        ("agent_idle_rss_mib".into(), rss_kib / 1024.0),
        ("discovery_resolve_ms".into(), m(&resolve)),
        ("discovery_runs".into(), resolve.len() as f64),
        (
            "pairing_ms".into(),
            pairing["pairing_ms"].as_f64().unwrap_or(f64::NAN),
        ),
        (
            "pairing_p99_ms".into(),
            pairing["pairing_p99_ms"].as_f64().unwrap_or(f64::NAN),
        ),
    ])
}
