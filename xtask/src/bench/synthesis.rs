//! `cargo xtask bench synthesis`: base + overlay → first correct service reply, for δ of 1,
//! 16 and 64 MiB (the guest's model table) on a 256 MiB guest; beside it, in the same run:
//!
//! - QEMU (microvm, KVM) restoring the same guest state from a migration file
//!   (`-incoming "exec:cat FILE"`, the file written by QMP `migrate` from a QEMU that ran the
//!   same micro guest and loaded the same model) to the same first reply;
//! - the same synthesis jailed as the agent starts it (`--jail`, born pid 1 of a pid
//!   namespace of its own; see vmm::jail): `synthesis_jailed_*` and `jail_added_*_ms`;
//! - overlay creation versus Elijah's method (xdelta3 against the base, then xz/LZMA) on the
//!   same pair of RAM images.
//!
//! "First correct reply": the client sends `query 5` every 5 ms from process start and stops
//! the clock at the first `ok query i=5 value=<entry 5>` line. Both VMMs give the guest a
//! virtio console on stdio (the base is built with `--console`; QEMU gets virtio-serial with
//! a virtconsole), which the micro guest uses instead of its 16550 when present.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::child::Proc;
use super::qmp::Qmp;
use super::stats::{median, percentile};
use crate::util::{cargo, ensure_programs, require_kvm, run, step, target_dir};

const MEM_MIB: u64 = 256;
const DELTAS_MIB: [u64; 3] = [1, 16, 64];
const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `query 5` every 5 ms until the correct reply; returns the time since `t0` in ms.
fn first_reply(p: &mut Proc, t0: Instant) -> Result<f64> {
    let want = micro_service::oracle::query_reply(5);
    let deadline = t0 + TIMEOUT;
    loop {
        p.send("query 5\n");
        match p.lines.recv_timeout(Duration::from_millis(5)) {
            Ok((l, at)) if l == want => return Ok((at - t0).as_secs_f64() * 1e3),
            Ok((l, _)) if l.starts_with("ok query") => bail!("wrong answer: {l}"),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("no correct reply within {TIMEOUT:?}");
        }
    }
}

fn qemu(guest: &Path) -> Command {
    // No invtsc here: it blocks migration. The console is a virtio console, as in our base.
    super::qemu::microvm_console(guest, MEM_MIB, "host,-arch-capabilities", &[])
}

