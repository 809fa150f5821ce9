//! Helpers shared by the subcommands: paths, running commands, Debian packages.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `target/` of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Prints a step heading on stderr.
pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Runs `cmd`, failing with its rendering when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// A `cargo` command (the same cargo that runs xtask).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Builds the release `vmm` binary, statically linked (static-pie): it starts ~0.2 ms sooner
/// than the dynamically linked one (no shared-library loading and symbol binding; measured
/// with `vmm --version`, 0.67 vs 0.88 ms median), which counts when a VM is ready in a few
/// milliseconds. Only the final link changes, so the library crates stay shared with the
/// other builds.
pub fn build_release_vmm() -> Result<()> {
    run(cargo().args([
        "rustc",
        "--release",
        "-p",
        "vmm",
        "--bin",
        "vmm",
        "--",
        "-C",
        "target-feature=+crt-static",
    ]))
}

/// Whether `program` is on the PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs Debian packages that provide missing programs (`program`, `package` pairs).
/// Runs `apt-get update` first only when an install fails without it.
pub fn ensure_programs(needs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        // A program name is looked up on PATH; an absolute path (a file a package installs,
        // e.g. a Python module) must exist.
        .filter(|(prog, _)| {
            if prog.starts_with('/') {
                !Path::new(prog).exists()
            } else {
                !have(prog)
            }
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if install().map(|s| s.success()).unwrap_or(false) {
        return Ok(());
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let status = install().context("failed to run apt-get (is this a Debian machine?)")?;
    if !status.success() {
        bail!(
            "apt-get install {} failed: install them by hand (as root)",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Fails loudly when `/dev/kvm` is missing: tests that need it must never be skipped.
pub fn require_kvm() -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the VMM tests need KVM and are not skipped; run on a KVM host");
    }
    Ok(())
}

/// Runs one step of a long task: prints its heading, runs `f`, prints how long it took.
pub fn timed<T>(msg: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    step(msg);
    let t = std::time::Instant::now();
    let r = f();
    let s = t.elapsed().as_secs_f64();
    match &r {
        Ok(_) => eprintln!("    done in {s:.1} s"),
        Err(_) => eprintln!("    failed after {s:.1} s"),
    }
    r
}

/// Where slow, recipe-keyed builds are cached outside the clone (so a fresh clone reuses
/// them): `$CLOUDLET_CACHE`, else `$XDG_CACHE_HOME/cloudlet`, else `~/.cache/cloudlet`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLOUDLET_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("cloudlet")
}
