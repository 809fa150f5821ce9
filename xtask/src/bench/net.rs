//! `cargo xtask bench net`: the micro guest's TCP service and disk, driven from the host.
//!
//! - **RPC latency** (`rpc_p50_us`, `rpc_p99_us`): `echo x` round trips on one connection
//!   through the VMM's user-mode network (`--forward`), one request at a time, after a
//!   warm-up; `runs` × 200 samples.
//! - **RPC throughput** (`rpc_throughput_rps`): 16 connections in parallel, each sending
//!   `echo x` back to back for 3 s; verified replies per second.
//! - **Bulk** (`bulk_mib_s`): the guest protocol limits a request to 1024 bytes and has no
//!   bulk transfer, so this is 64 MiB of payload carried as `echo` requests of 1000 payload
//!   bytes, pipelined (8 in flight) on 4 connections; the figure is payload MiB per second in
//!   one direction (each payload byte also comes back in the reply, so the wire carries it
//!   twice). Median of 3 transfers.
//! - The same latency and bulk figures through a TAP device (`tap_rpc_p50_us`,
//!   `tap_rpc_p99_us`, `tap_bulk_mib_s`), when run as root with /dev/net/tun.
//! - **Disk reads** (`blk_read_4k_mib_s`, `blk_read_64k_mib_s`): the guest's
//!   `scan 0 131072 K` reads the whole 64 MiB disk sequentially with virtio-blk requests of
//!   K KiB (4 or 64), one request at a time, past its table cache, and answers with the
//!   wrapping sum of the little-endian u64 words it read, which must equal the sum computed
//!   here over the image written for it. The figure is 64 MiB over the host-side time from
//!   sending the request (over TCP) to receiving the reply, median of `max(runs, 3)` scans
//!   after one unmeasured scan of each size; `blk_read_4k_guest_mib_s` and
//!   `blk_read_64k_guest_mib_s` are the same from the guest's own `us=` (the scan loop alone,
//!   without the request's way there and back). The image is in the host's page cache (just
//!   written), so this is the virtio path and the VMM's copy, not a disk device.
//! - **The floor** (`host_loopback_rpc_p50_us`, `…_p99_us`): the same `echo x` round trip
//!   against a server thread in this process speaking the same framing on 127.0.0.1;
//!   `ratio_vs_host_loopback` = `rpc_p50_us` / `host_loopback_rpc_p50_us`.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use micro_service::client::{field, read_frame, write_frame, Client};
use micro_service::frame::MAX_REQUEST;
use micro_service::oracle;

use super::child::Proc;
use super::stats::{median, percentile};
use crate::util::{require_kvm, step, target_dir};

const TIMEOUT: Duration = Duration::from_secs(30);
const MEM_MIB: u64 = 128;
/// The small request of the latency and throughput figures.
const SMALL: &str = "echo x";
/// Latency samples per run.
const SAMPLES_PER_RUN: usize = 200;
/// Requests before measuring (connections, caches and the guest's stack warm).
const WARMUP: usize = 500;
/// Parallel connections of the throughput figure, and how long it runs.
const THROUGHPUT_CONNS: usize = 16;
const THROUGHPUT_FOR: Duration = Duration::from_secs(3);
/// The bulk transfer: payload bytes in all, per request, connections, requests in flight.
const BULK_BYTES: usize = 64 << 20;
const BULK_PAYLOAD: usize = 1000;
const BULK_CONNS: usize = 4;
const BULK_WINDOW: usize = 8;
const BULK_REPEATS: usize = 3;
/// The disk of the read figures, and the request sizes (KiB) of the `scan`s.
const DISK_MIB: usize = 64;
const SCAN_KIB: [u64; 2] = [4, 64];

// ---------------------------------------------------------------------------------------
// The framing: `micro_service::client` on the host side.

