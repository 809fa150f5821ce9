//! The disk image's test: the raw image boots under QEMU (TCG: no KVM needed, UEFI firmware
//! OVMF, virtio disk) into a running agent, which answers `/v1/system` through a forwarded
//! port and is discovered over mDNS; a good update switches slots and keeps the data; a bad
//! update (an agent that fails to start) rolls back by itself and keeps the data.
//!
//! Everything runs in a network namespace of the test's own (netlab): QEMU with its user
//! network (the forwarded port, on the namespace's loopback) and a TAP device on which the
//! box's link-local address meets the discovery client. Nothing reaches the host's network.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util::{ensure_programs, run, step};

/// The firmware (Debian's `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The TAP device in the namespace and its link-local address.
const TAP: &str = "cltap0";
const TAP_ADDR: &str = "169.254.77.1/16";
/// Longest a boot may take to a serving agent under TCG before the test fails.
const BOOT_LIMIT: Duration = Duration::from_secs(240);
/// Longest an update may take from its upload to the box serving again (write the slot,
/// reboot; for a bad one also the failed boot and the fall-back boot).
const UPDATE_LIMIT: Duration = Duration::from_secs(600);

/// How much bigger than the image the test's disk is, MiB.
const GROWN_MIB: u64 = 512;

/// What the test measured, s.
#[derive(Debug, Default)]
pub struct Report {
    /// QEMU started → the agent answered `/v1/system` through the forwarded port.
    pub api_s: f64,
    /// QEMU started → the discovery client found the box over mDNS.
    pub mdns_s: f64,
    /// The agent answering → discovered.
    pub mdns_after_api_s: f64,
    /// Good update: the upload (the agent checks every part before it answers).
    pub upload_s: f64,
    /// Good update: accepted → the box rebooting (the updater writes and reads back the slot).
    pub apply_s: f64,
    /// Good update: rebooting → serving from the other slot, blessed.
    pub reboot_s: f64,
    /// Good update: upload accepted → serving from the other slot.
    pub good_update_s: f64,
    /// Bad update: upload accepted → serving again from the old slot, rolled back.
    pub rollback_s: f64,
    /// The whole test.
    pub total_s: f64,
}

