//! `cargo xtask bench handoff`: a running service VM moved between two appliances on one
//! machine, over a shaped link, while a writer dirties its pages (issue 11's scenario).
//!
//! The two appliances are two network namespaces joined by a veth pair (`netlab`), the link
//! shaped to each rate of the [`Scenario`] in both directions. The guest is the micro guest
//! with [`Scenario::mem_mib`] of RAM holding base content (`fill`: what a real base carries
//! for its OS and runtime), an application δ on top (`load`: the model table), a RAM counter
//! that a client has changed (`incr`), and the page dirtier running at a steady rate
//! (`dirty`) throughout.
//!
//! Each side is one function measuring one handoff of that scenario over a given pair, both
//! run on fresh pairs in the same loop so drift hits both alike:
//! - [`qemu_run`]: QEMU live migration (pre-copy, QEMU's default 300 ms downtime limit, its
//!   bandwidth limit raised so it does not cap the link), the source QEMU in namespace A, the
//!   destination (`-incoming tcp:`) in B; QEMU's own `total-time` and `downtime` from
//!   `query-migrate`; the guest set up on its console (`fill`, `load`, `incr`, `dirty`);
//! - [`ours_run`]: the vmm's handoff. The base is built with the base content in it
//!   (`fill` run at boot, before the base snapshot: what both appliances hold), the δ is an
//!   overlay (`load`); `vmm synthesize` in A, `vmm receive` in B, `vmm handoff` while the
//!   dirtier runs and a client keeps calling `count` on A's endpoint and, when that breaks,
//!   moves to B's by itself. Figures: the vmm's own downtime (source pause → target
//!   `Resumed`) and total, its bytes, the client's gap (last verified reply from A → first
//!   from B), and bytes over (the overlay's size, standing for the compressed δ, + the pages
//!   the dirtier wrote during the handoff, raw); `ratio_*_vs_qemu` is QEMU's median over
//!   ours (how many times faster).
//!
//! After every handoff the destination's guest must answer with its state intact: the
//! counter's value, the base content's and the model's sums (`check`), and a dirtier still
//! running at its rate, all checked against `micro_service::oracle`.
//!
//! Where this machine cannot show something it says so: there is no second host (the two
//! appliances share its 2 cores), and the kernel has no netem, so the link is a token bucket
//! at the rate with no added delay or loss (see `netlab`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use micro_service::client::Client;
use micro_service::oracle;
use netlab::{Ns, Pair, Shape};

use super::child::Proc;
use super::qmp::Qmp;
use super::stats::median;
use crate::util::{cargo, ensure_programs, require_kvm, run, step, target_dir};

/// The scenario both sides move: the same guest, content, writer and links.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Link rates, Mbit/s.
    pub rates_mbit: Vec<u64>,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// Base content (`fill`), MiB.
    pub base_mib: u64,
    /// Application δ on top (`load`), MiB.
    pub delta_mib: u64,
    /// The dirtier's steady rate, pages per second.
    pub dirty_pages_per_s: u64,
    /// How often the client increments the counter before the handoff.
    pub increments: u64,
    /// The rate whose figures are also reported under the plain names.
    pub headline_mbit: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            rates_mbit: vec![25, 100, 1000],
            mem_mib: 256,
            base_mib: 64,
            delta_mib: 16,
            // 1 MiB/s of dirtied pages (8.4 Mbit/s): converges on every link of the scenario.
            dirty_pages_per_s: 256,
            increments: 7,
            headline_mbit: 100,
        }
    }
}

/// What one handoff measured.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// From the start of the handoff to the target running, ms.
    pub total_ms: f64,
    /// The guest's pause, ms (as the side reports it).
    pub downtime_ms: f64,
    /// Bytes the side says it sent (its payload).
    pub bytes: u64,
    /// Bytes that went over the link from the source, as the veth counts them (Ethernet
    /// frames; a segmentation-offloaded frame counts its headers once).
    pub wire_bytes: u64,
}

/// Longest a handoff may take (25 Mbit/s moves 80 MiB in about 27 s).
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a boot or a console reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// The destination QEMU's migration port (in namespace B).
const MIGRATION_PORT: u16 = 4444;
/// How long the dirtier runs before the handoff starts, so it starts from a steady state.
const WARM_UP: Duration = Duration::from_millis(500);

