//! `cargo xtask demo`: the appliance end to end, as a phone would use it.
//!
//! Builds the micro guest and the release binaries, makes a base image (guest booted to
//! ready, a disk table, a NIC) and a sample service overlay (`load:16`, a 16 MiB model),
//! stages them into a fresh data directory, starts the agent with the dev board on loopback,
//! discovers it over mDNS with the client library (`cloudlet discover`), starts the service
//! over the HTTP API, sends requests through the forwarded port and checks every answer
//! against the reference oracle (`micro_service::oracle`: `query I` against the model's
//! formula, `get I` against the disk table written here), prints the timings and stops everything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use micro_service::client::{field, Client, DEFAULT_TIMEOUT};
use micro_service::oracle;
use serde_json::Value;

use crate::util::{cargo, run, step, target_dir};

/// The dev board's token.
pub const TOKEN: &str = "cloudlet-dev-token";
/// Entries in the demo's disk table.
pub const TABLE_ENTRIES: u64 = 5000;

/// The model's reference values, for `bench agent` (which checks the same service).
pub use micro_service::oracle::model_entry;

/// Release binaries and the demo's images.
pub struct Prepared {
    /// target/release.
    pub bin: PathBuf,
    /// The base directory.
    pub base: PathBuf,
    /// The `load:16` overlay.
    pub overlay: PathBuf,
}

/// Builds the guest, the release binaries, the base and the overlay under `work`.
pub fn prepare(work: &Path) -> Result<Prepared> {
    let guest = crate::guest::build()?;
    step("building the release binaries (vmm, image-builder, agent, cloudlet)");
    run(cargo().args(["build", "--release", "-p", "image-builder", "-p", "agent"]))?;
    crate::util::build_release_vmm()?;
    let bin = target_dir().join("release");
    std::fs::create_dir_all(work)?;
    let disk = work.join("table.img");
    std::fs::write(&disk, oracle::table_image(TABLE_ENTRIES, 1 << 20))?;
    let base = work.join("base");
    step("making the base image (guest booted to ready, disk table, NIC)");
    run(Command::new(bin.join("image-builder"))
        .args(["base", "--kernel"])
        .arg(&guest)
        .arg("--out")
        .arg(&base)
        .args(["--net", "--force", "--disk"])
        .arg(&disk))?;
    let overlay = work.join("model.overlay");
    step("making the sample service's overlay (load:16, a 16 MiB model)");
    run(Command::new(bin.join("image-builder"))
        .args(["overlay", "--base"])
        .arg(&base)
        .args(["--script", "load:16", "--out"])
        .arg(&overlay))?;
    Ok(Prepared { bin, base, overlay })
}

/// An agent process on a fresh data directory with the demo's base and service staged.
pub struct Agent {
    child: Option<Child>,
    /// "IP:PORT" of its API.
    pub addr: String,
    /// Its appliance id.
    pub id: String,
}

