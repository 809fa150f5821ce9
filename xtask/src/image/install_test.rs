//! The package in a clean Debian root: install, run the agent from the installed paths as
//! the service user, use it with the installed client, stop it, purge, and check nothing is
//! left. systemd cannot run here (no systemd as PID 1, no booted container), so the agent is
//! started the way the unit starts it (same command line, same user), in a network namespace
//! of its own (it announces nothing on the host's network).
//!
//! The clean root comes from debootstrap (minbase, plus the package's dependencies), made
//! once and kept as a tarball outside the clone, keyed by suite, variant and packages
//! ([`cached_root`]); later runs only unpack it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::deb::{BOARD_FILE, DATA_DIR, PACKAGE};
use crate::util::{ensure_programs, run, step, timed};

/// The Debian release the package is for.
pub const SUITE: &str = "bookworm";
/// debootstrap's variant: essential packages and apt only.
const VARIANT: &str = "minbase";
/// Packages beyond minbase: the package's dependencies (so `dpkg -i` needs no network).
const INCLUDE: &str = "libusb-1.0-0";
/// The mirror.
const MIRROR: &str = "http://deb.debian.org/debian";

/// The tarball of a clean root for [`SUITE`], made with debootstrap the first time.
pub fn cached_root() -> Result<PathBuf> {
    cached_root_with(INCLUDE)
}