/// Sends `request` on a guest's console and returns the reply line (the next line starting
/// with `ok ` or `err `).
fn ask(console: &mut Proc, request: &str) -> Result<String> {
    console.send(&format!("{request}\n"));
    let (line, _) = console
        .wait_line(REPLY_TIMEOUT, |l| {
            l.starts_with("ok ") || l.starts_with("err ")
        })
        .with_context(|| format!("no reply to `{request}`"))?;
    Ok(line)
}

/// Fails unless `got` starts with `want`.
fn expect(request: &str, got: &str, want: &str) -> Result<()> {
    if !got.starts_with(want) {
        bail!("`{request}` answered {got:?}, expected {want:?}");
    }
    Ok(())
}

/// The oracle's sum of a content of so many MiB.
type OracleSum = fn(u64) -> u64;

/// Puts the scenario's state into a booted guest: base content, δ, counter, dirtier (each
/// reply checked against the oracle), then lets the dirtier warm up.
pub fn prepare_guest(console: &mut Proc, s: &Scenario) -> Result<()> {
    // The base content, then the δ: each reply names its size and the oracle's sum.
    let contents: [(&str, u64, OracleSum); 2] = [
        ("fill", s.base_mib, oracle::fill_sum),
        ("load", s.delta_mib, oracle::model_sum),
    ];
    for (verb, mib, sum) in contents {
        let request = format!("{verb} {mib}");
        let got = ask(console, &request)?;
        expect(
            &request,
            &got,
            &format!("ok {verb} mib={mib} sum={} ", sum(mib)),
        )?;
    }
    for n in 0..s.increments {
        expect("incr", &ask(console, "incr")?, &oracle::incr_reply(n))?;
    }
    let dirty = format!("dirty {}", s.dirty_pages_per_s);
    let got = ask(console, &dirty)?;
    if oracle::parse_dirty_reply(&got).map(|(r, _)| r) != Some(s.dirty_pages_per_s) {
        bail!("`{dirty}` answered {got:?}");
    }
    std::thread::sleep(WARM_UP);
    Ok(())
}

/// Checks the moved guest through `ask` (a request, its reply line): the counter, the base
/// content and δ intact, the dirtier still at its rate and writing.
pub fn check_moved_guest(ask: &mut dyn FnMut(&str) -> Result<String>, s: &Scenario) -> Result<()> {
    expect("count", &ask("count")?, &oracle::count_reply(s.increments))?;
    let got = ask("check")?;
    let want = oracle::check_reply(s.base_mib, s.delta_mib);
    if got != want {
        bail!("after the handoff `check` answered {got:?}, expected {want:?}");
    }
    let before = oracle::parse_dirty_reply(&ask("dirty")?);
    std::thread::sleep(Duration::from_millis(100));
    let after = oracle::parse_dirty_reply(&ask("dirty")?);
    match (before, after) {
        (Some((r, p0)), Some((_, p1))) if r == s.dirty_pages_per_s && p1 > p0 => Ok(()),
        _ => bail!("the dirtier is not running after the handoff: {before:?} then {after:?}"),
    }
}

/// A command running `cmd` (program and arguments) inside namespace `ns`.
fn inside(ns: &Ns, cmd: &Command) -> Command {
    let mut c = ns.command(cmd.get_program());
    c.args(cmd.get_args());
    c
}

/// QEMU's CPU model for a migratable guest that knows its TSC frequency: the host's CPU
/// with an invariant TSC at a fixed frequency (a set frequency is what lets QEMU migrate a
/// VM with invtsc), given to the guest in the hypervisor CPUID leaf. `arch-capabilities` is
/// off because this host's KVM refuses QEMU's write of that MSR.
fn qemu_cpu(tsc_hz: u64) -> String {
    format!("host,-arch-capabilities,+invtsc,tsc-frequency={tsc_hz},vmware-cpuid-freq=on")
}