/// A booted appliance in QEMU inside a namespace.
struct Qemu {
    pair: netlab::Pair,
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Qemu {
    fn ns(&self) -> &netlab::Ns {
        self.pair.a()
    }

    /// The serial console's last lines, for a failure's message.
    fn tail(&self) -> String {
        let t = std::fs::read(&self.log).unwrap_or_default();
        let t = String::from_utf8_lossy(&t);
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(disk: &Path, work: &Path, port: u16) -> Result<Qemu> {
    let pair = netlab::Pair::new().context("cannot make the test's network namespace")?;
    let ns = pair.a().name().to_string();
    run(Command::new("ip").args(["-n", &ns, "tuntap", "add", "dev", TAP, "mode", "tap"]))?;
    run(Command::new("ip").args(["-n", &ns, "addr", "add", TAP_ADDR, "dev", TAP]))?;
    run(Command::new("ip").args(["-n", &ns, "link", "set", TAP, "up"]))?;
    let vars = work.join("OVMF_VARS.fd");
    std::fs::copy(OVMF_VARS, &vars)?;
    let log = work.join("serial.log");
    let child = pair
        .a()
        .command("qemu-system-x86_64")
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max"])
        .args([
            "-m", "1536", "-smp", "2", "-display", "none", "-monitor", "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-netdev")
        .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{port}"))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-netdev")
        .arg(format!("tap,id=n1,ifname={TAP},script=no,downscript=no"))
        .args(["-device", "virtio-net-pci,netdev=n1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    Ok(Qemu {
        pair,
        child,
        log,
        started: Instant::now(),
    })
}

/// `GET /v1/system` through the forwarded port, not pinned (curl -k: the first contact,
/// checked against what mDNS announces); None while nothing answers.
fn system_unpinned(q: &Qemu, port: u16) -> Option<Value> {
    let o = q
        .ns()
        .command("curl")
        .args(["-sk", "--max-time", "5"])
        .arg(format!("https://127.0.0.1:{port}/v1/system"))
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Waits until `/v1/system` answers and `pred` holds for it.
fn wait_system(
    q: &mut Qemu,
    port: u16,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let t = Instant::now();
    let mut last = Value::Null;
    while t.elapsed() < limit {
        if let Some(status) = q.child.try_wait()? {
            bail!(
                "QEMU exited ({status}) while waiting for {what}; serial console:\n{}",
                q.tail()
            );
        }
        if let Some(v) = system_unpinned(q, port) {
            if pred(&v) {
                return Ok(v);
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "{what} did not happen within {} s; last /v1/system: {}; serial console:\n{}",
        limit.as_secs(),
        last.get("boot").unwrap_or(&last),
        q.tail()
    )
}

/// Waits until the agent stops answering (the box reboots); seconds waited.
fn wait_down(q: &Qemu, port: u16, what: &str) -> Result<f64> {
    let t = Instant::now();
    while system_unpinned(q, port).is_some() {
        if t.elapsed() > UPDATE_LIMIT {
            bail!(
                "the box never rebooted into {what}; serial console:\n{}",
                q.tail()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// `cloudlet discover` in the namespace until the box with `id` is found; its JSON.
fn discover(q: &Qemu, bin: &Path, id: &str) -> Result<Value> {
    crate::demo::discover_with(q.ns().command(bin.join("cloudlet")), id, 60_000)
}

fn boot_of(v: &Value) -> (&str, u64, &str) {
    let b = &v["boot"];
    (
        b["slot"].as_str().unwrap_or("?"),
        b["generation"].as_u64().unwrap_or(0),
        b["update"]["state"].as_str().unwrap_or("?"),
    )
}

fn slot_state<'a>(v: &'a Value, slot: &str) -> &'a str {
    v["boot"]["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["slot"] == slot)
        .and_then(|s| s["state"].as_str())
        .unwrap_or("none")
}

/// Slot A's root filesystem with its agent replaced by one that fails at once: the bad
/// update (debugfs edits the image; nothing is mounted).
fn broken_root(root_fs: &Path, work: &Path) -> Result<PathBuf> {
    let bad = work.join("root-broken-agent.ext4");
    run(Command::new("cp")
        .args(["--sparse=always"])
        .arg(root_fs)
        .arg(&bad))?;
    let script = work.join("broken-agent");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'agent: this build is broken on purpose (the image test of a bad update)' >&2\nexit 1\n",
    )?;
    let cmds = format!(
        "rm /usr/lib/cloudlet/agent\nwrite {} /usr/lib/cloudlet/agent\nsif /usr/lib/cloudlet/agent mode 0100755\n",
        script.display()
    );
    let o = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(&bad)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("piped").write_all(cmds.as_bytes())?;
            c.wait_with_output()
        })
        .context("cannot run debugfs")?;
    if !o.status.success() {
        bail!(
            "debugfs could not break the agent: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(bad)
}

/// After the test, with the power cut: the data partition took the disk's extra space and
/// its filesystem fills it; the root filesystem shipped smaller than its slot fills it; both
/// check clean once their journals are replayed (e2fsck: 0 or 1, "corrected", is clean
/// after a power cut; anything above is damage).
fn check_grown(img: &Path, image_bytes: u64) -> Result<()> {
    let o = Command::new("sfdisk").arg("-J").arg(img).output()?;
    let table: Value = serde_json::from_slice(&o.stdout).context("sfdisk -J")?;
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .context("no partitions")?;
    let size_of = |name: &str| -> Result<u64> {
        parts
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["size"].as_u64())
            .map(|s| s * 512)
            .with_context(|| format!("no partition {name}: {table}"))
    };
    let data = size_of(super::disk::DATA_LABEL)?;
    let disk_bytes = std::fs::metadata(img)?.len();
    if data + image_bytes < disk_bytes {
        bail!(
            "the data partition did not grow into the disk's extra {GROWN_MIB} MiB: {} MiB",
            data >> 20
        );
    }
    let lo = String::from_utf8(
        Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .arg(img)
            .output()?
            .stdout,
    )?
    .trim()
    .to_string();
    if lo.is_empty() {
        bail!("losetup could not attach {}", img.display());
    }
    let r = (|| -> Result<()> {
        for (n, label, want) in [
            (4, super::disk::DATA_LABEL, data),
            (3, "cloudlet-root-b", size_of("cloudlet-root-b")?),
        ] {
            let dev = format!("{lo}p{n}");
            let fsck = Command::new("e2fsck").args(["-fy", &dev]).output()?;
            if fsck.status.code().is_none_or(|c| c > 1) {
                bail!(
                    "{label} does not check clean: {}",
                    String::from_utf8_lossy(&fsck.stdout)
                );
            }
            let h = Command::new("dumpe2fs").args(["-h", &dev]).output()?;
            let h = String::from_utf8_lossy(&h.stdout);
            let field = |k: &str| -> u64 {
                h.lines()
                    .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
                    .unwrap_or(0)
            };
            let fs = field("Block count:") * field("Block size:");
            if fs + (4 << 20) < want {
                bail!(
                    "{label}'s filesystem ({} MiB) does not fill its partition ({} MiB)",
                    fs >> 20,
                    want >> 20
                );
            }
            eprintln!(
                "    {label}: filesystem {} MiB in a {} MiB partition, checks clean after the power cut",
                fs >> 20,
                want >> 20
            );
        }
        Ok(())
    })();
    let _ = Command::new("losetup").args(["-d", &lo]).status();
    r
}

/// Uploads `artifact` with the operator token over pinned HTTPS; the accepted JSON.
fn upload_update(q: &Qemu, port: u16, token: &str, fp: &str, artifact: &Path) -> Result<Value> {
    let url = format!("https://127.0.0.1:{port}");
    q.ns()
        .run_in(|| {
            agent::client::Client::pinned(&url, Some(token), fp).upload::<Value>(
                "/v1/system/update",
                artifact,
                &mut |_, _| {},
            )
        })?
        .map_err(|e| anyhow::anyhow!("the update upload failed: {e}"))
}

/// Runs the test on `disk` (the image of `board`, slot A at `generation`, its root
/// filesystem, kernel and initrd beside it) with the operator token the image was
/// provisioned with; `bin` holds the `cloudlet` client.
#[allow(clippy::too_many_arguments)]
pub fn run_test(
    disk: &super::disk::Disk,
    board: &str,
    port: u16,
    token: &str,
    version: &str,
    bin: &Path,
    work: &Path,
) -> Result<Report> {
    ensure_programs(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        (OVMF_CODE, "ovmf"),
        ("curl", "curl"),
        ("debugfs", "e2fsprogs"),
    ])?;
    let t0 = Instant::now();
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let mut r = Report::default();
    let img = work.join("disk.img");
    run(Command::new("cp")
        .args(["--sparse=always"])
        .arg(&disk.image)
        .arg(&img))?;
    // Flashed onto a disk bigger than the image: the data partition takes the rest on the
    // first boot (systemd-repart, then its filesystem grows).
    let image_bytes = std::fs::metadata(&img)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)?
        .set_len(image_bytes + (GROWN_MIB << 20))?;
    // The updates, made before the box boots (the writer uses every core).
    let g = disk.generation;
    let good = super::update::write(
        work,
        board,
        g + 1,
        version,
        &disk.root_fs,
        &disk.kernel,
        &disk.initrd,
    )?;
    let bad_root = broken_root(&disk.root_fs, work)?;
    let bad = super::update::write(
        work,
        board,
        g + 2,
        version,
        &bad_root,
        &disk.kernel,
        &disk.initrd,
    )?;
    std::fs::remove_file(&bad_root)?;

    step("booting the image under QEMU (TCG, OVMF) in a network namespace of its own");
    let mut q = boot(&img, work, port)?;
    let sys = wait_system(&mut q, port, BOOT_LIMIT, "the agent answering", |v| {
        v["boot"].is_object()
    })?;
    r.api_s = q.started.elapsed().as_secs_f64();
    let (slot, generation, _) = boot_of(&sys);
    eprintln!(
        "    /v1/system answered after {:.1} s: board {}, slot {slot}, generation {generation}, bases {}",
        r.api_s, sys["board"], sys["bases"].as_array().map_or(0, |b| b.len())
    );
    if (slot, generation) != ("a", g) || sys["board"] != board {
        bail!("the factory image should boot slot a, generation {g}, board {board}: {sys}");
    }
    if !sys["bases"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["name"] == "micro")
    {
        bail!("the board's base image is not staged in the image: {sys}");
    }
    let id = sys["id"].as_str().context("no id")?.to_string();
    let fp = sys["fingerprint"]
        .as_str()
        .context("no fingerprint")?
        .to_string();
    let found = discover(&q, bin, &id)?;
    r.mdns_s = q.started.elapsed().as_secs_f64();
    r.mdns_after_api_s = r.mdns_s - r.api_s;
    if found["appliance"]["txt"]["fp"] != fp.as_str() {
        bail!("mDNS announces a certificate other than the one the API presents: {found}");
    }
    eprintln!(
        "    discovered over mDNS after {:.1} s ({:.1} s after the API), at {}",
        r.mdns_s, r.mdns_after_api_s, found["appliance"]["addrs"]
    );

    // Data the operator put on the box: it must survive both updates.
    let marker = work.join("marker.bin");
    std::fs::write(&marker, format!("kept across updates {g}\n").repeat(1000))?;
    let url = format!("https://127.0.0.1:{port}");
    let uploaded: Value = q
        .ns()
        .run_in(|| {
            agent::client::Client::pinned(&url, Some(token), &fp).upload::<Value>(
                "/v1/apps/marker/versions/1?file=marker.bin",
                &marker,
                &mut |_, _| {},
            )
        })?
        .map_err(|e| anyhow::anyhow!("uploading the marker app failed: {e}"))?;
    let marker_sha = uploaded["sha256"]
        .as_str()
        .with_context(|| format!("no sha256 in {uploaded}"))?
        .to_string();
    let marker_kept = |q: &Qemu| -> Result<()> {
        let v: Value = q
            .ns()
            .run_in(|| {
                agent::client::Client::pinned(&url, Some(token), &fp)
                    .get_json::<Value>("/v1/apps/marker")
            })?
            .map_err(|e| anyhow::anyhow!("the marker app is gone: {e}"))?;
        if !v.to_string().contains(&marker_sha) {
            bail!("the marker app changed: {v}");
        }
        Ok(())
    };

    step(&format!(
        "a good update (generation {}, {:.1} MiB) over PUT /v1/system/update",
        g + 1,
        good.bytes as f64 / 1048576.0
    ));
    let t_up = Instant::now();
    let acc = upload_update(&q, port, token, &fp, &good.path)?;
    r.upload_s = t_up.elapsed().as_secs_f64();
    if acc["slot"] != "b" {
        bail!("the update should go to slot b: {acc}");
    }
    let t = Instant::now();
    r.apply_s = wait_down(&q, port, "the good update")?;
    let sys = wait_system(
        &mut q,
        port,
        UPDATE_LIMIT,
        "the box serving from slot b, generation g+1, blessed",
        |v| boot_of(v) == ("b", g + 1, "running") && slot_state(v, "b") == "good",
    )?;
    r.good_update_s = t.elapsed().as_secs_f64();
    r.reboot_s = r.good_update_s - r.apply_s;
    if sys["id"] != id.as_str() || sys["fingerprint"] != fp.as_str() {
        bail!("the box's identity changed with the update: {sys}");
    }
    marker_kept(&q)?;
    eprintln!(
        "    uploaded and checked in {:.1} s; slot b written, box rebooting {:.1} s later; serving from slot b (generation {}), blessed, {:.1} s after that; slot a {}; data kept",
        r.upload_s,
        r.apply_s,
        g + 1,
        r.reboot_s,
        slot_state(&sys, "a")
    );

    step(&format!(
        "a bad update (generation {}: its agent fails at start)",
        g + 2
    ));
    // This one as an operator would: `cloudlet update`, pinned, with the token.
    let o = q
        .ns()
        .command(bin.join("cloudlet"))
        .args(["--json", "--agent", &url, "--fingerprint", &fp, "update"])
        .arg(&bad.path)
        .env("CLOUDLET_TOKEN", token)
        .output()
        .context("cannot run cloudlet update")?;
    if !o.status.success() {
        bail!(
            "cloudlet update failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let acc: Value = serde_json::from_slice(&o.stdout).context("cloudlet update --json")?;
    if acc["slot"] != "a" {
        bail!("the second update should go to slot a: {acc}");
    }
    let t = Instant::now();
    // The box goes down, tries slot a, fails the boot check, reboots, falls back to b.
    wait_down(&q, port, "the bad update")?;
    let sys = wait_system(
        &mut q,
        port,
        UPDATE_LIMIT,
        "the box rolling back to slot b by itself",
        |v| {
            let (slot, generation, state) = boot_of(v);
            slot == "b"
                && generation == g + 1
                && state == "rolled_back"
                && v["boot"]["update"]["attempted"] == g + 2
        },
    )?;
    r.rollback_s = t.elapsed().as_secs_f64();
    if slot_state(&sys, "a") != "bad" {
        bail!("slot a should be marked bad after its failed try: {sys}");
    }
    marker_kept(&q)?;
    eprintln!(
        "    back on slot b (generation {}) {:.1} s after the upload, slot a bad; data kept",
        g + 1,
        r.rollback_s
    );
    // The power is cut (QEMU killed): the data must survive that too.
    drop(q);
    check_grown(&img, image_bytes)?;
    let _ = std::fs::remove_dir_all(work);
    r.total_s = t0.elapsed().as_secs_f64();
    Ok(r)
}