/// The tarball of a root for [`SUITE`] with `include` (comma-separated packages) beyond
/// minbase, made with debootstrap the first time (keyed by the package list).
pub fn cached_root_with(include: &str) -> Result<PathBuf> {
    let mut key = format!("{SUITE}-{VARIANT}-{}-amd64", include.replace(',', "+"));
    if key.len() > 120 {
        use sha2::Digest;
        let h = sha2::Sha256::digest(include.as_bytes());
        let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
        key = format!("{SUITE}-{VARIANT}-{hex}-amd64");
    }
    let tar = crate::util::cache_dir().join(format!("debian-root-{key}.tar.gz"));
    if tar.exists() {
        return Ok(tar);
    }
    ensure_programs(&[("debootstrap", "debootstrap")])?;
    let work = crate::util::cache_dir().join(format!("debian-root-{key}.tmp"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    timed(
        &format!("debootstrap {SUITE} ({VARIANT} + {include}) into the cache (once)"),
        || {
            run(Command::new("debootstrap")
                .arg(format!("--variant={VARIANT}"))
                .arg(format!("--include={include}"))
                .arg(SUITE)
                .arg(&work)
                .arg(MIRROR))
        },
    )?;
    // The package lists and downloaded .debs are not needed to install a local package.
    let _ = std::fs::remove_dir_all(work.join("var/cache/apt/archives"));
    let _ = std::fs::remove_dir_all(work.join("var/lib/apt/lists"));
    timed(&format!("keeping it as {}", tar.display()), || {
        let part = tar.with_extension("part");
        run(Command::new("tar")
            .arg("-czf")
            .arg(&part)
            .arg("-C")
            .arg(&work)
            .arg("."))?;
        std::fs::rename(&part, &tar)?;
        Ok(())
    })?;
    std::fs::remove_dir_all(&work)?;
    Ok(tar)
}

/// A Debian root unpacked for one test, with /proc and /dev mounted; unmounted and removed
/// when dropped.
pub(super) struct Root {
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    netns: Option<String>,
}

impl Root {
    pub(super) fn unpack(tar: &Path, dir: &Path) -> Result<Root> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let mut r = Root {
            dir: dir.to_path_buf(),
            mounts: vec![],
            netns: None,
        };
        run(Command::new("tar").arg("-xzf").arg(tar).arg("-C").arg(dir))?;
        for (what, args) in [
            ("proc", vec!["-t", "proc", "proc"]),
            ("dev", vec!["--bind", "/dev"]),
        ] {
            let at = dir.join(what);
            run(Command::new("mount").args(&args).arg(&at))?;
            r.mounts.push(at);
        }
        Ok(r)
    }

    pub(super) fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel.trim_start_matches('/'))
    }

    /// A command run inside the root.
    fn chroot(&self) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.dir).env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    /// Output of `cmd` inside the root, failing when it fails.
    pub(super) fn out(&self, args: &[&str]) -> Result<String> {
        let o = self.chroot().args(args).output()?;
        if !o.status.success() {
            bail!(
                "{} failed in the Debian root: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

impl Root {
    /// Unmounts /proc and /dev and keeps the tree (for a filesystem made from it); the
    /// caller removes it.
    pub(super) fn unmount(mut self) -> Result<PathBuf> {
        for m in std::mem::take(&mut self.mounts).iter().rev() {
            run(Command::new("umount").arg(m))?;
        }
        let dir = std::mem::take(&mut self.dir);
        Ok(dir)
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Some(ns) = self.netns.take() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        if !self.dir.as_os_str().is_empty() && self.mounts.iter().all(|m| !is_mount(m)) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn is_mount(p: &Path) -> bool {
    let p = p.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&p)))
        .unwrap_or(false)
}

/// What [`check`] measured, s.
pub struct Timings {
    /// Unpacking the cached root.
    pub unpack_s: f64,
    /// `dpkg -i`.
    pub install_s: f64,
    /// Agent start → its API URL written.
    pub agent_ready_s: f64,
    /// `dpkg --purge`.
    pub purge_s: f64,
}

/// Installs `deb` (built for board `board`) in a clean root under `work`, runs and uses the
/// agent, stops it, purges the package and checks nothing is left.
pub fn check(deb: &Path, board: &agent::board::Board, work: &Path) -> Result<Timings> {
    let tar = cached_root()?;
    let t = Instant::now();
    let root = timed("unpacking a clean Debian root", || {
        Root::unpack(&tar, &work.join("debian-root"))
    })?;
    let unpack_s = t.elapsed().as_secs_f64();
    let mut root = root;

    let t = Instant::now();
    timed(&format!("dpkg -i {}", deb.display()), || {
        std::fs::copy(deb, root.path("/tmp/cloudlet.deb"))?;
        root.out(&["dpkg", "-i", "/tmp/cloudlet.deb"])?;
        Ok(())
    })?;
    let install_s = t.elapsed().as_secs_f64();

    step("checking what the package installed");
    let status = root.out(&["dpkg-query", "-W", "-f=${Status}", PACKAGE])?;
    if status != "install ok installed" {
        bail!("dpkg says the package is '{status}'");
    }
    for f in [
        "/usr/lib/cloudlet/agent",
        "/usr/lib/cloudlet/vmm",
        "/usr/lib/cloudlet/image-builder",
        "/usr/bin/cloudlet",
        "/usr/bin/cloudlet-agent",
        BOARD_FILE,
        "/lib/systemd/system/cloudlet-agent.service",
    ] {
        if !root.path(f).exists() {
            bail!("{f} is not installed");
        }
    }
    let passwd = std::fs::read_to_string(root.path("/etc/passwd"))?;
    let user = passwd
        .lines()
        .find(|l| l.starts_with("cloudlet:"))
        .context("postinst made no user cloudlet")?;
    let ids: Vec<&str> = user.split(':').collect();
    let (uid, gid) = (ids[2], ids[3]);
    let groups = root.out(&["id", "-nG", "cloudlet"])?;
    if !groups.split_whitespace().any(|g| g == "kvm") {
        bail!("the user cloudlet is not in group kvm (its groups: {groups})");
    }
    let meta = std::fs::metadata(root.path(DATA_DIR))?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if meta.uid().to_string() != uid || meta.permissions().mode() & 0o777 != 0o750 {
            bail!("{DATA_DIR} is not the user cloudlet's with mode 0750");
        }
    }

    // The agent as the unit runs it, in a network namespace of its own.
    let ns = format!("cloudlet-pkg-{}", std::process::id());
    run(Command::new("ip").args(["netns", "add", &ns]))?;
    root.netns = Some(ns.clone());
    run(Command::new("ip").args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]))?;
    let log = work.join("agent.log");
    let t = Instant::now();
    step("starting the installed agent as user cloudlet (the unit's command line)");
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &ns, "chroot"])
        .arg(format!("--userspec={uid}:{gid}"))
        .arg(&root.dir)
        .args([
            "/usr/lib/cloudlet/agent",
            "--config",
            BOARD_FILE,
            "--data-dir",
            DATA_DIR,
            "--stop-on-exit",
        ])
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::create(work.join("agent.err"))?))
        .spawn()?;
    let r = use_agent(&root, &ns, board, &mut agent, t);
    let agent_ready_s = match r {
        Ok(s) => s,
        Err(e) => {
            let _ = agent.kill();
            let _ = agent.wait();
            let err = std::fs::read_to_string(work.join("agent.err")).unwrap_or_default();
            return Err(e.context(format!("the installed agent's log:\n{err}")));
        }
    };

    let t = Instant::now();
    timed("dpkg --purge cloudlet", || {
        root.out(&["dpkg", "--purge", PACKAGE])?;
        Ok(())
    })?;
    let purge_s = t.elapsed().as_secs_f64();
    step("checking the purge left nothing");
    for f in [
        "/usr/lib/cloudlet",
        "/usr/bin/cloudlet",
        "/usr/bin/cloudlet-agent",
        "/etc/cloudlet",
        DATA_DIR,
        "/lib/systemd/system/cloudlet-agent.service",
    ] {
        if root.path(f).exists() {
            bail!("{f} is still there after the purge");
        }
    }
    let passwd = std::fs::read_to_string(root.path("/etc/passwd"))?;
    if passwd.lines().any(|l| l.starts_with("cloudlet:")) {
        bail!("the user cloudlet is still there after the purge");
    }
    if root
        .out(&["dpkg-query", "-W", "-f=${Status}", PACKAGE])
        .is_ok_and(|s| s.contains("installed"))
    {
        bail!("dpkg still lists the package after the purge");
    }
    drop(root);
    Ok(Timings {
        unpack_s,
        install_s,
        agent_ready_s,
        purge_s,
    })
}

