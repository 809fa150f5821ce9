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
//! Each side is one function measuring one handoff of that scenario over a given pair:
//! - [`qemu_run`]: QEMU live migration (pre-copy, QEMU's default 300 ms downtime limit, its
//!   bandwidth limit raised so it does not cap the link), the source QEMU in namespace A, the
//!   destination (`-incoming tcp:`) in B; QEMU's own `total-time` and `downtime` from
//!   `query-migrate`;
//! - ours goes beside it (the vmm's handoff), run on a fresh pair in the same loop so drift
//!   hits both alike.
//!
//! After every handoff the destination's guest must answer with its state intact: the
//! counter's value, the base content's and the model's sums (`check`), and a dirtier still
//! running at its rate, all checked against `micro_service::oracle`.
//!
//! Where this machine cannot show something it says so: there is no second host (the two
//! appliances share its 2 cores), and the kernel has no netem, so the link is a token bucket
//! at the rate with no added delay or loss (see `netlab`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use micro_service::oracle;
use netlab::{Ns, Pair, Shape};

use super::child::Proc;
use super::qmp::Qmp;
use super::stats::median;
use crate::util::{ensure_programs, require_kvm, step, target_dir};

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

/// Checks the moved guest: the counter, the base content and δ intact, the dirtier still at
/// its rate and writing.
pub fn check_moved_guest(console: &mut Proc, s: &Scenario) -> Result<()> {
    expect(
        "count",
        &ask(console, "count")?,
        &oracle::count_reply(s.increments),
    )?;
    let got = ask(console, "check")?;
    let want = oracle::check_reply(s.base_mib, s.delta_mib);
    if got != want {
        bail!("after the handoff `check` answered {got:?}, expected {want:?}");
    }
    let before = oracle::parse_dirty_reply(&ask(console, "dirty")?);
    std::thread::sleep(Duration::from_millis(100));
    let after = oracle::parse_dirty_reply(&ask(console, "dirty")?);
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
    check_moved_guest(&mut dst, s).context("the migrated guest")?;
    src.kill();
    dst.kill();
    Ok(measured)
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
    for &rate in &s.rates_mbit {
        step(&format!(
            "{rate} Mbit/s: {runs} QEMU live migrations of a {} MiB guest ({} MiB base content, \
             {} MiB δ, {} pages/s dirtied)",
            s.mem_mib, s.base_mib, s.delta_mib, s.dirty_pages_per_s
        ));
        let mut qemu = Vec::new();
        for _ in 0..runs {
            let pair = Pair::new()?;
            pair.shape(Shape::mbit(rate))?;
            let m = qemu_run(&s, &guest, tsc_hz, &pair, &dir)
                .with_context(|| format!("QEMU live migration at {rate} Mbit/s"))?;
            eprint!(" {:.0}/{:.0} ms", m.total_ms, m.downtime_ms);
            qemu.push(m);
        }
        eprintln!();
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
            rate == s.headline_mbit,
        );
    }
    Ok(figures)
}
