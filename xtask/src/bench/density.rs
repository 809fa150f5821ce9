//! `cargo xtask bench density`: how many service VMs of one service this machine holds at
//! once, all answering.
//!
//! The sample service of `cargo xtask demo` (a 16 MiB model in a 256 MiB guest) gets its
//! shared RAM image (`vmm ram-image`); then `vmm synthesize` processes of it start one after
//! another until [`MAX_VMS`] run, the host's available memory falls to [`RESERVE_MIB`], or a
//! start fails. Every VM then answers a verified request (`query 5` on a fresh connection),
//! timed. Reported:
//!
//! - `density_vms`: VMs running at once, every one answering;
//! - `mib_per_vm`: their PSS (`/proc/PID/smaps_rollup`: shared pages counted once), per VM;
//! - `host_mib_per_vm`: the drop of the host's `MemAvailable` per VM (the kernel's share too:
//!   KVM's structures, page tables);
//! - `starts_per_s`: spawn → Ready, back to back;
//! - `request_p50_ms` / `request_p99_ms`: connect + verified request with all of them up;
//! - `unshared_mib_per_vm`: PSS per VM of [`UNSHARED_VMS`] VMs of the same service without
//!   the image (each applies the overlay itself), measured in the same run: the peer;
//! - `ksm_on`: 1 when KSM was merging pages (it should be off: sharing here is by design).
//!
//! The agent's board limits count each VM's nominal guest RAM, so this runs the vmms
//! directly: it measures what the machine holds, not what a board config allows.

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use format::control::{read_frame, Report};

use super::stats::{median, percentile};
use crate::demo::{model_entry, prepare, Guest};
use crate::util::{require_kvm, step, target_dir};

/// At most this many VMs.
const MAX_VMS: usize = 1500;
/// Stop starting VMs when the host has this little memory available, MiB.
const RESERVE_MIB: u64 = 2048;
/// VMs of the peer configuration (no shared image).
const UNSHARED_VMS: usize = 40;

/// One running VM.
struct Vm {
    child: Child,
    /// Its report channel (kept open: its end of file is the VM's end).
    _report: UnixStream,
    endpoint: String,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `MemAvailable` of the host, KiB.
fn mem_available_kib() -> Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo")?;
    m.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}

/// PSS of process `pid`, KiB.
fn pss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    s.lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .context("no Pss in smaps_rollup")
}