/// Waits for the installed agent's API, uses it with the installed client (plain HTTP on
/// loopback, pinned HTTPS otherwise), stops it with SIGTERM as systemd would; returns the
/// seconds from `t0` to its API.
fn use_agent(
    root: &Root,
    ns: &str,
    board: &agent::board::Board,
    agent: &mut Child,
    t0: Instant,
) -> Result<f64> {
    let url_file = root.path(&format!("{DATA_DIR}/api.url"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = loop {
        if let Some(u) = std::fs::read_to_string(&url_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
        {
            break u;
        }
        if let Some(st) = agent.try_wait()? {
            bail!("the installed agent exited with {st} before serving");
        }
        if Instant::now() > deadline {
            bail!("the installed agent wrote no {DATA_DIR}/api.url within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let ready = t0.elapsed().as_secs_f64();
    eprintln!("    the agent serves {url} after {ready:.2} s");
    step("using it with the installed client: cloudlet info");
    let mut args: Vec<String> = vec![
        "/usr/bin/cloudlet".into(),
        "info".into(),
        "--agent".into(),
        url.clone(),
        "--token-file".into(),
        format!("{DATA_DIR}/operator.token"),
    ];
    if url.starts_with("https://") {
        let cert = std::fs::read(root.path(&format!("{DATA_DIR}/tls/cert.der")))?;
        args.push("--fingerprint".into());
        args.push(agent::tls::fingerprint(&cert));
    }
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "chroot"])
        .arg(&root.dir)
        .args(&args)
        .env("HOME", "/root")
        .output()?;
    let said = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() || !said.contains(&format!("(board {}", board.name)) {
        bail!(
            "cloudlet info against the installed agent failed: {said}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    eprintln!("    {}", said.lines().next().unwrap_or_default());
    step("stopping it (SIGTERM, as systemd does)");
    nix_term(agent.id())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = agent.try_wait()? {
            if !st.success() {
                bail!("the installed agent ended with {st} after SIGTERM");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the installed agent did not stop within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ready)
}

fn nix_term(pid: u32) -> Result<()> {
    run(Command::new("kill").arg("-TERM").arg(pid.to_string()))
}