impl Agent {
    /// Stages and starts.
    pub fn start(p: &Prepared, data: &Path, log: &Path) -> Result<Agent> {
        let _ = std::fs::remove_dir_all(data);
        let agent = p.bin.join("agent");
        run(Command::new(&agent)
            .args(["stage-base", "micro", "--from"])
            .arg(&p.base)
            .arg("--data-dir")
            .arg(data)
            .stderr(Stdio::null()))?;
        run(Command::new(&agent)
            .args(["stage-service", "model", "--overlay"])
            .arg(&p.overlay)
            .args([
                "--description",
                "sample recognition service: a 16 MiB model in RAM",
            ])
            .arg("--data-dir")
            .arg(data)
            .stderr(Stdio::null()))?;
        let logf = std::fs::File::create(log)?;
        let child = Command::new(&agent)
            .args(["--board", "dev", "--stop-on-exit", "--data-dir"])
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .context("cannot start the agent")?;
        let mut a = Agent {
            child: Some(child),
            addr: String::new(),
            id: std::fs::read_to_string(data.join("agent.id"))?
                .trim()
                .to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::fs::read_to_string(data.join("api.addr")) {
                if !s.trim().is_empty() {
                    a.addr = s.trim().to_string();
                    return Ok(a);
                }
            }
            if let Some(Ok(Some(st))) = a.child.as_mut().map(|c| c.try_wait()) {
                bail!("the agent exited with {st}; its log is {}", log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not come up in 20 s; its log is {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, then wait (kill after 10 s).
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("the agent exited with {st}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("the agent did not stop within 10 s of SIGTERM (killed)")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// One HTTP/1.1 request over a fresh connection; returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let auth = if method == "GET" {
        String::new()
    } else {
        format!("Authorization: Bearer {TOKEN}\r\n")
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).to_string();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {addr}: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line: {head}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// JSON of a successful API call.
pub fn api(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<Value> {
    let (status, text) = http(addr, method, path, body)?;
    if !(200..300).contains(&status) {
        bail!("{method} {path} → {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
}

/// A connection to an instance's service: the shared guest client with its default timeout.
pub struct Guest(Client);

impl Guest {
    /// Connects to `endpoint` (`IP:PORT`).
    pub fn connect(endpoint: &str) -> Result<Guest> {
        Ok(Guest(Client::connect(endpoint, DEFAULT_TIMEOUT)?))
    }
}

impl Deref for Guest {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.0
    }
}

impl DerefMut for Guest {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.0
    }
}

/// A service instance the agent started.
pub struct Instance {
    /// Its id.
    pub id: String,
    /// Its service's `IP:PORT`.
    pub endpoint: String,
    /// The agent's JSON for it (timings and all).
    pub json: Value,
}

/// `POST /v1/instances` of `service` on the agent at `addr`.
pub fn start_instance(addr: &str, service: &str) -> Result<Instance> {
    let body = serde_json::json!({ "service": service }).to_string();
    let json = api(addr, "POST", "/v1/instances", Some(&body))?;
    let field = |k: &str| {
        json[k]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no {k} in {json}"))
    };
    Ok(Instance {
        id: field("id")?,
        endpoint: field("endpoint")?,
        json,
    })
}

/// Runs `cloudlet discover --json --wait-for ID`; returns the appliance's JSON.
pub fn discover(bin: &Path, id: &str, window_ms: u64) -> Result<Value> {
    let out = Command::new(bin.join("cloudlet"))
        .args(["discover", "--json", "--wait-for", id, "--browse-ms"])
        .arg(window_ms.to_string())
        .output()
        .context("cannot run cloudlet discover")?;
    if !out.status.success() {
        bail!(
            "cloudlet discover failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let all: Value = serde_json::from_slice(&out.stdout)?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["appliance"]["txt"]["id"] == id)
        .cloned()
        .with_context(|| format!("appliance {id} not discovered within {window_ms} ms"))
}

/// Runs the demo.
pub fn demo() -> Result<()> {
    let work = target_dir().join("demo");
    let p = prepare(&work)?;
    let log = work.join("agent.log");
    step("starting the agent (board dev: loopback, port picked, mDNS on)");
    let mut agent = Agent::start(&p, &work.join("data"), &log)?;
    println!(
        "agent {} at http://{} (log: {})",
        agent.id,
        agent.addr,
        log.display()
    );

    step("discovering it over mDNS (_cloudlet._tcp) with the client library");
    let t = Instant::now();
    let found = discover(&p.bin, &agent.id, 10_000)?;
    let discover_ms = t.elapsed().as_secs_f64() * 1e3;
    let resolved_ms = found["appliance"]["resolved_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let url = found["url"].as_str().unwrap_or_default().to_string();
    println!(
        "found {} at {url}: score {:.3}, rtt {:.2} ms, TXT {}",
        found["appliance"]["instance"].as_str().unwrap_or("?"),
        found["score"].as_f64().unwrap_or(0.0),
        found["rtt_ms"].as_f64().unwrap_or(f64::NAN),
        found["appliance"]["txt"]
    );
    let addr = url.trim_start_matches("http://").to_string();
    let sys = api(&addr, "GET", "/v1/system", None)?;
    println!(
        "system: {} cores, load {}, services {}",
        sys["cores"], sys["load1"], sys["services"]
    );

    step("starting the sample service (POST /v1/instances)");
    let t = Instant::now();
    let Instance {
        id,
        endpoint,
        json: inst,
    } = start_instance(&addr, "model")?;
    let start_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("instance {id} running at {endpoint}");

    step("sending requests through the forwarded port, checking every answer");
    let t = Instant::now();
    let mut g = Guest::connect(&endpoint)?;
    g.expect("query 5", &oracle::query_reply(5))?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut checked = 1;
    let t = Instant::now();
    for k in 0..200u64 {
        let i = (k * 10_007) % (2 << 20);
        g.expect(&format!("query {i}"), &oracle::query_reply(i))?;
        let j = (k * 37) % TABLE_ENTRIES;
        g.expect(
            &format!("get {j}"),
            &oracle::get_reply(j, oracle::table_value(j)),
        )?;
        checked += 2;
    }
    let per_req_us = t.elapsed().as_secs_f64() * 1e6 / 400.0;
    let primes = g.request("primes 1000000")?;
    let pi = oracle::prime_count(1_000_000);
    let count = pi.to_string();
    if !primes.starts_with("ok primes ")
        || field(&primes, "N") != Some("1000000")
        || field(&primes, "count") != Some(&count)
    {
        bail!("primes 1000000 answered '{primes}', expected count={pi}");
    }
    checked += 1;
    println!("{checked} answers checked (query against the model formula, get against the disk table, π(10^6) = {pi})");
    drop(g);

    step("stopping the instance and the agent");
    let t = Instant::now();
    let stopped = api(&addr, "DELETE", &format!("/v1/instances/{id}"), None)?;
    let stop_ms = t.elapsed().as_secs_f64() * 1e3;
    if stopped["state"] != "stopped" {
        bail!("instance not stopped: {stopped}");
    }
    if TcpStream::connect(&endpoint).is_ok() {
        bail!("the instance's port still answers after the stop");
    }
    agent.stop()?;

    let row = |k: &str, v: f64| println!("{k:<46} {v:>10.2}");
    println!("\n{:<46} {:>10}", "cloudlet demo", "ms");
    println!("{}", "-".repeat(57));
    row("mDNS browse → appliance resolved", resolved_ms);
    row("cloudlet discover (browse, rank, RTT), whole", discover_ms);
    row("POST /v1/instances → 201 (VM answering)", start_ms);
    row(
        "  vmm synthesis (checks → vCPUs run)",
        inst["synthesis_ms"].as_f64().unwrap_or(f64::NAN),
    );
    row(
        "  vmm spawn → first `ok health`",
        inst["first_reply_ms"].as_f64().unwrap_or(f64::NAN),
    );
    row("connect + first verified `query`", first_ms);
    row("verified request round trip (mean)", per_req_us / 1e3);
    row("DELETE /v1/instances/{id} (stop)", stop_ms);
    step("demo done: everything stopped");
    Ok(())
}
