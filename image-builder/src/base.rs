//! `image-builder base`: boot a guest to its ready point and keep it as a base image.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use format::base::{hex, Manifest, DISK, KERNEL, MANIFEST, MANIFEST_VERSION, MEMORY, STATE};
use vmm::config::{
    DevicesConfig, DiskConfig, NetBackendConfig, NetConfig, SerialOutput, VmConfig, DEFAULT_MAC,
};
use vmm::loader::{BootProtocol, KernelConfig};

use crate::console::Console;

/// What to build.
#[derive(Clone, Debug)]
pub struct BaseSpec {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// Start of the console line that marks the ready point.
    pub ready: String,
    /// How long to wait for it.
    pub timeout: Duration,
    /// Replace an existing output directory.
    pub force: bool,
    /// A raw root disk image to include (copied, padded to whole 4 KiB blocks).
    pub disk: Option<PathBuf>,
    /// Give the guest a NIC (its backend is chosen by each VM made from the base).
    pub net: bool,
    /// Give the guest a virtio console (its console I/O then costs a few VM exits per line
    /// instead of two per byte on the serial port).
    pub console: bool,
}

/// The line the Linux base's init (`cloudlet-init`) prints when its service listens.
pub const LINUX_READY: &str = "cloudlet-linux ready";

/// The Linux service-VM base's parts, as `cargo xtask linux-base` leaves them in a directory.
#[derive(Clone, Debug)]
pub struct LinuxParts {
    /// `vmlinux`: the kernel.
    pub kernel: PathBuf,
    /// `rootfs.ext4`: the root filesystem (the base's disk).
    pub rootfs: PathBuf,
    /// `cmdline`: the kernel command line.
    pub cmdline: String,
}

impl LinuxParts {
    /// Finds the parts in `dir`.
    pub fn open(dir: &Path) -> Result<LinuxParts> {
        let need = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(anyhow::anyhow!(
                    "'{}' has no {name}: build the Linux base with `cargo xtask linux-base` (it writes target/linux-base/)",
                    dir.display()
                ))
            }
        };
        let cmdline = std::fs::read_to_string(need("cmdline")?)?
            .trim()
            .to_string();
        Ok(LinuxParts {
            kernel: need("vmlinux")?,
            rootfs: need("rootfs.ext4")?,
            cmdline,
        })
    }

    /// The base spec for these parts: a NIC, 256 MiB, the ready line of `cloudlet-init`.
    pub fn spec(&self, out: PathBuf) -> BaseSpec {
        BaseSpec {
            kernel: self.kernel.clone(),
            out,
            mem_mib: 256,
            cmdline: self.cmdline.clone(),
            ready: LINUX_READY.into(),
            timeout: Duration::from_secs(30),
            force: false,
            disk: Some(self.rootfs.clone()),
            net: true,
            console: false,
        }
    }
}

/// SHA-256 over `kernel`, `state`, `memory` (and `disk`) of a base directory, each prefixed
/// by its length (`format::base::content_id`).
pub fn content_id(dir: &Path) -> Result<[u8; 32]> {
    format::base::content_id(dir)
        .with_context(|| format!("cannot hash the base at '{}'", dir.display()))
}

/// Bytes a file occupies on disk.
pub fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The VM [`build`] boots for `spec`: its kernel (Linux 64-bit entry), command line, RAM and
/// devices, the serial console going to `serial`, the root disk read from `disk` (the base's
/// own copy). The loader-level tests load it with `vmm::builder::load_for_boot`.
pub fn vm_config(spec: &BaseSpec, disk: &Path, serial: SerialOutput) -> Result<VmConfig> {
    let mut cfg = VmConfig::new(
        KernelConfig {
            kernel: spec.kernel.clone(),
            initrd: None,
            cmdline: spec.cmdline.clone(),
            protocol: BootProtocol::Linux,
        },
        spec.mem_mib,
        1,
        serial,
        false,
    )?;
    cfg.devices = DevicesConfig {
        disk: spec.disk.as_ref().map(|_| DiskConfig {
            base: Some(disk.to_owned()),
            ..Default::default()
        }),
        net: spec.net.then_some(NetConfig {
            backend: NetBackendConfig::User {
                forwards: Vec::new(),
            },
            mac: DEFAULT_MAC,
        }),
        console: spec.console,
    };
    Ok(cfg)
}

