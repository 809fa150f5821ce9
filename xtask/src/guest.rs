//! `cargo xtask guest`: builds the no_std micro guest (rootfs/guest) and puts the ELF at
//! `target/guest/micro-guest`.
//!
//! The guest has its own workspace and build flags (linker script, static relocation model)
//! in `rootfs/guest/.cargo/config.toml`, so it is built by running cargo in that directory.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{root, step, target_dir};

/// Path of the built micro guest ELF.
pub fn guest_elf() -> PathBuf {
    target_dir().join("guest/micro-guest")
}

/// Builds the micro guest and returns the path of its ELF.
pub fn build() -> Result<PathBuf> {
    step("building the micro guest (rootfs/guest)");
    let dir = root().join("rootfs/guest");
    let build_dir = target_dir().join("guest-build");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &build_dir)
        // Flags for the host crates must not leak into the guest build (and back).
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "build",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to run cargo for the micro guest")?;
    if !out.status.success() {
        bail!("building the micro guest failed (see the compiler output above)");
    }
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "micro-guest")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the micro-guest executable")?;
    let dest = guest_elf();
    std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
    std::fs::copy(&exe, &dest)
        .with_context(|| format!("failed to copy {} to {}", exe.display(), dest.display()))?;
    let size = std::fs::metadata(&dest)?.len();
    step(&format!(
        "micro guest: {} ({} KiB)",
        dest.display(),
        size.div_ceil(1024)
    ));
    Ok(dest)
}