/// Connects once the service answers `health` (retrying until [`TIMEOUT`]).
fn connect_when_up(addr: SocketAddr) -> Result<Client> {
    Ok(Client::connect_when_up(addr, TIMEOUT, TIMEOUT)?)
}

/// `n` connections, each once the service answers.
fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<Client>> {
    (0..n).map(|_| connect_when_up(addr)).collect()
}

/// Runs `work` on its own thread for each connection; the first failure, if any.
fn on_each(
    conns: Vec<Client>,
    work: impl Fn(usize, Client) -> Result<()> + Clone + Send + 'static,
) -> Result<()> {
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let work = work.clone();
            std::thread::spawn(move || work(k, c))
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))??;
    }
    Ok(())
}

/// The floor: a server thread answering `health` and `echo` on 127.0.0.1 with the guest's
/// framing, one thread per connection.
fn host_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                while let Ok(Some(req)) = read_frame(&mut s, MAX_REQUEST) {
                    let reply = match req.strip_prefix("echo ") {
                        Some(t) => format!("ok echo {t}"),
                        None if req == "health" => "ok health".to_string(),
                        None => format!("err unknown command '{req}'"),
                    };
                    if write_frame(&mut s, &reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------------------
// Measurements.

/// Round-trip times (µs) of `SMALL` on one connection, after a warm-up.
fn rpc_latency(addr: SocketAddr, samples: usize) -> Result<Vec<f64>> {
    let mut c = connect_when_up(addr)?;
    let want = format!("ok {SMALL}");
    for _ in 0..WARMUP {
        c.expect(SMALL, &want)?;
    }
    let mut us = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        c.expect(SMALL, &want)?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(us)
}

/// Verified `SMALL` replies per second on [`THROUGHPUT_CONNS`] parallel connections.
fn rpc_throughput(addr: SocketAddr) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let conns = connect_many(addr, THROUGHPUT_CONNS)?;
    let t0 = Instant::now();
    let (stop2, done2) = (stop.clone(), done.clone());
    let clients = std::thread::spawn(move || {
        on_each(conns, move |_, mut c| {
            let want = format!("ok {SMALL}");
            while !stop2.load(Ordering::Relaxed) {
                c.expect(SMALL, &want)?;
                done2.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    });
    std::thread::sleep(THROUGHPUT_FOR);
    stop.store(true, Ordering::Relaxed);
    clients
        .join()
        .map_err(|_| anyhow::anyhow!("the clients panicked"))??;
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

/// Payload MiB/s of [`BULK_BYTES`] carried in pipelined `echo` requests (see the module
/// comment); every reply is checked.
fn bulk(addr: SocketAddr) -> Result<f64> {
    let per_conn = BULK_BYTES / BULK_PAYLOAD / BULK_CONNS;
    let conns = connect_many(addr, BULK_CONNS)?;
    let t0 = Instant::now();
    on_each(conns, move |k, mut c| {
        let letter = char::from(b'a' + k as u8);
        let payload: String = std::iter::repeat_n(letter, BULK_PAYLOAD).collect();
        let req = format!("echo {payload}");
        let want = format!("ok echo {payload}");
        let (mut sent, mut got) = (0, 0);
        while got < per_conn {
            if sent < per_conn && sent - got < BULK_WINDOW {
                c.send(&req)?;
                sent += 1;
            } else {
                let r = c.recv()?;
                if r != want {
                    bail!("bulk echo came back wrong ({} bytes)", r.len());
                }
                got += 1;
            }
        }
        Ok(())
    })?;
    let bytes = (per_conn * BULK_CONNS * BULK_PAYLOAD) as f64;
    Ok(bytes / (1 << 20) as f64 / t0.elapsed().as_secs_f64())
}

/// Writes a `mib` MiB disk image whose table fills it (the oracle's table); returns the
/// image.
fn write_table(path: &Path, mib: usize) -> Result<Vec<u8>> {
    let size = mib << 20;
    let img = oracle::table_image(oracle::table_capacity(size), size);
    std::fs::write(path, &img).with_context(|| format!("write {}", path.display()))?;
    Ok(img)
}

/// One `scan` of the whole disk in `req_kib` KiB requests, its checksum verified against
/// `sum`: (host round trip µs, the guest's µs if it reported them).
fn blk_scan(c: &mut Client, sectors: u64, req_kib: u64, sum: u64) -> Result<(f64, Option<f64>)> {
    let req = format!("scan 0 {sectors} {req_kib}");
    let t = Instant::now();
    let r = c.request(&req)?;
    let host_us = t.elapsed().as_secs_f64() * 1e6;
    let want = format!("ok scan sectors={sectors} req_kib={req_kib} sum={sum} ");
    if !r.starts_with(&want) {
        bail!("`{req}` answered {r:?}, expected {want:?}…");
    }
    let guest_us = field(&r, "us").and_then(|v| v.parse::<f64>().ok());
    Ok((host_us, guest_us))
}

// ---------------------------------------------------------------------------------------
// VMs and the TAP device.

/// A VM under the release vmm, its service address, killed when dropped.
struct Vm {
    proc: Option<Proc>,
    addr: SocketAddr,
}

impl Vm {
    fn start(vmm: &Path, guest: &Path, extra: &[String], addr: SocketAddr) -> Result<Vm> {
        let mut cmd = Command::new(vmm);
        cmd.arg("run")
            .arg("--kernel")
            .arg(guest)
            .args(["--mem", &MEM_MIB.to_string()])
            .args(extra);
        let mut p = Proc::spawn(&mut cmd)?;
        if let Err(e) = p.wait_line(TIMEOUT, |l| l.starts_with("micro-guest ")) {
            p.kill();
            return Err(e.context(format!("no banner from {cmd:?}")));
        }
        Ok(Vm {
            proc: Some(p),
            addr,
        })
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.stop("poweroff 0\n");
        }
    }
}

/// A TAP device with the host's address on it, deleted when dropped.
struct Tap(String);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Tap {
    fn create(name: &str, host_cidr: &str) -> Result<Tap> {
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let tap = Tap(name.to_string());
        ip(&["addr", "add", host_cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["tuntap", "del", "dev", &self.0, "mode", "tap"]);
    }
}

/// Why the TAP figures cannot be measured here, if they cannot.
fn tap_unavailable() -> Option<&'static str> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("not root");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    None
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn p50(v: &[f64]) -> f64 {
    median(v).unwrap_or(0.0)
}

fn p99(v: &[f64]) -> f64 {
    percentile(v, 99.0).unwrap_or(0.0)
}

/// Runs the benchmark and returns its figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    let guest = crate::guest::build()?;
    step("building the vmm (release)");
    crate::util::build_release_vmm()?;
    let vmm = target_dir().join("release/vmm");
    let work = target_dir().join("bench-work/net");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let samples = runs * SAMPLES_PER_RUN;
    let mut figures: Vec<(String, f64)> = Vec::new();

    step(&format!(
        "floor: {samples} `{SMALL}` round trips to a host thread on 127.0.0.1"
    ));
    let host = rpc_latency(host_server()?, samples)?;
    let host50 = p50(&host);

    step(&format!(
        "user-mode network (--forward): {samples} round trips, {THROUGHPUT_CONNS} \
         connections for {THROUGHPUT_FOR:?}, {BULK_REPEATS} × {} MiB bulk",
        BULK_BYTES >> 20
    ));
    let disk = work.join("table.img");
    let image = write_table(&disk, DISK_MIB)?;
    let disk_sum = oracle::word_sum(&image);
    let disk_sectors = image.len() as u64 / 512;
    drop(image);
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let vm = Vm::start(
        &vmm,
        &guest,
        &[
            "--forward".into(),
            format!("127.0.0.1:{port}=10.0.2.15:80"),
            "--disk".into(),
            disk.display().to_string(),
            "--disk-read-only".into(),
        ],
        addr,
    )?;
    let rpc = rpc_latency(vm.addr, samples)?;
    let rps = rpc_throughput(vm.addr)?;
    let mut bulk_runs = Vec::new();
    for _ in 0..BULK_REPEATS {
        bulk_runs.push(bulk(vm.addr)?);
    }
    let rpc50 = p50(&rpc);
    figures.push(("rpc_p50_us".into(), rpc50));
    figures.push(("rpc_p99_us".into(), p99(&rpc)));
    figures.push(("rpc_throughput_rps".into(), rps));
    figures.push(("bulk_mib_s".into(), p50(&bulk_runs)));

    let scans = runs.max(3);
    step(&format!(
        "disk: `scan` of the whole {DISK_MIB} MiB disk in {SCAN_KIB:?} KiB requests, \
         {scans} times each"
    ));
    let mut c = connect_when_up(vm.addr)?;
    for k in SCAN_KIB {
        blk_scan(&mut c, disk_sectors, k, disk_sum)?;
    }
    let mut host_us: Vec<Vec<f64>> = vec![Vec::new(); SCAN_KIB.len()];
    let mut guest_us: Vec<Vec<f64>> = vec![Vec::new(); SCAN_KIB.len()];
    for _ in 0..scans {
        for (j, k) in SCAN_KIB.into_iter().enumerate() {
            let (h, g) = blk_scan(&mut c, disk_sectors, k, disk_sum)?;
            host_us[j].push(h);
            guest_us[j].extend(g);
        }
    }
    drop(c);
    drop(vm);
    let mib = DISK_MIB as f64;
    for (j, k) in SCAN_KIB.into_iter().enumerate() {
        figures.push((
            format!("blk_read_{k}k_mib_s"),
            mib / (p50(&host_us[j]) / 1e6),
        ));
    }
    for (j, k) in SCAN_KIB.into_iter().enumerate() {
        if guest_us[j].len() == scans {
            figures.push((
                format!("blk_read_{k}k_guest_mib_s"),
                mib / (p50(&guest_us[j]) / 1e6),
            ));
        } else {
            eprintln!("    blk_read_{k}k_guest_mib_s skipped: the guest reports cycles, not µs");
        }
    }

    match tap_unavailable() {
        Some(why) => eprintln!("    TAP figures skipped: {why}"),
        None => {
            step(&format!(
                "TAP: {samples} round trips, {BULK_REPEATS} × {} MiB bulk",
                BULK_BYTES >> 20
            ));
            let pid = std::process::id();
            let name = format!("tbnet{pid}");
            let net = format!("10.251.{}", pid & 0xff);
            let _tap = Tap::create(&name, &format!("{net}.1/24"))?;
            let addr: SocketAddr = format!("{net}.2:80").parse()?;
            let vm = Vm::start(
                &vmm,
                &guest,
                &[
                    "--cmdline".into(),
                    format!("console=ttyS0 micro.ip={net}.2/24 micro.gw={net}.1"),
                    "--tap".into(),
                    name.clone(),
                ],
                addr,
            )?;
            let rpc = rpc_latency(vm.addr, samples)?;
            let mut bulk_runs = Vec::new();
            for _ in 0..BULK_REPEATS {
                bulk_runs.push(bulk(vm.addr)?);
            }
            drop(vm);
            figures.push(("tap_rpc_p50_us".into(), p50(&rpc)));
            figures.push(("tap_rpc_p99_us".into(), p99(&rpc)));
            figures.push(("tap_bulk_mib_s".into(), p50(&bulk_runs)));
        }
    }

    figures.push(("host_loopback_rpc_p50_us".into(), host50));
    figures.push(("host_loopback_rpc_p99_us".into(), p99(&host)));
    figures.push((
        "ratio_vs_host_loopback".into(),
        if host50 > 0.0 { rpc50 / host50 } else { 0.0 },
    ));
    Ok(figures)
}
