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

/// True when `program` is on PATH.
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
        .filter(|(prog, _)| !have(prog))
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
