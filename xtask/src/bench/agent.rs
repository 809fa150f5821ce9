//! `cargo xtask bench agent`: the appliance agent as a client sees it.
//!
//! - `api_start_to_reply_p50_ms` / `_p99_ms`: `POST /v1/instances` sent → 201 received →
//!   connect to the returned endpoint → first verified `query 5` reply (the 16 MiB-model
//!   sample service of `cargo xtask demo`), on the default agent, which keeps a warm standby
//!   per started service (the start resumes it; timed once the first standby is ready); the
//!   instance is then deleted (not timed).
//! - `api_start_cold_p50_ms` / `_p99_ms`: the same on an agent run with `--no-warm-standby`
//!   (every start spawns a vmm and synthesises), with the agent's own figures for those starts:
//!   `synthesis_p50_ms` (vmm: checks → vCPUs running) and `spawn_to_health_p50_ms` (vmm spawn
//!   → `ok health`).
//! - `api_start_cold_unjailed_p50_ms`, `spawn_to_health_unjailed_p50_ms`: those cold starts
//!   on an agent run with `--no-jail` too (what the jail adds; the VM's cgroup is made either
//!   way); `api_start_cold_bare_p50_ms`, `spawn_to_health_bare_p50_ms`: with `--no-cgroups`
//!   as well (what the VM's cgroup adds).
//! - `stop_p50_ms`: the `DELETE` round trip.
//! - Starts are [`SETTLE`] apart, so that each is timed on an appliance at rest, not one still
//!   deleting the previous instance or making the next standby (2 cores).
//! - `api_start_to_reply_https_p50_ms` / `_p99_ms`: the same starts with the agent serving
//!   HTTPS (listen 0.0.0.0, reached at 127.0.0.1), the client pinning its certificate; each
//!   request on a fresh connection, which resumes the TLS session of the previous one (as a
//!   phone's client library does once it has talked to the appliance);
//!   `api_start_to_reply_https_first_p50_ms`: the same with every TLS session forgotten
//!   before each start, so its first request (the `POST`) makes a full handshake.
//! - `system_http_kept_alive_p50_ms` / `system_https_kept_alive_p50_ms`: the same request
//!   on one kept-alive connection (as a client library holds it): what HTTPS adds per request.
//! - `system_http_p50_ms`, `system_https_first_p50_ms`, `system_https_resumed_p50_ms`:
//!   `GET /v1/system` on a fresh connection: plain; over pinned HTTPS with a full handshake
//!   (sessions forgotten before each); over pinned HTTPS resuming the session the previous
//!   connection left (`system_https_resumed_fraction`: how many did). The handshake and
//!   request cost alone (target: HTTPS adds at most 1 ms). The two HTTPS kinds alternate,
//!   so the machine's drift falls on both alike; the plain runs are on the same agent
//!   binary and data just before (an agent listening on a wildcard serves HTTPS only).
//! - `release_client_system_http_p50_ms`, `release_client_system_https_first_p50_ms`,
//!   `release_client_system_https_resumed_p50_ms`: the same fresh-connection requests from a
//!   release build of the client library (`agent/examples/tls_cost.rs`, 5 × runs each), as a
//!   phone's app would ship it: xtask itself is a debug build, whose TLS path (ureq's
//!   transport chain, our connector) is unoptimised.
//! - `release_client_start_http_p50_ms`, `release_client_start_https_p50_ms`: warm starts
//!   (POST → first verified reply, then DELETE) made with the client library's own `start`,
//!   a fresh client (so a fresh connection, a full TLS handshake) each, in a release build
//!   (`agent/examples/start_cost.rs`): plain HTTP on the loopback agent and pinned HTTPS on
//!   the HTTPS agent, through the same client code (the debug figures above compare a
//!   hand-written plain request with the debug client library over HTTPS);
//!   `release_client_start_https_added_ms` is the difference (target: at most 1 ms).
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
use crate::demo::{api, api_client, discover, model_entry, prepare, Agent, Guest};
use crate::util::{cargo, require_kvm, step, target_dir};