/// The TSC frequency KVM gives a guest here, as QEMU reads it (a QEMU started paused).
fn kvm_tsc_hz(guest: &Path, dir: &Path) -> Result<u64> {
    let sock = dir.join("qmp-probe.sock");
    let _ = std::fs::remove_file(&sock);
    let p = Proc::spawn(
        super::qemu::microvm(guest, 64, "host,-arch-capabilities,+invtsc", &["-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display())),
    )?;
    let mut q = Qmp::connect(&sock)?;
    let hz = q.exec(
        r#"{"execute":"qom-get","arguments":{"path":"/machine/unattached/device[0]","property":"tsc-frequency"}}"#,
    )?;
    p.kill();
    hz.as_u64()
        .filter(|&hz| hz > 0)
        .with_context(|| format!("QEMU reports a TSC frequency of {hz}"))
}

/// One QEMU live migration of the scenario's guest from namespace A to B over `pair`.
pub fn qemu_run(
    s: &Scenario,
    guest: &Path,
    tsc_hz: u64,
    pair: &Pair,
    dir: &Path,
) -> Result<Measured> {
    let cpu = qemu_cpu(tsc_hz);
    let (src_sock, dst_sock) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    for p in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(p);
    }
    let qmp_arg = |p: &Path| format!("unix:{},server=on,wait=off", p.display());
    let incoming = format!("tcp:{}:{MIGRATION_PORT}", pair.b().addr());
    let mut dst = Proc::spawn(&mut inside(
        pair.b(),
        super::qemu::microvm(guest, s.mem_mib, &cpu, &[])
            .args(["-qmp", &qmp_arg(&dst_sock)])
            .args(["-incoming", &incoming]),
    ))?;
    let mut src = Proc::spawn(&mut inside(
        pair.a(),
        super::qemu::microvm(guest, s.mem_mib, &cpu, &[]).args(["-qmp", &qmp_arg(&src_sock)]),
    ))?;
    src.wait_line(REPLY_TIMEOUT, |l| l.starts_with("micro-guest"))
        .context("the source guest did not boot")?;
    prepare_guest(&mut src, s)?;
    // The destination listens once its monitor answers.
    let mut qd = Qmp::connect(&dst_sock)?;
    qd.exec(r#"{"execute":"query-migrate"}"#)?;
    let mut q = Qmp::connect(&src_sock)?;
    // QEMU's default downtime limit (300 ms) stays; its bandwidth limit must not cap the link.
    q.exec(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":10737418240}}"#)?;
    let (sent_before, _) = pair.a().link_bytes()?;
    q.exec(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#
    ))?;
    let deadline = Instant::now() + HANDOFF_TIMEOUT;
    let done = loop {
        let st = q.exec(r#"{"execute":"query-migrate"}"#)?;
        match st["status"].as_str() {
            Some("completed") => break st,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {st}"),
            _ if Instant::now() > deadline => {
                bail!("QEMU migration not done within {HANDOFF_TIMEOUT:?}: {st}")
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut measured = Measured {
        total_ms: done["total-time"].as_f64().context("no total-time")?,
        downtime_ms: done["downtime"].as_f64().context("no downtime")?,
        bytes: done["ram"]["transferred"].as_u64().unwrap_or(0),
        wire_bytes: 0,
    };
    // Input sent before the destination runs would be lost under the incoming device state.
    loop {
        let st = qd.exec(r#"{"execute":"query-status"}"#)?;
        if st["status"].as_str() == Some("running") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the destination QEMU does not run after the migration: {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Read once the destination runs: the last bytes may still sit in the link's queue
    // when the source calls the migration complete.
    measured.wire_bytes = pair.a().link_bytes()?.0 - sent_before;
    check_moved_guest(&mut |r| ask(&mut dst, r), s).context("the migrated guest")?;
    src.kill();
    dst.kill();
    Ok(measured)
}

/// The vmm's images of the scenario: a base booted to its ready point after `fill` (so the
/// base content is in the base, as an OS and runtime would be), an overlay that loads the
/// model on top (the application δ).
pub struct Images {
    /// target/release (vmm, image-builder).
    pub bin: PathBuf,
    /// The base directory.
    pub base: PathBuf,
    /// The `load` overlay.
    pub overlay: PathBuf,
    /// The overlay's size, bytes: the compressed δ (zstd chunks, index and machine state).
    pub overlay_bytes: u64,
}

/// Builds the release vmm and image-builder and the scenario's base and overlay under `dir`.
pub fn build_images(s: &Scenario, guest: &Path, dir: &Path) -> Result<Images> {
    step("building the release vmm and image-builder");
    run(cargo().args(["build", "--release", "-p", "image-builder"]))?;
    crate::util::build_release_vmm()?;
    let bin = target_dir().join("release");
    let base = dir.join("base");
    step(&format!(
        "making the base: {} MiB guest, `fill {}` run at boot (micro.run) before the snapshot",
        s.mem_mib, s.base_mib
    ));
    run(Command::new(bin.join("image-builder"))
        .args(["base", "--kernel"])
        .arg(guest)
        .arg("--out")
        .arg(&base)
        .args(["--mem", &s.mem_mib.to_string(), "--net", "--force"])
        .args([
            "--cmdline",
            &format!("console=ttyS0 micro.run=fill:{}", s.base_mib),
            "--ready",
            &format!("ok fill mib={} ", s.base_mib),
        ]))?;
    let overlay = dir.join("app.overlay");
    step(&format!(
        "making the application δ: overlay `load:{}`",
        s.delta_mib
    ));
    run(Command::new(bin.join("image-builder"))
        .args(["overlay", "--base"])
        .arg(&base)
        .args(["--script", &format!("load:{}", s.delta_mib), "--out"])
        .arg(&overlay))?;
    let overlay_bytes = std::fs::metadata(&overlay)?.len();
    Ok(Images {
        bin,
        base,
        overlay,
        overlay_bytes,
    })
}

/// The session token both vmms are given (the agents issue one per handoff).
const TOKEN: &str = "7e57ab1e7e57ab1e7e57ab1e7e57ab1e7e57ab1e7e57ab1e7e57ab1e7e57ab1e";
/// The guest service's port behind each appliance's forward.
const SERVICE_PORT: u16 = 8080;
/// The target vmm's handoff port (in namespace B).
const HANDOFF_PORT: u16 = 7070;
/// The client's timeout on each request and connection attempt.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between the client's requests (so it measures the gap to about a millisecond
/// without taking a core from the handoff).
const CLIENT_PACE: Duration = Duration::from_millis(1);
/// Verified replies the client collects from the target before it stops.
const CLIENT_AFTER: usize = 20;

/// What our handoff measured besides [`Measured`].
#[derive(Clone, Copy, Debug)]
pub struct OursMeasured {
    /// Total, downtime (the vmm's own: source pause → target `Resumed`), bytes, wire bytes.
    pub m: Measured,
    /// Last verified reply from the source to the first from the target, for the client
    /// that follows by itself, ms.
    pub client_gap_ms: f64,
    /// Pages the dirtier wrote during the handoff (its counter's difference).
    pub dirtied_pages: u64,
    /// Pre-copy rounds after the δ.
    pub rounds: u64,
}

/// A process of ours that is killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects to the guest service at `to` from inside `ns`.
fn service(ns: &Ns, to: SocketAddr) -> Result<Client> {
    let stream = ns
        .connect(to, CLIENT_TIMEOUT)
        .with_context(|| format!("cannot connect to {to} in {}", ns.name()))?;
    Ok(Client::from_stream(stream, CLIENT_TIMEOUT)?)
}

/// Waits until `ns` serves the guest at `to` (a verified `health`).
fn service_when_up(ns: &Ns, to: SocketAddr) -> Result<Client> {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let tried = service(ns, to).and_then(|mut c| {
            c.expect("health", "ok health")?;
            Ok(c)
        });
        match tried {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the guest at {to} does not answer")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Sends `request` and returns its reply.
fn ask_client(c: &mut Client, request: &str) -> Result<String> {
    c.request(request)
        .with_context(|| format!("no reply to `{request}`"))
}

/// Waits up to `within` until `file` holds a line containing `what`.
fn wait_in_file(file: &Path, what: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if std::fs::read_to_string(file).is_ok_and(|t| t.contains(what)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no `{what}` in {} within {within:?}", file.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The client that keeps calling the service and follows it by itself: `count` on the
/// source's endpoint (each reply checked against the oracle) until that connection breaks,
/// then on the target's endpoint until it answers. Returns (last verified reply from the
/// source, first from the target). Gives up if the source still answers 10 s after `done`.
fn follow(
    pair: &Pair,
    from: SocketAddr,
    to: SocketAddr,
    want: &str,
    done: &AtomicBool,
) -> Result<(Instant, Instant)> {
    let mut c = service(pair.a(), from)?;
    let mut last_a = None;
    let mut done_at = None;
    loop {
        match c.request("count") {
            Ok(r) if r == want => last_a = Some(Instant::now()),
            Ok(r) => bail!("the source answered `count` with {r:?}, expected {want:?}"),
            Err(_) => break,
        }
        if done.load(Ordering::Relaxed) {
            let at = *done_at.get_or_insert_with(Instant::now);
            if at.elapsed() > Duration::from_secs(10) {
                bail!("the source still answers 10 s after the handoff ended");
            }
        }
        std::thread::sleep(CLIENT_PACE);
    }
    let last_a = last_a.context("the source never answered the client")?;
    let deadline = Instant::now() + HANDOFF_TIMEOUT;
    let (mut c, first_b) = loop {
        let tried = service(pair.b(), to).and_then(|mut c| {
            let r = ask_client(&mut c, "count")?;
            Ok((c, r))
        });
        match tried {
            Ok((c, r)) if r == want => break (c, Instant::now()),
            Ok((_, r)) => bail!("the target answered `count` with {r:?}, expected {want:?}"),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the client never reached the target"))
            }
            Err(_) => std::thread::sleep(CLIENT_PACE),
        }
    };
    for _ in 0..CLIENT_AFTER {
        expect("count", &ask_client(&mut c, "count")?, want)?;
        std::thread::sleep(CLIENT_PACE);
    }
    Ok((last_a, first_b))
}

/// `handed off: N rounds, X MiB, downtime D ms, total T ms` → (rounds, bytes, downtime ms,
/// total ms).
fn parse_handed_off(line: &str) -> Option<(u64, u64, f64, f64)> {
    let rest = line.trim().strip_prefix("handed off: ")?;
    let mut parts = rest.split(", ");
    let rounds = parts.next()?.strip_suffix(" rounds")?.parse().ok()?;
    let mib: f64 = parts.next()?.strip_suffix(" MiB")?.parse().ok()?;
    let down = parts
        .next()?
        .strip_prefix("downtime ")?
        .strip_suffix(" ms")?;
    let total = parts.next()?.strip_prefix("total ")?.strip_suffix(" ms")?;
    Some((
        rounds,
        (mib * (1 << 20) as f64) as u64,
        down.parse().ok()?,
        total.parse().ok()?,
    ))
}

/// One handoff of the scenario's guest by our vmm from namespace A to B over `pair`: `vmm
/// synthesize` in A, `vmm receive` in B, `vmm handoff` while the dirtier runs and a client
/// keeps calling and follows; the moved guest is checked from inside B. Each vmm's `-v` log
/// is kept in `dir` (`src.log`, `dst.log`) for a look at where the time went.
pub fn ours_run(s: &Scenario, img: &Images, pair: &Pair, dir: &Path) -> Result<OursMeasured> {
    let vmm = img.bin.join("vmm");
    let (src_sock, dst_sock) = (dir.join("vm-src.sock"), dir.join("vm-dst.sock"));
    for p in [&src_sock, &dst_sock] {
        let _ = std::fs::remove_file(p);
    }
    let (src_log, dst_log) = (dir.join("src.log"), dir.join("dst.log"));
    let at_a = SocketAddr::from((pair.a().addr(), SERVICE_PORT));
    let at_b = SocketAddr::from((pair.b().addr(), SERVICE_PORT));
    let listen = SocketAddr::from((pair.b().addr(), HANDOFF_PORT));
    let forward = |at: SocketAddr| format!("{at}=10.0.2.15:80");

    let mut src = Killed(
        inside(
            pair.a(),
            Command::new(&vmm)
                .args(["-v", "synthesize", "--base"])
                .arg(&img.base)
                .arg("--overlay")
                .arg(&img.overlay)
                .arg("--api-sock")
                .arg(&src_sock)
                .args([
                    "--serial",
                    "null",
                    "--no-stdin",
                    "--forward",
                    &forward(at_a),
                ]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&src_log)?)
        .spawn()
        .context("cannot start vmm synthesize")?,
    );
    let mut c = service_when_up(pair.a(), at_a).context("the synthesised guest")?;
    for n in 0..s.increments {
        expect("incr", &ask_client(&mut c, "incr")?, &oracle::incr_reply(n))?;
    }
    let dirty = format!("dirty {}", s.dirty_pages_per_s);
    let got = ask_client(&mut c, &dirty)?;
    if oracle::parse_dirty_reply(&got).map(|(r, _)| r) != Some(s.dirty_pages_per_s) {
        bail!("`{dirty}` answered {got:?}");
    }

    let _dst = Killed(
        inside(
            pair.b(),
            Command::new(&vmm)
                .args(["-v", "receive", "--base"])
                .arg(&img.base)
                .args(["--listen", &listen.to_string()])
                .arg("--api-sock")
                .arg(&dst_sock)
                .args([
                    "--serial",
                    "null",
                    "--no-stdin",
                    "--forward",
                    &forward(at_b),
                ]),
        )
        .env("VMM_HANDOFF_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dst_log)?)
        .spawn()
        .context("cannot start vmm receive")?,
    );
    wait_in_file(&dst_log, "listening for a handoff", REPLY_TIMEOUT)
        .context("vmm receive does not listen")?;
    std::thread::sleep(WARM_UP);

    let want = oracle::count_reply(s.increments);
    let done = AtomicBool::new(false);
    let (followed, handed, p0) = std::thread::scope(|scope| {
        let client = scope.spawn(|| follow(pair, at_a, at_b, &want, &done));
        let mut run_handoff = || -> Result<(String, u64, u64)> {
            // The client's first replies come from the source.
            std::thread::sleep(Duration::from_millis(50));
            let p0 = oracle::parse_dirty_reply(&ask_client(&mut c, "dirty")?)
                .context("no dirtier count")?
                .1;
            let (sent_before, _) = pair.a().link_bytes()?;
            let out = Command::new(&vmm)
                .args(["handoff", "--api-sock"])
                .arg(&src_sock)
                .args(["--to", &listen.to_string(), "--downtime-ms", "20"])
                .env("VMM_HANDOFF_TOKEN", TOKEN)
                .output()
                .context("cannot run vmm handoff")?;
            if !out.status.success() {
                bail!(
                    "vmm handoff failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let wire = pair.a().link_bytes()?.0 - sent_before;
            Ok((String::from_utf8_lossy(&out.stdout).into_owned(), wire, p0))
        };
        let r = run_handoff();
        done.store(true, Ordering::Relaxed);
        let followed = client.join().expect("the client thread panicked");
        r.map(|(line, wire, p0)| (followed, (line, wire), p0))
    })?;
    let (last_a, first_b) = followed.context("the client that follows")?;
    let (line, wire_bytes) = handed;
    let (rounds, bytes, downtime_ms, total_ms) =
        parse_handed_off(&line).with_context(|| format!("vmm handoff printed {line:?}"))?;

    let mut b = service_when_up(pair.b(), at_b).context("the moved guest")?;
    let p1 = oracle::parse_dirty_reply(&ask_client(&mut b, "dirty")?)
        .context("no dirtier count on the target")?
        .1;
    check_moved_guest(&mut |r| ask_client(&mut b, r), s).context("the moved guest")?;
    // The source's vmm exits with 0 once the target runs the VM.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = src.0.try_wait()? {
            if !st.success() {
                bail!("the source vmm exited with {st} after the handoff");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the source vmm still runs 10 s after the handoff");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(OursMeasured {
        m: Measured {
            total_ms,
            downtime_ms,
            bytes,
            wire_bytes,
        },
        client_gap_ms: first_b.duration_since(last_a).as_secs_f64() * 1e3,
        dirtied_pages: p1.saturating_sub(p0),
        rounds,
    })
}

/// Adds the medians of `samples` to `figures` under `names` (total ms, downtime ms, MiB the
/// side sent, MiB on the wire), suffixed with `_<rate>mbit`, and also plain for the headline
/// rate.
fn report(
    figures: &mut Vec<(String, f64)>,
    names: [&str; 4],
    samples: &[Measured],
    rate: u64,
    headline: bool,
) {
    let p50 =
        |f: fn(&Measured) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    let values = [
        p50(|m| m.total_ms),
        p50(|m| m.downtime_ms),
        p50(|m| m.bytes as f64 / (1 << 20) as f64),
        p50(|m| m.wire_bytes as f64 / (1 << 20) as f64),
    ];
    for (name, v) in names.iter().zip(values) {
        figures.push((format!("{name}_{rate}mbit"), v));
        if headline {
            figures.push((name.to_string(), v));
        }
    }
}

/// Runs the benchmark and returns its figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    ensure_programs(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
    ])?;
    let s = Scenario::default();
    let guest = crate::guest::build()?;
    let dir = target_dir().join("bench-work/handoff");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tsc_hz = kvm_tsc_hz(&guest, &dir)?;
    let mut figures = vec![
        ("scenario_mem_mib".to_string(), s.mem_mib as f64),
        ("scenario_base_mib".to_string(), s.base_mib as f64),
        ("scenario_delta_mib".to_string(), s.delta_mib as f64),
        (
            "scenario_dirty_pages_per_s".to_string(),
            s.dirty_pages_per_s as f64,
        ),
    ];
    {
        // Whether the links had netem (else a token bucket: the rate, no delay or loss).
        let probe = Pair::new()?;
        figures.push((
            "link_netem".to_string(),
            f64::from(u8::from(probe.has_netem())),
        ));
    }
    let img = build_images(&s, &guest, &dir)?;
    figures.push((
        "delta_overlay_mib".to_string(),
        img.overlay_bytes as f64 / (1 << 20) as f64,
    ));
    for &rate in &s.rates_mbit {
        step(&format!(
            "{rate} Mbit/s: {runs} × (QEMU live migration, our handoff) of a {} MiB guest ({} MiB \
             base content, {} MiB δ, {} pages/s dirtied)",
            s.mem_mib, s.base_mib, s.delta_mib, s.dirty_pages_per_s
        ));
        let mut qemu = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..runs {
            let pair = Pair::new()?;
            pair.shape(Shape::mbit(rate))?;
            let m = qemu_run(&s, &guest, tsc_hz, &pair, &dir)
                .with_context(|| format!("QEMU live migration at {rate} Mbit/s"))?;
            eprintln!(
                "  QEMU: total {:.0} ms, downtime {:.0} ms, {:.1} MiB",
                m.total_ms,
                m.downtime_ms,
                m.bytes as f64 / (1 << 20) as f64
            );
            qemu.push(m);
            drop(pair);
            let pair = Pair::new()?;
            pair.shape(Shape::mbit(rate))?;
            let o = ours_run(&s, &img, &pair, &dir)
                .with_context(|| format!("our handoff at {rate} Mbit/s"))?;
            eprintln!(
                "  ours: total {:.0} ms, downtime {:.2} ms, client gap {:.1} ms, {:.2} MiB \
                 ({:.2} MiB on the wire), {} rounds, {} pages dirtied",
                o.m.total_ms,
                o.m.downtime_ms,
                o.client_gap_ms,
                o.m.bytes as f64 / (1 << 20) as f64,
                o.m.wire_bytes as f64 / (1 << 20) as f64,
                o.rounds,
                o.dirtied_pages
            );
            ours.push(o);
        }
        let headline = rate == s.headline_mbit;
        report(
            &mut figures,
            [
                "qemu_migration_total_p50_ms",
                "qemu_downtime_p50_ms",
                "qemu_bytes_mib",
                "qemu_wire_mib",
            ],
            &qemu,
            rate,
            headline,
        );
        let ours_m: Vec<Measured> = ours.iter().map(|o| o.m).collect();
        report(
            &mut figures,
            [
                "handoff_total_p50_ms",
                "handoff_downtime_p50_ms",
                "handoff_bytes_mib",
                "handoff_wire_mib",
            ],
            &ours_m,
            rate,
            headline,
        );
        let p50 = |v: Vec<f64>| median(&v).unwrap_or(0.0);
        // Bytes on the wire over what had to move at least: the compressed δ (the overlay's
        // size stands for it) plus the raw pages the dirtier wrote during the handoff.
        let ratio = |o: &OursMeasured| {
            o.m.bytes as f64 / (img.overlay_bytes + o.dirtied_pages * 4096) as f64
        };
        let extra = [
            (
                "handoff_client_gap_p50_ms",
                p50(ours.iter().map(|o| o.client_gap_ms).collect()),
            ),
            (
                "bytes_ratio_vs_delta_plus_dirty",
                p50(ours.iter().map(ratio).collect()),
            ),
            (
                "handoff_dirtied_mib",
                p50(ours
                    .iter()
                    .map(|o| (o.dirtied_pages * 4096) as f64 / (1 << 20) as f64)
                    .collect()),
            ),
            (
                "handoff_rounds_p50",
                p50(ours.iter().map(|o| o.rounds as f64).collect()),
            ),
            (
                "ratio_total_vs_qemu",
                p50(qemu.iter().map(|m| m.total_ms).collect())
                    / p50(ours.iter().map(|o| o.m.total_ms).collect()),
            ),
            (
                "ratio_downtime_vs_qemu",
                p50(qemu.iter().map(|m| m.downtime_ms).collect())
                    / p50(ours.iter().map(|o| o.m.downtime_ms).collect()),
            ),
        ];
        for (name, v) in extra {
            figures.push((format!("{name}_{rate}mbit"), v));
            if headline {
                figures.push((name.to_string(), v));
            }
        }
    }
    Ok(figures)
}
