//! `cargo xtask demo`: the appliance end to end, as a phone would use it.
//!
//! Builds the micro guest and the release binaries, makes a base image (guest booted to
//! ready, a disk table, a NIC) and a sample service overlay (`load:16`, a 16 MiB model),
//! stages them into a fresh data directory, starts the agent with the dev board on loopback,
//! discovers it over mDNS with the client library (`cloudlet discover`), starts the service
//! over the HTTP API, sends requests through the forwarded port and checks every answer
//! against the reference oracle (`micro_service::oracle`: `query I` against the model's
//! formula, `get I` against the disk table written here); then starts a second appliance
//! (a second agent) in a network namespace of its own, joined by a veth pair shaped to
//! [`LINK_MBIT`], each agent trusting the other, discovers it over mDNS, hands the instance
//! over to it while a client keeps calling the service (verified answers; the client asks
//! the first agent where the instance went when its connection breaks and follows it),
//! prints the downtime and bytes, and stops everything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use micro_service::client::{field, Client, DEFAULT_TIMEOUT};
use micro_service::oracle;
use serde_json::Value;

use crate::util::{cargo, run, step, target_dir};

/// The operator token the demo's agents are given (in their environment, never on a
/// command line): random per run, the same for every agent, so a client following a moved
/// instance is accepted by the target too.
pub fn token() -> &'static str {
    static T: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .expect("random bytes from /dev/urandom");
        b.iter().map(|x| format!("{x:02x}")).collect()
    })
}
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
    step("building the release binaries (vmm, image-builder, agent, cloudlet)");
    run(cargo().args(["build", "--release", "-p", "image-builder", "-p", "agent"]))?;
    crate::util::build_release_vmm()?;
    prepare_from(work, target_dir().join("release"))
}

/// Makes the base and the overlay under `work` with the binaries in `bin` (built already).
pub fn prepare_from(work: &Path, bin: PathBuf) -> Result<Prepared> {
    let guest = crate::guest::build()?;
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

/// The API addresses served over HTTPS, with the certificate fingerprint each must present
/// ([`http`] pins it).
static HTTPS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The fingerprint pinned for the HTTPS API at `addr`, if it is one.
fn https_pin(addr: &str) -> Option<String> {
    let v = HTTPS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter().find(|(a, _)| a == addr).map(|(_, f)| f.clone())
}

/// A client of the agent API at `addr` ("IP:PORT"): pinned HTTPS where the agent serves it,
/// plain HTTP otherwise.
pub fn api_client(addr: &str, token: Option<&str>) -> agent::client::Client {
    match https_pin(addr) {
        Some(fp) => agent::client::Client::pinned(&format!("https://{addr}"), token, &fp),
        None => agent::client::Client::new(&format!("http://{addr}"), token),
    }
}

/// The fingerprint of the appliance certificate of data directory `data` (made there, as
/// the agent would at its first start, when there is none yet).
pub fn fingerprint(data: &Path) -> Result<String> {
    let id = std::fs::read_to_string(data.join("agent.id"))?;
    Ok(agent::tls::ApplianceCert::load_or_create(data, id.trim())?
        .fingerprint()
        .to_string())
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
    /// Stages and starts with the dev board.
    pub fn start(p: &Prepared, data: &Path, log: &Path) -> Result<Agent> {
        Agent::stage(p, data)?;
        Agent::spawn(p, data, log, None, None)
    }

    /// A fresh data directory at `data` with the demo's base and service staged; returns
    /// the appliance's id.
    pub fn stage(p: &Prepared, data: &Path) -> Result<String> {
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
        Ok(std::fs::read_to_string(data.join("agent.id"))?
            .trim()
            .to_string())
    }

    /// Starts the agent on a staged `data` with the board file `config` (None: the dev
    /// board), inside network namespace `ns` when given.
    pub fn spawn(
        p: &Prepared,
        data: &Path,
        log: &Path,
        config: Option<&Path>,
        ns: Option<&str>,
    ) -> Result<Agent> {
        Agent::spawn_with(p, data, log, config, ns, &[])
    }

    /// As [`Agent::spawn`], with `extra` arguments for the agent.
    pub fn spawn_with(
        p: &Prepared,
        data: &Path,
        log: &Path,
        config: Option<&Path>,
        ns: Option<&str>,
        extra: &[&str],
    ) -> Result<Agent> {
        let agent = p.bin.join("agent");
        let _ = std::fs::remove_file(data.join("api.addr"));
        let _ = std::fs::remove_file(data.join("api.url"));
        let logf = std::fs::File::create(log)?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&agent);
                c
            }
            None => Command::new(&agent),
        };
        match config {
            Some(f) => cmd.arg("--config").arg(f),
            None => cmd.args(["--board", "dev"]),
        };
        let child = cmd
            .args(extra)
            .env("CLOUDLET_TOKEN", token())
            .args(["--stop-on-exit", "--data-dir"])
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
            if let (Ok(s), Ok(url)) = (
                std::fs::read_to_string(data.join("api.addr")),
                std::fs::read_to_string(data.join("api.url")),
            ) {
                if !s.trim().is_empty() {
                    a.addr = s.trim().to_string();
                    if url.starts_with("https://") {
                        let fp = fingerprint(data)?;
                        let mut v = HTTPS.lock().unwrap_or_else(|e| e.into_inner());
                        v.retain(|(x, _)| *x != a.addr);
                        v.push((a.addr.clone(), fp));
                    }
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

/// One HTTP/1.1 request over a fresh connection (HTTPS, pinned, to an agent that serves
/// it); returns (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    if https_pin(addr).is_some() {
        let r = api_client(addr, Some(token()))
            .raw(method, path, body.map(str::as_bytes), true)
            .with_context(|| format!("{method} https://{addr}{path}"))?;
        return Ok((r.status, r.body));
    }
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    let body = body.unwrap_or("");
    let auth = format!("Authorization: Bearer {}\r\n", token());
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
    discover_with(Command::new(bin.join("cloudlet")), id, window_ms)
}

