//! `cargo xtask linux-base`: the Linux service-VM base's parts — a small kernel built from
//! Debian's kernel source ([`kernel`], cached outside the clone by recipe) and a root
//! filesystem holding `cloudlet-init`, the sample service speaking the micro guest's protocol
//! ([`rootfs`]) — in `target/linux-base/`:
//!
//! ```text
//! target/linux-base/
//!   vmlinux        the kernel: ELF with a PVH note (our vmm: --boot pvh or linux; QEMU
//!                  microvm), packed by [`elf`] (2 MiB alignment padding left to p_memsz)
//!   rootfs.ext4    the root filesystem (virtio-blk, /dev/vda, mounted read-only)
//!   cmdline        the kernel command line the base boots with
//!   linux-base.json  sizes (`linux_base_mib` = kernel + root filesystem), versions, timings
//! ```

pub mod elf;
pub mod kernel;
pub mod rootfs;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::util::{step, target_dir};

/// The kernel command line of the base: COM1 console, the ext4 root read-only on the first
/// virtio disk, the NIC configured by the kernel at QEMU's and our vmm's user-mode network
/// address (10.0.2.15/24, gateway 10.0.2.2) so no userspace network set-up is needed. The
/// VMM appends its `virtio_mmio.device=` entries.
pub const CMDLINE: &str = "console=ttyS0 root=/dev/vda ro rootfstype=ext4 \
     ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off panic=-1";

/// The line `cloudlet-init` prints when the service listens: the base's ready point.
pub const READY: &str = "cloudlet-linux ready";

/// The built parts.
#[derive(Debug, Clone)]
pub struct LinuxBase {
    /// The kernel (ELF vmlinux).
    pub vmlinux: PathBuf,
    /// The root filesystem image.
    pub rootfs: PathBuf,
    /// Kernel plus root filesystem, MiB.
    pub mib: f64,
}

/// Paths of the parts in `target/linux-base/`.
pub fn paths() -> (PathBuf, PathBuf) {
    let d = target_dir().join("linux-base");
    (d.join("vmlinux"), d.join("rootfs.ext4"))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Builds (or finds cached) the kernel and builds the root filesystem.
pub fn build() -> Result<LinuxBase> {
    let t0 = Instant::now();
    let k = kernel::build()?;
    let t_kernel = t0.elapsed().as_secs_f64();
    let dir = target_dir().join("linux-base");
    std::fs::create_dir_all(&dir)?;
    let (vmlinux, rootfs) = paths();
    let stripped = std::fs::read(&k.vmlinux)?;
    let packed = elf::pack(&stripped).context("cannot pack vmlinux")?;
    step(&format!(
        "vmlinux packed: {:.2} MiB (stripped ELF: {:.2} MiB; 2 MiB link padding left to p_memsz)",
        mib(packed.len() as u64),
        mib(stripped.len() as u64)
    ));
    std::fs::write(&vmlinux, packed)?;
    let t1 = Instant::now();
    let rootfs_bytes = rootfs::build(&rootfs)?;
    let t_rootfs = t1.elapsed().as_secs_f64();
    std::fs::write(dir.join("cmdline"), CMDLINE)?;
    let kernel_bytes = std::fs::metadata(&vmlinux)?.len();
    let total = mib(kernel_bytes + rootfs_bytes);
    let report = serde_json::json!({
        "kernel_source": format!("linux-source-6.1 {}", k.version),
        "kernel_cached": k.cached,
        "kernel_bytes": kernel_bytes,
        "kernel_stripped_bytes": stripped.len(),
        "rootfs_bytes": rootfs_bytes,
        "linux_base_mib": (total * 100.0).round() / 100.0,
        "kernel_s": (t_kernel * 10.0).round() / 10.0,
        "rootfs_s": (t_rootfs * 10.0).round() / 10.0,
        "cmdline": CMDLINE,
    });
    std::fs::write(
        dir.join("linux-base.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    step(&format!(
        "Linux base in {}: kernel {:.2} MiB ({}) + root filesystem {:.2} MiB = {total:.2} MiB (budget 8); {:.1} s",
        dir.display(),
        mib(kernel_bytes),
        if k.cached { "cached" } else { "built" },
        mib(rootfs_bytes),
        t0.elapsed().as_secs_f64()
    ));
    if total > 8.0 {
        anyhow::bail!("the Linux base is {total:.2} MiB, over its 8 MiB budget");
    }
    Ok(LinuxBase {
        vmlinux,
        rootfs,
        mib: total,
    })
}
