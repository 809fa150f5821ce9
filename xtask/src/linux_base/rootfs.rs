//! The Linux base's root filesystem: `cloudlet-init` (rootfs/linux/service, a static Rust
//! program built for the host target with `+crt-static`) as `/sbin/init`, and the empty
//! mount points it uses, in a small ext4 image made by `mke2fs -d` (no journal: the root is
//! mounted read-only and VMs write to their own copy-on-write δ anyway). Built in seconds,
//! so not cached beyond cargo's own build cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::util::{cargo, ensure_programs, run, step, target_dir};

/// The filesystem label, and a fixed UUID and hash seed so that an unchanged input gives an
/// identical image.
const LABEL: &str = "cloudlet-root";
const UUID: &str = "c10d1e70-0000-4000-8000-000000000001";

/// Builds the static service binary; its path.
fn build_init() -> Result<PathBuf> {
    run(cargo().args([
        "rustc",
        "--release",
        "-p",
        "linux-service",
        "--bin",
        "cloudlet-init",
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "strip=symbols",
    ]))?;
    Ok(target_dir().join("release/cloudlet-init"))
}

/// Total bytes of the files under `dir`.
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        n += if md.is_dir() {
            tree_bytes(&e.path())?
        } else {
            md.len()
        };
    }
    Ok(n)
}

/// Builds the root filesystem image at `out`; returns its size in bytes.
pub fn build(out: &Path) -> Result<u64> {
    let t0 = Instant::now();
    ensure_programs(&[("mke2fs", "e2fsprogs")])?;
    step("building cloudlet-init (static, host target)");
    let init = build_init()?;
    let stage = out.with_extension("stage");
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    for d in ["sbin", "dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy(&init, stage.join("sbin/init"))
        .with_context(|| format!("cannot copy {}", init.display()))?;
    std::fs::write(
        stage.join("etc/cloudlet-base"),
        "cloudlet Linux service-VM base: /sbin/init is cloudlet-init (rootfs/linux/service)\n",
    )?;
    // Content plus room for ext4's metadata (superblocks, group descriptors, inode table,
    // directories), in 4 KiB blocks, whole 64 KiB.
    let content = tree_bytes(&stage)?;
    let bytes = (content + content / 8 + (384 << 10)).next_multiple_of(64 << 10);
    let _ = std::fs::remove_file(out);
    run(Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", "1767225600")
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", "64",
        ])
        .args(["-O", "^has_journal,^resize_inode"])
        .args(["-L", LABEL, "-U", UUID])
        .args(["-E", &format!("root_owner=0:0,hash_seed={UUID}")])
        .arg("-d")
        .arg(&stage)
        .arg(out)
        .arg(format!("{}k", bytes >> 10)))?;
    std::fs::remove_dir_all(&stage)?;
    step(&format!(
        "root filesystem: {} ({:.2} MiB; cloudlet-init {:.2} MiB) in {:.1} s",
        out.display(),
        bytes as f64 / (1 << 20) as f64,
        std::fs::metadata(&init)?.len() as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    ));
    Ok(bytes)
}
