//! `cargo xtask bench boot`: process start → the micro guest's banner on serial, for our
//! `vmm` and, interleaved in the same run on the same ELF, QEMU (`-M microvm -enable-kvm
//! -kernel`, entered through the guest's PVH note). Also the VMM's memory overhead: its RSS
//! minus the guest memory actually touched (the RSS of the guest RAM mapping, read from
//! /proc/PID/smaps while the guest idles after its banner).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::child::Proc;
use super::stats::{median, percentile};
use crate::util::{ensure_programs, require_kvm, step, target_dir};

const MEM_MIB: u64 = 128;
const BANNER: &str = "micro-guest";
const TIMEOUT: Duration = Duration::from_secs(20);

/// One boot: time to the banner, the guest's own boot time, and memory figures.
struct Sample {
    to_banner_ms: f64,
    guest_boot_us: Option<f64>,
    rss_kib: u64,
    guest_rss_kib: u64,
}

/// Starts `cmd` and waits for the banner line; leaves the process running.
fn boot_until_banner(cmd: &mut Command) -> Result<(Proc, Sample)> {
    let t0 = Instant::now();
    let mut p = Proc::spawn(cmd)?;
    let (line, at) = match p.wait_line(TIMEOUT, |l| l.contains(BANNER)) {
        Ok(r) => r,
        Err(e) => {
            p.kill();
            return Err(e.context(format!("no banner from {cmd:?}")));
        }
    };
    let guest_boot_us = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("boot_us="))
        .and_then(|v| v.parse().ok());
    let (rss_kib, guest_rss_kib) = rss_of(p.child.id(), MEM_MIB * 1024).unwrap_or((0, 0));
    let sample = Sample {
        to_banner_ms: (at - t0).as_secs_f64() * 1e3,
        guest_boot_us,
        rss_kib,
        guest_rss_kib,
    };
    Ok((p, sample))
}

/// Total RSS of `pid` and the RSS of its anonymous mapping of exactly `guest_kib` (the guest
/// RAM), in KiB, from /proc/PID/smaps.
fn rss_of(pid: u32, guest_kib: u64) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut guest) = (0, 0);
    let (mut size, mut anon) = (0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // Mapping header: address range, perms, offset, dev, inode, [path].
            anon = words.nth(4).is_none();
        } else if first == "Size:" {
            size = words.next()?.parse().ok()?;
        } else if first == "Rss:" {
            let rss: u64 = words.next()?.parse().ok()?;
            total += rss;
            if anon && size == guest_kib {
                guest += rss;
            }
        }
    }
    Some((total, guest))
}

fn ours(vmm: &Path, guest: &Path) -> Command {
    let mut c = Command::new(vmm);
    c.arg("run").arg("--kernel").arg(guest).args([
        "--mem",
        &MEM_MIB.to_string(),
        "--cmdline",
        "console=ttyS0",
    ]);
    c
}

fn qemu(guest: &Path) -> Command {
    // Invariant TSC with the frequency in CPUID 0x40000010, so the guest reports its boot time
    // in µs under QEMU as under our vmm; isa-debug-exit so `poweroff` ends QEMU.
    super::qemu::microvm(
        guest,
        MEM_MIB,
        "host,-arch-capabilities,+invtsc,vmware-cpuid-freq=on",
        &["-device", "isa-debug-exit,iobase=0x501,iosize=2"],
    )
}

/// Runs the benchmark and returns its figures.
pub fn run(runs: usize) -> Result<Vec<(&'static str, f64)>> {
    require_kvm()?;
    ensure_programs(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let guest = crate::guest::build()?;
    step("building the vmm (release)");
    crate::util::build_release_vmm()?;
    let vmm = target_dir().join("release/vmm");
    // A broken QEMU install is reported before the loop.
    crate::util::run(
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null()),
    )?;

    step(&format!(
        "{runs} boots each of our vmm and QEMU microvm, interleaved"
    ));
    let (mut ours_s, mut qemu_s) = (Vec::new(), Vec::new());
    // One warm-up each so both start from a warm page cache.
    for warm in [true].into_iter().chain(std::iter::repeat_n(false, runs)) {
        let (child, s) = boot_until_banner(&mut ours(&vmm, &guest))?;
        child.stop("poweroff 0\n");
        let (child, q) = boot_until_banner(&mut qemu(&guest))?;
        child.stop("poweroff 0\n");
        if !warm {
            ours_s.push(s);
            qemu_s.push(q);
            eprint!(".");
        }
    }
    eprintln!();

    let ms = |v: &[Sample]| v.iter().map(|s| s.to_banner_ms).collect::<Vec<_>>();
    let (o, q) = (ms(&ours_s), ms(&qemu_s));
    let o50 = median(&o).unwrap_or(0.0);
    let q50 = median(&q).unwrap_or(0.0);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let overhead: Vec<f64> = ours_s
        .iter()
        .map(|s| mib(s.rss_kib.saturating_sub(s.guest_rss_kib)))
        .collect();
    let rss: Vec<f64> = ours_s.iter().map(|s| mib(s.rss_kib)).collect();
    let touched: Vec<f64> = ours_s.iter().map(|s| mib(s.guest_rss_kib)).collect();
    let qemu_overhead: Vec<f64> = qemu_s
        .iter()
        .map(|s| mib(s.rss_kib.saturating_sub(s.guest_rss_kib)))
        .collect();
    let guest_us: Vec<f64> = ours_s.iter().filter_map(|s| s.guest_boot_us).collect();
    let qemu_guest_us: Vec<f64> = qemu_s.iter().filter_map(|s| s.guest_boot_us).collect();
    Ok(vec![
        ("boot_to_banner_p50_ms", o50),
        ("boot_to_banner_p99_ms", percentile(&o, 99.0).unwrap_or(0.0)),
        ("qemu_boot_to_banner_p50_ms", q50),
        (
            "qemu_boot_to_banner_p99_ms",
            percentile(&q, 99.0).unwrap_or(0.0),
        ),
        ("ratio_vs_qemu", if o50 > 0.0 { q50 / o50 } else { 0.0 }),
        (
            "guest_entry_to_banner_p50_us",
            median(&guest_us).unwrap_or(0.0),
        ),
        (
            "qemu_guest_entry_to_banner_p50_us",
            median(&qemu_guest_us).unwrap_or(0.0),
        ),
        ("vmm_overhead_rss_mib", median(&overhead).unwrap_or(0.0)),
        ("vmm_rss_mib", median(&rss).unwrap_or(0.0)),
        ("guest_touched_mib", median(&touched).unwrap_or(0.0)),
        (
            "qemu_overhead_rss_mib",
            median(&qemu_overhead).unwrap_or(0.0),
        ),
    ])
}