/// Boots `spec.kernel`, waits for the ready line, snapshots it into `spec.out` and writes the
/// manifest.
pub fn build(spec: &BaseSpec) -> Result<Manifest> {
    let t0 = Instant::now();
    if spec.out.exists() {
        if !spec.force {
            bail!(
                "'{}' exists: choose another --out or pass --force to replace it",
                spec.out.display()
            );
        }
        std::fs::remove_dir_all(&spec.out)
            .with_context(|| format!("cannot remove '{}'", spec.out.display()))?;
    }
    std::fs::create_dir_all(&spec.out)?;
    let disk_path = std::fs::canonicalize(&spec.out)?.join(DISK);
    if let Some(d) = &spec.disk {
        std::fs::copy(d, &disk_path)
            .with_context(|| format!("cannot copy the disk image '{}'", d.display()))?;
        let f = std::fs::OpenOptions::new().write(true).open(&disk_path)?;
        let len = f.metadata()?.len();
        if len == 0 {
            bail!("the disk image '{}' is empty", d.display());
        }
        f.set_len(len.div_ceil(4096) * 4096)?;
    }
    let log = spec.out.join(".boot.log");
    let cfg = vm_config(spec, &disk_path, SerialOutput::File(log.clone()))?;
    let machine = vmm::builder::build_for_boot(&cfg).context("failed to boot the guest")?;
    let mut console = Console::new(&log);
    let ready = console.wait_line(&machine, &[&spec.ready], spec.timeout)?;
    tracing::info!(%ready, "guest ready");
    machine
        .snapshot(&spec.out)
        .context("failed to snapshot the guest")?;
    drop(machine);
    std::fs::remove_file(&log)?;
    fold_disk_delta(&spec.out, &disk_path)?;
    std::fs::copy(&spec.kernel, spec.out.join(KERNEL))
        .with_context(|| format!("cannot copy '{}'", spec.kernel.display()))?;
    let size = |n: &str| std::fs::metadata(spec.out.join(n)).map(|m| m.len());
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: hex(&content_id(&spec.out)?),
        mem_mib: spec.mem_mib,
        kernel_bytes: size(KERNEL)?,
        state_bytes: size(STATE)?,
        memory_bytes: size(MEMORY)?,
        memory_disk_bytes: disk_bytes(&spec.out.join(MEMORY)),
        cmdline: spec.cmdline.clone(),
        disk_bytes: spec.disk.as_ref().map(|_| size(DISK)).transpose()?,
    };
    std::fs::write(spec.out.join(MANIFEST), manifest.to_json())?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "base built");
    Ok(manifest)
}

/// Writes what the guest wrote to its disk while booting (the snapshot's δ) into the base's
/// own copy of the disk, so a base is always a plain disk plus an empty δ.
fn fold_disk_delta(dir: &Path, disk: &Path) -> Result<()> {
    let delta = dir.join(vmm::snapshot::DISK_DELTA_FILE);
    if !delta.exists() {
        return Ok(());
    }
    let state = vmm::snapshot::read_state(dir)?;
    let blocks = vmm::snapshot::read_disk_delta(dir, &state)?;
    if !blocks.is_empty() {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(disk)?;
        for (b, data) in &blocks {
            f.write_all_at(data, b * 4096)?;
        }
        f.sync_all()?;
        tracing::info!(
            blocks = blocks.len(),
            "disk writes made while booting kept in the base disk"
        );
    }
    std::fs::remove_file(&delta)?;
    Ok(())
}

/// Bytes the whole base directory occupies on disk.
pub fn base_disk_bytes(dir: &Path) -> u64 {
    [MANIFEST, KERNEL, STATE, MEMORY, DISK]
        .iter()
        .map(|n| disk_bytes(&dir.join(n)))
        .sum()
}

/// Recomputes the id of a base and compares it with its manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let m = Manifest::load(dir)?;
    let id = hex(&content_id(dir)?);
    if id != m.id {
        bail!(
            "base '{}' is damaged: its content id is {id}, the manifest says {}",
            dir.display(),
            m.id
        );
    }
    Ok(m)
}