/// Starts `vmm synthesize` of `overlay` on `base` with a report channel; returns once Ready.
fn start(
    bin: &std::path::Path,
    base: &std::path::Path,
    overlay: &std::path::Path,
    n: usize,
) -> Result<Vm> {
    let (mut ours, theirs) = UnixStream::pair()?;
    let sock = target_dir().join(format!("bench/density-work/s/{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(bin.join("vmm"))
        .arg("synthesize")
        .arg("--base")
        .arg(base)
        .arg("--overlay")
        .arg(overlay)
        .args([
            "--forward",
            "127.0.0.1:0=10.0.2.15:80",
            "--serial",
            "/dev/null",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .args(["--report-fd", "0", "--no-stdin"])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run the vmm")?;
    let mut vm = Vm {
        child,
        _report: ours.try_clone()?,
        endpoint: String::new(),
    };
    ours.set_read_timeout(Some(Duration::from_secs(30)))?;
    match read_frame::<Report>(&mut ours) {
        Ok(Ok(Report::Ready(r))) => {
            let f = r.forwards.first().context("Ready without a forward")?;
            vm.endpoint = f.host.to_string();
            Ok(vm)
        }
        other => bail!("VM {n} did not come up: {other:?}"),
    }
}

/// Connect + `query 5` on every VM, verified; the times, ms.
fn requests(vms: &[Vm]) -> Result<Vec<f64>> {
    let want = format!("ok query i=5 value={}", model_entry(5));
    let mut times = Vec::with_capacity(vms.len());
    for (i, vm) in vms.iter().enumerate() {
        let t = Instant::now();
        let mut g = Guest::connect(&vm.endpoint)
            .with_context(|| format!("VM {i} at {} does not answer", vm.endpoint))?;
        g.expect("query 5", &want)
            .with_context(|| format!("VM {i} answered wrong"))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// Mean PSS of `vms`, MiB.
fn mean_pss_mib(vms: &[Vm]) -> Result<f64> {
    let mut sum = 0u64;
    for vm in vms {
        sum += pss_kib(vm.child.id())?;
    }
    Ok(sum as f64 / 1024.0 / vms.len() as f64)
}

/// Runs the benchmark; returns the named figures.
pub fn run_bench(_runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    let work = target_dir().join("bench/density-work");
    let p = prepare(&work)?;
    std::fs::create_dir_all(work.join("s"))?;
    let ksm_on = std::fs::read_to_string("/sys/kernel/mm/ksm/run")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);

    step(&format!(
        "peer: {UNSHARED_VMS} VMs applying the overlay each (no shared image)"
    ));
    let plain = work.join("plain.overlay");
    std::fs::copy(&p.overlay, &plain)?;
    let unshared = {
        let mut vms = Vec::new();
        for n in 0..UNSHARED_VMS {
            vms.push(start(&p.bin, &p.base, &plain, n)?);
        }
        requests(&vms)?;
        std::thread::sleep(Duration::from_secs(1));
        mean_pss_mib(&vms)?
    };

    step("writing the service's shared RAM image (vmm ram-image)");
    let shared = work.join("shared.overlay");
    std::fs::copy(&p.overlay, &shared)?;
    let out = Command::new(p.bin.join("vmm"))
        .args(["ram-image", "--base"])
        .arg(&p.base)
        .arg("--overlay")
        .arg(&shared)
        .output()?;
    if !out.status.success() {
        bail!(
            "vmm ram-image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    step(&format!(
        "starting VMs until {MAX_VMS}, {RESERVE_MIB} MiB of memory left, or a failure"
    ));
    let before = mem_available_kib()?;
    let t0 = Instant::now();
    let mut vms = Vec::new();
    let mut stopped_by = String::from("the limit of the benchmark");
    while vms.len() < MAX_VMS {
        if mem_available_kib()? / 1024 < RESERVE_MIB {
            stopped_by = "host memory".into();
            break;
        }
        match start(&p.bin, &p.base, &shared, UNSHARED_VMS + vms.len()) {
            Ok(vm) => vms.push(vm),
            Err(e) => {
                stopped_by = format!("a failed start: {e:#}");
                break;
            }
        }
        if vms.len() % 250 == 0 {
            step(&format!("{} VMs running", vms.len()));
        }
    }
    let starting = t0.elapsed();
    step(&format!(
        "{} VMs up (stopped by {stopped_by}); a verified request to each",
        vms.len()
    ));
    let times = requests(&vms)?;
    std::thread::sleep(Duration::from_secs(1));
    let after = mem_available_kib()?;
    let pss = mean_pss_mib(&vms)?;
    let n = vms.len() as f64;
    drop(vms);

    let m = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    Ok(vec![
        ("density_vms".into(), n),
        ("mib_per_vm".into(), pss),
        (
            "host_mib_per_vm".into(),
            before.saturating_sub(after) as f64 / 1024.0 / n,
        ),
        ("starts_per_s".into(), n / starting.as_secs_f64()),
        ("request_p50_ms".into(), m(&times)),
        (
            "request_p99_ms".into(),
            percentile(&times, 99.0).unwrap_or(f64::NAN),
        ),
        ("unshared_mib_per_vm".into(), unshared),
        ("pss_ratio_unshared_to_shared".into(), unshared / pss),
        ("ksm_on".into(), if ksm_on { 1.0 } else { 0.0 }),
    ])
}
