//! The Linux base's kernel: Debian's kernel source (`linux-source-6.1`), `make tinyconfig`,
//! the fragment `rootfs/linux/kernel.config` merged on top in allnoconfig mode (every option
//! neither names stays off: `olddefconfig` would turn on IPv6, wireless, input, VT … as
//! defaults), `make vmlinux`, symbols stripped. (The base's kernel file is packed from it by
//! [`super::elf`] on every run: that takes milliseconds and is not part of the recipe.)
//!
//! The build takes minutes, so its result is cached outside the clone, in
//! `~/.cache/cloudlet/linux-base/<recipe>/` (`$XDG_CACHE_HOME` or `$CLOUDLET_CACHE` when
//! set), where `<recipe>` is a SHA-256 over the config fragment, the source package's version
//! and this file: a rebuild happens only when one of them changes. The source tree is
//! unpacked in a scratch directory beside it and removed after the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util::{ensure_programs, root, run, step};

/// Debian's source package of the kernel.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// The tarball the package installs.
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// This file: part of the recipe (a change to the build steps is a new recipe).
const BUILD_SCRIPT: &str = include_str!("kernel.rs");

/// The config fragment applied on top of tinyconfig.
pub fn fragment_path() -> PathBuf {
    root().join("rootfs/linux/kernel.config")
}

/// The installed version of the source package, installing it (and the build tools) first.
fn source_version() -> Result<String> {
    ensure_programs(&[
        (SOURCE_TARBALL, SOURCE_PACKAGE),
        ("flex", "flex"),
        ("bison", "bison"),
        ("bc", "bc"),
        ("/usr/include/libelf.h", "libelf-dev"),
        ("/usr/include/openssl/ssl.h", "libssl-dev"),
        ("xz", "xz-utils"),
        ("make", "make"),
        ("gcc", "gcc"),
    ])?;
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .output()
        .context("failed to run dpkg-query")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        bail!("{SOURCE_PACKAGE} is not installed: apt-get install {SOURCE_PACKAGE}");
    }
    Ok(v)
}

/// The `CONFIG_…=y` lines of the fragment.
fn wanted_options(fragment: &str) -> Vec<&str> {
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_") && l.ends_with("=y"))
        .collect()
}

/// The recipe's hash (hex): the fragment, the source version, this build script.
fn recipe_hash(fragment: &str, version: &str) -> String {
    let mut h = Sha256::new();
    for part in [fragment, version, BUILD_SCRIPT] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let d = h.finalize();
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A built kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The stripped ELF vmlinux (PVH note included).
    pub vmlinux: PathBuf,
    /// The full `.config` it was built with.
    pub config: PathBuf,
    /// The source package version.
    pub version: String,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// Builds the kernel, or finds it in the cache.
pub fn build() -> Result<Kernel> {
    let t0 = Instant::now();
    let fragment = std::fs::read_to_string(fragment_path())
        .with_context(|| format!("cannot read {}", fragment_path().display()))?;
    let version = source_version()?;
    let hash = recipe_hash(&fragment, &version);
    let dir = crate::util::cache_dir().join("linux-base").join(&hash);
    let kernel = Kernel {
        vmlinux: dir.join("vmlinux"),
        config: dir.join("config"),
        version: version.clone(),
        cached: true,
    };
    if kernel.vmlinux.exists() && kernel.config.exists() {
        step(&format!(
            "kernel {SOURCE_PACKAGE} {version}: cached, recipe {hash} ({})",
            dir.display()
        ));
        return Ok(kernel);
    }
    step(&format!(
        "kernel {SOURCE_PACKAGE} {version}: building recipe {hash} into {} (minutes; cached afterwards)",
        dir.display()
    ));
    let scratch = crate::util::cache_dir()
        .join("linux-base")
        .join(format!("{hash}.build"));
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    std::fs::create_dir_all(&scratch)?;
    let result = build_in(&scratch, &fragment, &dir);
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    step(&format!(
        "kernel built in {:.0} s",
        t0.elapsed().as_secs_f64()
    ));
    Ok(Kernel {
        cached: false,
        ..kernel
    })
}

/// Runs `what`, timing it.
fn timed(what: &str, cmd: &mut Command) -> Result<()> {
    let t = Instant::now();
    step(what);
    run(cmd)?;
    step(&format!("  {what}: {:.1} s", t.elapsed().as_secs_f64()));
    Ok(())
}

/// Unpacks, configures and builds in `scratch`; moves the results into `dest`.
fn build_in(scratch: &Path, fragment: &str, dest: &Path) -> Result<()> {
    timed(
        "unpacking the kernel source",
        Command::new("tar").current_dir(scratch).args([
            "-xf",
            SOURCE_TARBALL,
            "--strip-components=1",
        ]),
    )?;
    let make = || {
        let mut c = Command::new("make");
        c.current_dir(scratch)
            .env("KBUILD_BUILD_USER", "cloudlet")
            .env("KBUILD_BUILD_HOST", "cloudlet")
            .env("KBUILD_BUILD_TIMESTAMP", "2026-01-01")
            .arg("ARCH=x86_64");
        c
    };
    timed("make tinyconfig", make().arg("tinyconfig"))?;
    let frag = scratch.join("cloudlet.config");
    std::fs::write(&frag, fragment)?;
    timed(
        "merging rootfs/linux/kernel.config (allnoconfig mode)",
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(scratch)
            .env("ARCH", "x86_64")
            .args(["-n", ".config", "cloudlet.config"]),
    )?;
    let config = std::fs::read_to_string(scratch.join(".config"))?;
    let missing: Vec<&str> = wanted_options(fragment)
        .into_iter()
        .filter(|o| !config.lines().any(|l| l == *o))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the kernel config dropped {} (a dependency is missing: fix rootfs/linux/kernel.config)",
            missing.join(", ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    timed(
        &format!("make -j{jobs} vmlinux (the slow step)"),
        make().arg(format!("-j{jobs}")).arg("vmlinux"),
    )?;
    std::fs::create_dir_all(dest)?;
    let tmp = dest.join("vmlinux.tmp");
    timed(
        "stripping vmlinux",
        Command::new("objcopy")
            .arg("--strip-all")
            .arg(scratch.join("vmlinux"))
            .arg(&tmp),
    )?;
    std::fs::copy(scratch.join(".config"), dest.join("config"))?;
    std::fs::rename(&tmp, dest.join("vmlinux"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_changes_with_each_input() {
        let a = recipe_hash("CONFIG_PVH=y\n", "6.1.1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, recipe_hash("CONFIG_PVH=y\n", "6.1.1"));
        assert_ne!(a, recipe_hash("CONFIG_PVH=y\nCONFIG_NET=y\n", "6.1.1"));
        assert_ne!(a, recipe_hash("CONFIG_PVH=y\n", "6.1.2"));
        assert_eq!(
            wanted_options("# c\nCONFIG_A=y\nCONFIG_B=m\n CONFIG_C=y \n"),
            ["CONFIG_A=y", "CONFIG_C=y"]
        );
    }
}