/// [`discover`] with the `cloudlet` command given (e.g. run inside a network namespace).
pub fn discover_with(mut cloudlet: Command, id: &str, window_ms: u64) -> Result<Value> {
    let out = cloudlet
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
        .with_context(|| format!("appliance {id} not discovered within {window_ms} ms: {all}"))
}

/// A network namespace of its own for the second appliance, joined to this one by a veth
/// pair (this side `.1`, the namespace's side `.2` of a /30), the link from here shaped to
/// [`LINK_MBIT`] (a token bucket: this kernel has no netem for delay). Removed when dropped.
pub struct Site {
    /// The namespace's name.
    pub ns: String,
    /// The veth's name on this side.
    dev: String,
    /// The address on this side.
    pub here: String,
    /// The namespace's address.
    pub there: String,
}

/// The rate of the link to the second appliance, Mbit/s.
pub const LINK_MBIT: u64 = 100;

impl Site {
    /// Makes the namespace and the link (names and subnet from this process's id, so two
    /// demos at once do not collide).
    pub fn new() -> Result<Site> {
        let pid = std::process::id();
        let ns = format!("cl-demo-{pid}");
        let dev = format!("cld{pid}a");
        let peer = format!("cld{pid}b");
        let net = format!("10.{}.{}", 200 + (pid >> 14) % 50, (pid >> 6) & 255);
        let host = (pid & 63) * 4;
        let site = Site {
            ns: ns.clone(),
            dev: dev.clone(),
            here: format!("{net}.{}", host + 1),
            there: format!("{net}.{}", host + 2),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args).stderr(Stdio::null()));
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &dev, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ])?;
        ip(&["addr", "add", &format!("{}/30", site.here), "dev", &dev])?;
        ip(&["link", "set", &dev, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", site.there),
            "dev",
            &peer,
        ])?;
        ip(&["-n", &ns, "link", "set", &peer, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        run(Command::new("tc")
            .args(["qdisc", "add", "dev", &dev, "root", "tbf", "rate"])
            .arg(format!("{LINK_MBIT}mbit"))
            .args(["burst", "64kb", "latency", "50ms"]))?;
        Ok(site)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.dev])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
    }
}

/// What the client that keeps calling saw.
struct Calls {
    /// Answers checked against the oracle.
    checked: u64,
    /// Reconnections after a broken connection (each found where the instance runs now).
    reconnects: u32,
    /// The longest time between two verified answers, ms.
    max_gap_ms: f64,
    /// Verified answers from the second appliance.
    after: u64,
    /// The endpoint it ended on.
    endpoint: String,
}

