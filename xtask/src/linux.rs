//! `cargo xtask fetch-linux`: Debian's cloud kernel (a real bzImage) for the Linux boot-path
//! tests, extracted to `target/linux/vmlinuz`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{run, step, target_dir};

/// Path of the fetched bzImage.
pub fn bzimage() -> PathBuf {
    target_dir().join("linux/vmlinuz")
}

/// The versioned package the `linux-image-cloud-amd64` metapackage points at.
fn cloud_kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("failed to run apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_owned)
        .context("apt-cache knows no linux-image-*-cloud-amd64 package")
}

/// Downloads and extracts the kernel unless it is there already.
pub fn fetch() -> Result<PathBuf> {
    let dest = bzimage();
    if dest.exists() {
        return Ok(dest);
    }
    step("fetching Debian's cloud kernel (for the Linux boot-path tests)");
    let pkg = match cloud_kernel_package() {
        Ok(p) => p,
        Err(_) => {
            run(Command::new("apt-get").args(["update", "-q"]))?;
            cloud_kernel_package()?
        }
    };
    let dir = target_dir().join("linux");
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl)?;
    run(Command::new("apt-get")
        .current_dir(&dl)
        .args(["download", "-q", &pkg]))?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let extract = dir.join("extract");
    std::fs::create_dir_all(&extract)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))?;
    let vmlinuz = std::fs::read_dir(extract.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;
    std::fs::rename(&vmlinuz, &dest)?;
    std::fs::remove_dir_all(&extract)?;
    std::fs::remove_dir_all(&dl)?;
    if std::fs::metadata(&dest)?.len() < 1 << 20 {
        bail!("{} is implausibly small for a kernel", dest.display());
    }
    step(&format!("Linux kernel: {} ({pkg})", dest.display()));
    Ok(dest)
}