/// Runs the benchmark; returns the named figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    if runs < 20 {
        bail!("bench agent needs --runs of at least 20 (it reports a p99)");
    }
    let work = target_dir().join("bench/agent-work");
    let p = prepare(&work)?;
    let data = work.join("data");

    // Cold: every start spawns a vmm and synthesises. The same again unjailed (`--no-jail`:
    // what the jail adds) and with neither jail nor cgroups (`--no-cgroups` too: what the
    // VM's cgroup adds).
    Agent::stage(&p, &data)?;
    let cold_starts = |log: &str, flags: &[&str], what: &str| -> Result<Starts> {
        let mut agent = Agent::spawn_with(&p, &data, &work.join(log), None, None, flags)?;
        step(&format!(
            "{runs} {what} ({}): POST /v1/instances → first verified reply",
            flags.join(" ")
        ));
        let s = starts(&agent.addr, runs, false)?;
        agent.stop()?;
        Ok(s)
    };
    let cold = cold_starts("agent-cold.log", &["--no-warm-standby"], "cold starts")?;
    let unjailed = cold_starts(
        "agent-cold-unjailed.log",
        &["--no-warm-standby", "--no-jail"],
        "cold starts unjailed",
    )?;
    let bare = cold_starts(
        "agent-cold-bare.log",
        &["--no-warm-standby", "--no-jail", "--no-cgroups"],
        "cold starts with neither jail nor cgroups",
    )?;

    // Warm (the default): a start resumes the standby the previous start left.
    let mut agent = Agent::start(&p, &data, &work.join("agent.log"))?;
    let addr = agent.addr.clone();
    step(&format!(
        "{runs} warm starts (the default): POST /v1/instances → first verified reply"
    ));
    // The first start of a service is cold; it leaves the standby the next one takes (after
    // writing the service's shared RAM image, once).
    starts(&addr, 1, false)?;
    standby_ready(&addr)?;
    let s = starts(&addr, runs, false)?;
    let system_http = system_rtts(&addr, false, runs)?;
    let release_plain = release_client(runs * 5, &format!("http://{addr}"), None)?;
    let kept_http = kept_alive_rtts(&addr, runs)?;
    step(&format!(
        "{runs} warm starts by a release build of the client library (plain HTTP)"
    ));
    let release_start_http = release_starts(runs, &format!("http://{addr}"), None)?;

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

    step(&format!(
        "{runs} starts over HTTPS (listen 0.0.0.0, the certificate pinned)"
    ));
    let board = work.join("board-https.toml");
    let dev = std::fs::read_to_string(crate::util::root().join("board-configs/dev.toml"))?;
    let listen = "listen = [\"127.0.0.1\"]";
    if !dev.contains(listen) {
        bail!("board-configs/dev.toml has no `{listen}`");
    }
    std::fs::write(&board, dev.replace(listen, "listen = [\"0.0.0.0\"]"))?;
    let mut tls_agent = Agent::spawn(&p, &data, &work.join("agent-https.log"), Some(&board), None)?;
    starts(&tls_agent.addr, 1, false)?;
    standby_ready(&tls_agent.addr)?;
    let tls = starts(&tls_agent.addr, runs, false)?;
    step(&format!(
        "{runs} starts over HTTPS, each beginning with a full TLS handshake"
    ));
    let tls_first = starts(&tls_agent.addr, runs, true)?;
    step(&format!(
        "{runs} × GET /v1/system on fresh connections: plain, HTTPS full handshake, HTTPS resumed"
    ));
    let system = system_rtts(&tls_agent.addr, true, runs)?;
    let fp = crate::demo::fingerprint(&data)?;
    let release_tls = release_client(runs * 5, &format!("https://{}", tls_agent.addr), Some(&fp))?;
    let kept_https = kept_alive_rtts(&tls_agent.addr, runs)?;
    step(&format!(
        "{runs} warm starts by a release build of the client library (pinned HTTPS, a full handshake each)"
    ));
    let release_start_https =
        release_starts(runs, &format!("https://{}", tls_agent.addr), Some(&fp))?;
    tls_agent.stop()?;

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
    let p99 = |v: &[f64]| percentile(v, 99.0).unwrap_or(f64::NAN);
    Ok(vec![
        ("api_start_to_reply_p50_ms".into(), m(&s.total)),
        (
            "release_client_start_http_p50_ms".into(),
            release_start_http,
        ),
        (
            "release_client_start_https_p50_ms".into(),
            release_start_https,
        ),
        (
            "release_client_start_https_added_ms".into(),
            release_start_https - release_start_http,
        ),
        ("api_start_to_reply_p99_ms".into(), p99(&s.total)),
        ("api_start_to_reply_https_p50_ms".into(), m(&tls.total)),
        ("api_start_to_reply_https_p99_ms".into(), p99(&tls.total)),
        (
            "api_start_to_reply_https_first_p50_ms".into(),
            m(&tls_first.total),
        ),
        ("system_http_p50_ms".into(), m(&system_http.plain)),
        ("system_https_first_p50_ms".into(), m(&system.first)),
        ("system_https_resumed_p50_ms".into(), m(&system.resumed)),
        (
            "system_https_resumed_fraction".into(),
            system.resumed_count as f64 / runs as f64,
        ),
        (
            "release_client_system_http_p50_ms".into(),
            release_plain["plain_fresh_ms"].as_f64().unwrap_or(f64::NAN),
        ),
        (
            "release_client_system_https_first_p50_ms".into(),
            release_tls["https_full_fresh_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        ),
        (
            "release_client_system_https_resumed_p50_ms".into(),
            release_tls["https_resumed_fresh_ms"]
                .as_f64()
                .unwrap_or(f64::NAN),
        ),
        ("system_http_kept_alive_p50_ms".into(), m(&kept_http)),
        ("system_https_kept_alive_p50_ms".into(), m(&kept_https)),
        ("api_start_cold_p50_ms".into(), m(&cold.total)),
        ("api_start_cold_p99_ms".into(), p99(&cold.total)),
        ("api_start_cold_unjailed_p50_ms".into(), m(&unjailed.total)),
        (
            "spawn_to_health_unjailed_p50_ms".into(),
            m(&unjailed.health),
        ),
        ("api_start_cold_bare_p50_ms".into(), m(&bare.total)),
        ("spawn_to_health_bare_p50_ms".into(), m(&bare.health)),
        ("synthesis_p50_ms".into(), m(&cold.synth)),
        ("spawn_to_health_p50_ms".into(), m(&cold.health)),
        ("stop_p50_ms".into(), m(&s.stop)),
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

/// `GET /v1/system` on fresh connections from a release client (the client library in
/// `agent/examples/tls_cost.rs`, as a phone's app would build it) against `url`; its JSON
/// figures.
fn release_client(runs: usize, url: &str, fp: Option<&str>) -> Result<serde_json::Value> {
    let mut c = cargo();
    c.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "agent",
        "--example",
        "tls_cost",
        "--",
    ])
    .arg(runs.to_string())
    .arg(url);
    if let Some(fp) = fp {
        c.arg(fp);
    }
    let out = c.output().context("cannot run the tls_cost example")?;
    if !out.status.success() {
        bail!(
            "tls_cost against {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("tls_cost printed no JSON figures")
}

/// `runs` warm starts of the model service by `agent/examples/start_cost.rs` (release
/// build) against `url` (pinned to `fp` for HTTPS): their median, ms.
fn release_starts(runs: usize, url: &str, fp: Option<&str>) -> Result<f64> {
    let mut c = cargo();
    c.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "agent",
        "--example",
        "start_cost",
        "--",
    ])
    .arg(runs.to_string())
    .arg(url)
    .arg(crate::demo::token())
    .arg("model")
    .arg("query 5")
    .arg(format!("ok query i=5 value={}", model_entry(5)));
    if let Some(fp) = fp {
        c.arg(fp);
    }
    let out = c.output().context("cannot run the start_cost example")?;
    if !out.status.success() {
        bail!(
            "start_cost against {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("start_cost printed no JSON figures")?;
    v["start_p50_ms"]
        .as_f64()
        .context("start_cost printed no start_p50_ms")
}

/// Waits until the agent at `addr` has a warm standby ready (its `/metrics`).
fn standby_ready(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, text) = crate::demo::http(addr, "GET", "/metrics", None)?;
        if status == 200 && text.contains("cloudlet_warm_standbys 1") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no warm standby within 60 s (agent at {addr})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Times of [`starts`], ms.
struct Starts {
    /// `POST /v1/instances` sent → first verified reply.
    total: Vec<f64>,
    /// The agent's `synthesis_ms`.
    synth: Vec<f64>,
    /// The agent's `first_reply_ms` (spawn → `ok health`, or resume → `ok health`).
    health: Vec<f64>,
    /// `DELETE` round trips.
    stop: Vec<f64>,
}

/// How long the appliance rests between starts: a start is timed on an appliance that is
/// not still busy with the previous one (deleting it, making the next standby).
const SETTLE: Duration = Duration::from_millis(150);

/// `runs` starts of the model service on the agent at `addr` (each: POST → first verified
/// reply; then DELETE). `full_handshake`: every TLS session is forgotten before each start.
fn starts(addr: &str, runs: usize, full_handshake: bool) -> Result<Starts> {
    let want = format!("ok query i=5 value={}", model_entry(5));
    let mut s = Starts {
        total: vec![],
        synth: vec![],
        health: vec![],
        stop: vec![],
    };
    for _ in 0..runs {
        std::thread::sleep(SETTLE);
        if full_handshake {
            agent::client::forget_tls_sessions();
        }
        let t0 = Instant::now();
        let inst = api(
            addr,
            "POST",
            "/v1/instances",
            Some(r#"{"service":"model"}"#),
        )?;
        let endpoint = inst["endpoint"].as_str().context("no endpoint")?;
        let mut g = Guest::connect(endpoint)?;
        g.expect("query 5", &want)?;
        s.total.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(g);
        let id = inst["id"].as_str().context("no id")?;
        // A warm start's own check of its first reply runs after the 201.
        let inst = api(addr, "GET", &format!("/v1/instances/{id}"), None)?;
        let ms = |k: &str| inst[k].as_f64().unwrap_or(f64::NAN);
        s.synth.push(ms("synthesis_ms"));
        s.health.push(ms("first_reply_ms"));
        let t = Instant::now();
        api(addr, "DELETE", &format!("/v1/instances/{id}"), None)?;
        s.stop.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(s)
}

/// `GET /v1/system` on fresh connections, ms each.
struct SystemRtts {
    /// Plain HTTP.
    plain: Vec<f64>,
    /// HTTPS, a full handshake each (sessions forgotten first).
    first: Vec<f64>,
    /// HTTPS, resuming the previous connection's session.
    resumed: Vec<f64>,
    /// How many of `resumed` did resume.
    resumed_count: usize,
}

/// `runs` × `GET /v1/system` on fresh connections (a fresh client each): plain HTTP at
/// `addr`, or (`tls`) alternately HTTPS with a full handshake and HTTPS resumed.
fn system_rtts(addr: &str, tls: bool, runs: usize) -> Result<SystemRtts> {
    let mut r = SystemRtts {
        plain: vec![],
        first: vec![],
        resumed: vec![],
        resumed_count: 0,
    };
    let once = |addr: &str| -> Result<(f64, bool)> {
        let c = api_client(addr, None);
        let t = Instant::now();
        let res = c.raw("GET", "/v1/system", None, false)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if res.status != 200 {
            bail!("GET /v1/system → {}: {}", res.status, res.body);
        }
        Ok((ms, c.resumed()))
    };
    once(addr)?;
    for _ in 0..runs {
        if !tls {
            r.plain.push(once(addr)?.0);
            continue;
        }
        agent::client::forget_tls_sessions();
        r.first.push(once(addr)?.0);
        let (ms, resumed) = once(addr)?;
        r.resumed.push(ms);
        r.resumed_count += usize::from(resumed);
    }
    Ok(r)
}

/// `runs` × `GET /v1/system` on one client kept alive (its first request, which opens the
/// connection, not counted), ms each: what a phone's client library pays per request.
fn kept_alive_rtts(addr: &str, runs: usize) -> Result<Vec<f64>> {
    let c = api_client(addr, None);
    let mut v = vec![];
    for i in 0..=runs {
        let t = Instant::now();
        let r = c.raw("GET", "/v1/system", None, false)?;
        if i > 0 {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        if r.status != 200 {
            bail!("GET /v1/system → {}: {}", r.status, r.body);
        }
    }
    Ok(v)
}
