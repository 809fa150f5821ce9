//! `cargo xtask bench linux`: the Linux service-VM base — its size (`linux_base_mib`: kernel
//! plus root filesystem, budget 8), what its recipe cost (`linux_recipe_s`: the kernel from
//! the cache or built, plus the root filesystem) — and its boot under QEMU with TCG (KVM here
//! cannot run a Linux kernel): QEMU start → `cloudlet-linux ready` on the console, and →
//! the first verified answer through a forwarded port. The micro guest under the same QEMU
//! TCG is measured in the same run, interleaved, as the peer.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use micro_service::client::Client;

use super::child::Proc;
use super::stats::{median, percentile};
use crate::util::{ensure_programs, step};

const TIMEOUT: Duration = Duration::from_secs(120);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// QEMU microvm under TCG for `kernel` with `cmdline`, a NIC forwarding `port` to the
/// guest's port 80, and `extra` devices.
fn qemu_tcg(kernel: &Path, cmdline: &str, port: u16, extra: &[String]) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
    ])
    .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio"])
    .args(["-device", "isa-debug-exit,iobase=0x501,iosize=2"])
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .args(extra)
    .args([
        "-netdev",
        &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"),
    ])
    .args(["-device", "virtio-net-device,netdev=n0"])
    .arg("-kernel")
    .arg(kernel)
    .args(["-append", cmdline]);
    c
}

/// One boot: (ms to the ready line, ms to the first verified answer).
fn boot(mut cmd: Command, ready: &str, port: u16) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut p = Proc::spawn(&mut cmd)?;
    let at = match p.wait_line(TIMEOUT, |l| l.contains(ready)) {
        Ok((_, at)) => at,
        Err(e) => {
            p.kill();
            return Err(e.context(format!("no `{ready}` from {cmd:?}")));
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let answered =
        Client::connect_when_up(addr, TIMEOUT, Duration::from_secs(5)).and_then(|mut c| {
            c.expect(
                "query 0",
                "err query 0 is beyond the loaded table (0 entries; use load first)",
            )
            .map(|_| c)
        });
    let first = t0.elapsed();
    let r = answered.map(|mut c| c.expect("poweroff 0", "ok poweroff code=0"));
    p.kill();
    r.context("the service did not answer")?
        .context("poweroff")?;
    Ok(((at - t0).as_secs_f64() * 1e3, first.as_secs_f64() * 1e3))
}

/// Runs the benchmark and returns its figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    ensure_programs(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let t = Instant::now();
    let base = crate::linux_base::build()?;
    let recipe_s = t.elapsed().as_secs_f64();
    let guest = crate::guest::build()?;
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(
        base.vmlinux.with_file_name("linux-base.json"),
    )?)?;
    let cmdline = std::fs::read_to_string(base.vmlinux.with_file_name("cmdline"))?;
    let root = [
        "-drive".to_string(),
        format!(
            "id=root,file={},format=raw,if=none,readonly=on",
            base.rootfs.display()
        ),
        "-device".to_string(),
        "virtio-blk-device,drive=root".to_string(),
    ];
    step(&format!(
        "{runs} boots each of the Linux base and the micro guest under QEMU TCG, interleaved"
    ));
    let (mut lr, mut la, mut mr, mut ma) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let port = free_port()?;
        let (r, a) = boot(
            qemu_tcg(&base.vmlinux, cmdline.trim(), port, &root),
            crate::linux_base::READY,
            port,
        )?;
        lr.push(r);
        la.push(a);
        let port = free_port()?;
        // The micro guest's NIC on the same user-mode network; it answers on port 80.
        let (r, a) = boot(
            qemu_tcg(&guest, "console=ttyS0", port, &[]),
            "micro-guest",
            port,
        )?;
        mr.push(r);
        ma.push(a);
        eprint!(".");
    }
    eprintln!();
    let p50 = |v: &[f64]| median(v).unwrap_or(0.0);
    let p99 = |v: &[f64]| percentile(v, 99.0).unwrap_or(0.0);
    let num = |k: &str| report.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    Ok(vec![
        ("linux_base_mib".into(), base.mib),
        (
            "linux_kernel_mib".into(),
            num("kernel_bytes") / (1 << 20) as f64,
        ),
        (
            "linux_rootfs_mib".into(),
            num("rootfs_bytes") / (1 << 20) as f64,
        ),
        ("linux_recipe_s".into(), recipe_s),
        ("linux_tcg_ready_p50_ms".into(), p50(&lr)),
        ("linux_tcg_first_answer_p50_ms".into(), p50(&la)),
        ("linux_tcg_first_answer_p99_ms".into(), p99(&la)),
        ("micro_tcg_banner_p50_ms".into(), p50(&mr)),
        ("micro_tcg_first_answer_p50_ms".into(), p50(&ma)),
        (
            "ratio_linux_vs_micro_first_answer".into(),
            p50(&la) / p50(&ma).max(1e-9),
        ),
    ])
}
