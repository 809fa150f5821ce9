//! `image-builder base`: boot a guest to its ready point and keep it as a base image.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image_format::base::{hex, Manifest, MANIFEST, MANIFEST_VERSION};
use sha2::{Digest, Sha256};
use vmm::config::{SerialOutput, VmConfig};
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
}

/// SHA-256 over `kernel`, `state`, `memory` of a base directory, each prefixed by its length.
pub fn content_id(dir: &Path) -> Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for name in ["kernel", "state", "memory"] {
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        h.update(f.metadata()?.len().to_le_bytes());
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().into())
}

/// Bytes a file occupies on disk.
pub fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
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
    let log = spec.out.join(".boot.log");
    let cfg = VmConfig::new(
        KernelConfig {
            kernel: spec.kernel.clone(),
            initrd: None,
            cmdline: spec.cmdline.clone(),
            protocol: BootProtocol::Linux,
        },
        spec.mem_mib,
        1,
        SerialOutput::File(log.clone()),
        false,
    )?;
    let machine = vmm::builder::build_for_boot(&cfg).context("failed to boot the guest")?;
    let mut console = Console::new(&log);
    let ready = console.wait_line(&machine, &[&spec.ready], spec.timeout)?;
    tracing::info!(%ready, "guest ready");
    machine
        .snapshot(&spec.out)
        .context("failed to snapshot the guest")?;
    drop(machine);
    std::fs::remove_file(&log)?;
    std::fs::copy(&spec.kernel, spec.out.join("kernel"))
        .with_context(|| format!("cannot copy '{}'", spec.kernel.display()))?;
    let size = |n: &str| std::fs::metadata(spec.out.join(n)).map(|m| m.len());
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        id: hex(&content_id(&spec.out)?),
        mem_mib: spec.mem_mib,
        kernel_bytes: size("kernel")?,
        state_bytes: size("state")?,
        memory_bytes: size("memory")?,
        memory_disk_bytes: disk_bytes(&spec.out.join("memory")),
        cmdline: spec.cmdline.clone(),
    };
    std::fs::write(spec.out.join(MANIFEST), manifest.to_json())?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "base built");
    Ok(manifest)
}

/// Bytes the whole base directory occupies on disk.
pub fn base_disk_bytes(dir: &Path) -> u64 {
    [MANIFEST, "kernel", "state", "memory"]
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