/// Boots the guest in QEMU, loads a `mib` MiB model and migrates it into `file`.
fn qemu_migration_file(guest: &Path, mib: u64, dir: &Path) -> Result<PathBuf> {
    let sock = dir.join(format!("qmp-{mib}.sock"));
    let file = dir.join(format!("qemu-{mib}mib.mig"));
    let _ = std::fs::remove_file(&sock);
    let mut p = Proc::spawn(
        qemu(guest)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display())),
    )?;
    p.wait_line(TIMEOUT, |l| l.starts_with("micro-guest"))?;
    p.send(&format!("load {mib}\n"));
    p.wait_line(TIMEOUT, |l| l.starts_with("ok load"))?;
    let mut q = Qmp::connect(&sock)?;
    q.exec(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        file.display()
    ))?;
    loop {
        let st = q.exec(r#"{"execute":"query-migrate"}"#)?;
        match st["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {st}"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    p.kill();
    Ok(file)
}

fn mib_of(path: &Path) -> f64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t0 = Instant::now();
    run(cmd.stdout(Stdio::null()))?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Runs the benchmark and returns its figures.
pub fn run_bench(runs: usize) -> Result<Vec<(String, f64)>> {
    require_kvm()?;
    ensure_programs(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("xdelta3", "xdelta3"),
        ("xz", "xz-utils"),
    ])?;
    let guest = crate::guest::build()?;
    step("building vmm and image-builder (release)");
    run(cargo().args(["build", "--release", "-p", "image-builder"]))?;
    crate::util::build_release_vmm()?;
    let bin = target_dir().join("release");
    let (vmm, ib) = (bin.join("vmm"), bin.join("image-builder"));
    let work = target_dir().join("bench-work/synthesis");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let base = work.join("base");

    let mut figures: Vec<(String, f64)> = Vec::new();
    step(&format!("base image: micro guest, {MEM_MIB} MiB RAM"));
    run(Command::new(&ib)
        .args(["base", "--console", "--kernel"])
        .arg(&guest)
        .arg("--out")
        .arg(&base)
        .args(["--mem", &MEM_MIB.to_string()]))?;
    let base_bytes: u64 = ["base.json", "kernel", "state", "memory"]
        .iter()
        .map(|n| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(base.join(n))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        })
        .sum();
    figures.push((
        "base_image_mib".into(),
        base_bytes as f64 / (1 << 20) as f64,
    ));

    for mib in DELTAS_MIB {
        step(&format!(
            "δ {mib} MiB: overlay, {runs} syntheses, QEMU migration file and {runs} restores"
        ));
        let custom = work.join(format!("custom-{mib}"));
        let overlay = work.join(format!("model-{mib}.overlay"));
        run(Command::new(&ib)
            .arg("overlay")
            .arg("--base")
            .arg(&base)
            .arg("--script")
            .arg(format!("load:{mib}"))
            .arg("--keep-snapshot")
            .arg(&custom)
            .arg("--out")
            .arg(&overlay)
            .stdout(Stdio::null()))?;
        figures.push((format!("overlay_{mib}mib_mib"), mib_of(&overlay)));
        let mig = qemu_migration_file(&guest, mib, &work)?;
        figures.push((format!("qemu_migration_file_{mib}mib_mib"), mib_of(&mig)));

        let (mut ours, mut eager, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        let mut jailed = Vec::new();
        let inst = work.join(format!("jail-{mib}"));
        std::fs::create_dir_all(&inst)?;
        let jail_id = agent::jail::UID_BASE + agent::jail::UID_RANGE + 1;
        let jail_args = [
            "--confine".into(),
            inst.clone().into_os_string(),
            "--jail".into(),
            format!("{jail_id}:{jail_id}").into(),
        ];
        for _ in 0..runs {
            // Lazy (the default), then lazy jailed as the agent starts it (pid 1 of its own
            // pid namespace, `--jail`: see vmm::jail), then eager (--eager: the whole overlay
            // applied before the vCPUs start), then QEMU: interleaved so drift hits all alike.
            for (mode, jail, out) in [
                (None, false, &mut ours),
                (None, true, &mut jailed),
                (Some("--eager"), false, &mut eager),
            ] {
                let mut cmd = Command::new(&vmm);
                cmd.arg("synthesize")
                    .arg("--base")
                    .arg(&base)
                    .arg("--overlay")
                    .arg(&overlay)
                    .args(mode);
                if jail {
                    cmd.args(&jail_args);
                }
                let t0 = Instant::now();
                let mut p = if jail {
                    Proc::spawn_in_namespaces(&mut cmd)?
                } else {
                    Proc::spawn(&mut cmd)?
                };
                out.push(first_reply(&mut p, t0)?);
                p.kill();
            }
            let t0 = Instant::now();
            let mut q = Proc::spawn(
                qemu(&guest)
                    .arg("-incoming")
                    .arg(format!("exec:cat {}", mig.display())),
            )?;
            theirs.push(first_reply(&mut q, t0)?);
            q.kill();
            eprint!(".");
        }
        eprintln!();
        let p99 = |v: &[f64]| percentile(v, 99.0).unwrap_or(0.0);
        let (o50, o99) = (median(&ours).unwrap_or(0.0), p99(&ours));
        let q50 = median(&theirs).unwrap_or(0.0);
        let ratio = if o50 > 0.0 { q50 / o50 } else { 0.0 };
        let j50 = median(&jailed).unwrap_or(0.0);
        figures.extend([
            (format!("synthesis_{mib}mib_p50_ms"), o50),
            (format!("synthesis_{mib}mib_p99_ms"), o99),
            (format!("synthesis_jailed_{mib}mib_p50_ms"), j50),
            (format!("synthesis_jailed_{mib}mib_p99_ms"), p99(&jailed)),
            (format!("jail_added_{mib}mib_ms"), j50 - o50),
            (
                format!("synthesis_eager_{mib}mib_p50_ms"),
                median(&eager).unwrap_or(0.0),
            ),
            (format!("qemu_restore_{mib}mib_p50_ms"), q50),
            (format!("qemu_restore_{mib}mib_p99_ms"), p99(&theirs)),
            (format!("ratio_vs_qemu_{mib}mib"), ratio),
        ]);

        if mib == 16 {
            // The headline figures are the 16 MiB ones.
            figures.extend([
                ("synthesis_p50_ms".into(), o50),
                ("synthesis_p99_ms".into(), o99),
                ("synthesis_jailed_p50_ms".into(), j50),
                ("jail_added_ms".into(), j50 - o50),
                ("ratio_vs_qemu".into(), ratio),
            ]);
            step("overlay creation: ours vs xdelta3 + xz (Elijah's method), same RAM images");
            let ours_out = work.join("again.overlay");
            let mut build = Vec::new();
            for _ in 0..5 {
                build.push(timed(
                    Command::new(&ib)
                        .arg("overlay")
                        .arg("--base")
                        .arg(&base)
                        .arg("--from")
                        .arg(&custom)
                        .arg("--out")
                        .arg(&ours_out),
                )?);
            }
            let delta = work.join("elijah.vcdiff");
            // No secondary compression in xdelta3: Elijah compresses the delta with LZMA.
            let t_x = timed(
                Command::new("xdelta3")
                    .args(["-e", "-f", "-S", "none", "-s"])
                    .arg(base.join("memory"))
                    .arg(custom.join("memory"))
                    .arg(&delta),
            )?;
            let t_z = timed(
                Command::new("xz")
                    .args(["-9", "-k", "-f", "-T1"])
                    .arg(&delta),
            )?;
            let theirs_mib = mib_of(&work.join("elijah.vcdiff.xz"));
            let ours_mib = mib_of(&ours_out);
            let ours_ms = median(&build).unwrap_or(0.0);
            figures.push(("overlay_build_ms".into(), ours_ms));
            figures.push(("xdelta3_lzma_build_ms".into(), t_x + t_z));
            figures.push(("xdelta3_lzma_overlay_mib".into(), theirs_mib));
            figures.push((
                "overlay_size_ratio_vs_xdelta3_lzma".into(),
                ours_mib / theirs_mib,
            ));
            figures.push((
                "overlay_build_speedup_vs_xdelta3_lzma".into(),
                (t_x + t_z) / ours_ms.max(1e-3),
            ));
        }
    }
    Ok(figures)
}