/// Where instance `id` of the agent at `addr` runs now: its endpoint, following `moved_to`
/// (the agent's record of a handoff) from agent to agent.
fn locate(addr: &str, id: &str) -> Result<(String, String, String)> {
    let (mut addr, mut id) = (addr.to_string(), id.to_string());
    for _ in 0..4 {
        let v = api(&addr, "GET", &format!("/v1/instances/{id}"), None)?;
        match (v["state"].as_str(), v["moved_to"].as_object()) {
            (Some("moved"), Some(m)) => {
                addr = m["agent"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .to_string();
                id = m["instance"].as_str().unwrap_or_default().to_string();
            }
            _ => {
                let ep = v["endpoint"].as_str().unwrap_or_default().to_string();
                return Ok((addr, id, ep));
            }
        }
    }
    bail!("instance {id} moved too many times")
}

/// Calls instance `id` of the agent at `addr` until `stop` (verified `query` and `get`
/// requests); when its connection breaks, asks the agent where the instance went and
/// follows it there.
fn keep_calling(addr: &str, id: &str, stop: &AtomicBool) -> Result<Calls> {
    let (_, _, mut endpoint) = locate(addr, id)?;
    let first = endpoint.clone();
    let mut g = Guest::connect(&endpoint)?;
    let mut c = Calls {
        checked: 0,
        reconnects: 0,
        max_gap_ms: 0.0,
        after: 0,
        endpoint: String::new(),
    };
    let mut last = Instant::now();
    let mut k = 0u64;
    let deadline_after_break = Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) {
        let (req, want) = if k % 2 == 0 {
            let i = (k * 7919) % (2 << 20);
            (format!("query {i}"), oracle::query_reply(i))
        } else {
            let j = (k * 37) % TABLE_ENTRIES;
            (
                format!("get {j}"),
                oracle::get_reply(j, oracle::table_value(j)),
            )
        };
        match g.request(&req) {
            Ok(got) if got == want => {
                c.checked += 1;
                if endpoint != first {
                    c.after += 1;
                }
                c.max_gap_ms = c.max_gap_ms.max(last.elapsed().as_secs_f64() * 1e3);
                last = Instant::now();
                k += 1;
            }
            Ok(got) => bail!("`{req}` answered '{got}', expected '{want}'"),
            Err(_) => {
                // Broken: where is the instance now? Reconnect there (the same request is
                // sent again: these requests change nothing).
                let broke = Instant::now();
                g = loop {
                    if let Ok((_, _, ep)) = locate(addr, id) {
                        if let Ok(g) = Guest::connect(&ep) {
                            endpoint = ep;
                            break g;
                        }
                    }
                    if broke.elapsed() > deadline_after_break {
                        bail!("instance {id} unreachable for {deadline_after_break:?}");
                    }
                    std::thread::sleep(Duration::from_millis(2));
                };
                c.reconnects += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    c.endpoint = endpoint;
    Ok(c)
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

    step(&format!(
        "starting a second appliance in a network namespace of its own ({LINK_MBIT} Mbit/s link)"
    ));
    crate::util::ensure_programs(&[("ip", "iproute2"), ("tc", "iproute2")])?;
    let site = Site::new().context("cannot make the second appliance's network namespace")?;
    let data_b = work.join("data-b");
    let id_b = Agent::stage(&p, &data_b)?;
    let board_b = work.join("board-b.toml");
    let dev = std::fs::read_to_string(crate::util::root().join("board-configs/dev.toml"))?;
    let listen = "listen = [\"127.0.0.1\"]";
    if !dev.contains(listen) {
        bail!("board-configs/dev.toml has no `{listen}`");
    }
    std::fs::write(
        &board_b,
        dev.replace(listen, &format!("listen = [\"{}\"]", site.there)),
    )?;
    // Each trusts the other for handoffs (a shared secret per pair of appliances, in a file
    // only its owner may read, never on a command line), and pins the other's certificate
    // (B serves HTTPS on its network address).
    let secret_file = work.join("peer.secret");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&secret_file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_file)?;
        writeln!(f, "demo-secret-{}-{}", agent.id, id_b)?;
    }
    let data_a = work.join("data");
    for (data, other, other_data) in [(&data_a, &id_b, &data_b), (&data_b, &agent.id, &data_a)] {
        run(Command::new(p.bin.join("agent"))
            .args(["add-peer", other, "--secret-file"])
            .arg(&secret_file)
            .arg("--fingerprint")
            .arg(fingerprint(other_data)?)
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::null()))?;
    }
    let log_b = work.join("agent-b.log");
    let mut agent_b = Agent::spawn(&p, &data_b, &log_b, Some(&board_b), Some(&site.ns))?;
    println!(
        "agent {} in namespace {} (log: {}); each trusts the other",
        agent_b.id,
        site.ns,
        log_b.display()
    );
    // Found as a phone would find it (its mDNS announcement crosses the veth); its API
    // address is the fallback should the browse miss it.
    let url_b = match discover(&p.bin, &agent_b.id, 5000) {
        Ok(found) => {
            let url = found["url"].as_str().unwrap_or_default().to_string();
            println!(
                "discovered over mDNS across the link: {} at {url}",
                found["appliance"]["instance"].as_str().unwrap_or("?"),
            );
            url
        }
        Err(e) => {
            println!("not discovered over mDNS ({e:#}): using its API address");
            format!("https://{}", agent_b.addr)
        }
    };

    step("handing the instance off to it while a client keeps calling the service");
    let stop = AtomicBool::new(false);
    let (calls, moved, handoff_ms) = std::thread::scope(|scope| {
        let caller = scope.spawn(|| keep_calling(&addr, &id, &stop));
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let body = serde_json::json!({ "to": url_b }).to_string();
        let moved = api(
            &addr,
            "POST",
            &format!("/v1/instances/{id}/handoff"),
            Some(&body),
        );
        let handoff_ms = t.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let calls = caller.join().expect("the calling thread panicked");
        (calls, moved, handoff_ms)
    });
    let (moved, calls) = (moved?, calls?);
    let h = &moved["handoff"];
    if moved["state"] != "moved" || h["phase"] != "done" {
        bail!("the instance was not handed off: {moved}");
    }
    let (at_b, id_there, endpoint_b) = locate(&addr, &id)?;
    if at_b != agent_b.addr || calls.endpoint != endpoint_b || calls.after == 0 {
        bail!(
            "the client did not follow the instance to {endpoint_b} on {at_b}: it ended on {} \
             with {} answers from there",
            calls.endpoint,
            calls.after
        );
    }
    let f = |k: &str| h[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "moved to {at_b} as {id_there}: {} rounds, {:.2} MiB, downtime {:.2} ms, total {:.1} ms",
        h["round"],
        f("bytes") / (1 << 20) as f64,
        f("downtime_ms"),
        f("total_ms")
    );
    println!(
        "client: {} answers checked ({} from the second appliance), {} reconnect(s), longest \
         gap between answers {:.1} ms, now at {}",
        calls.checked, calls.after, calls.reconnects, calls.max_gap_ms, calls.endpoint
    );
    let mut g = Guest::connect(&endpoint_b)?;
    for j in [0, 1, TABLE_ENTRIES - 1] {
        g.expect(
            &format!("get {j}"),
            &oracle::get_reply(j, oracle::table_value(j)),
        )?;
    }
    drop(g);
    if TcpStream::connect(&endpoint).is_ok() {
        bail!("the first appliance's port still answers after the handoff");
    }
    checked += calls.checked + 3;

    step("stopping the instance and both agents");
    let t = Instant::now();
    let stopped = api(
        &agent_b.addr,
        "DELETE",
        &format!("/v1/instances/{id_there}"),
        None,
    )?;
    let stop_ms = t.elapsed().as_secs_f64() * 1e3;
    if stopped["state"] != "stopped" {
        bail!("instance not stopped: {stopped}");
    }
    if TcpStream::connect(&endpoint_b).is_ok() {
        bail!("the instance's port still answers after the stop");
    }
    agent_b.stop()?;
    drop(site);
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
    row("handoff: POST …/handoff → moved (over HTTP)", handoff_ms);
    row("  vmm handoff (request → target running)", f("total_ms"));
    row(
        "  downtime (source pause → target resumed)",
        f("downtime_ms"),
    );
    row("  client: longest gap between answers", calls.max_gap_ms);
    row("DELETE /v1/instances/{id} (stop)", stop_ms);
    println!("{checked} answers checked against the oracle in all");
    step("demo done: everything stopped");
    Ok(())
}
