//! `image-builder overlay`: the δ between a base and a customised guest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use format::base::Manifest;
use format::mapped::Mapped;
use format::overlay::{self, BuildOptions, Stats};
use format::progress::Step;
use vmm::builder::{build_from_snapshot, RestoreConfig};
use vmm::config::SerialOutput;

use crate::console::Console;

/// Builds an overlay from `snapshot` (a `vmm snapshot` of a VM restored from `base` and then
/// customised) against `base`.
pub fn from_snapshot(
    base: &Path,
    snapshot: &Path,
    out: &Path,
    opts: BuildOptions,
) -> Result<Stats> {
    let t0 = Instant::now();
    let manifest = Manifest::load(base)?;
    let state = vmm::snapshot::read_state(snapshot)?;
    if state.mem_mib != manifest.mem_mib {
        bail!(
            "the snapshot has {} MiB of RAM, the base {} MiB: it was not made from this base",
            state.mem_mib,
            manifest.mem_mib
        );
    }
    let state_bytes = std::fs::read(snapshot.join(format::base::STATE))?;
    let disk_blocks = vmm::snapshot::read_disk_delta(snapshot, &state)?;
    let disk_size = state
        .virtio
        .iter()
        .find_map(|s| s.disk.as_ref())
        .map(|d| d.size);
    if disk_size != manifest.disk_bytes {
        bail!(
            "the snapshot's disk ({disk_size:?} bytes) is not the base's ({:?} bytes): it was not made from this base",
            manifest.disk_bytes
        );
    }
    let open =
        |p: PathBuf| Mapped::open(&p).with_context(|| format!("cannot map '{}'", p.display()));
    let base_mem = open(base.join(format::base::MEMORY))?;
    let new_mem = open(snapshot.join(format::base::MEMORY))?;
    let stats = overlay::build(
        base_mem.bytes(),
        new_mem.bytes(),
        &manifest.id_bytes(),
        state_bytes,
        disk_size.map(|disk_bytes| overlay::DiskDelta {
            disk_bytes,
            blocks: &disk_blocks,
        }),
        out,
        opts,
    )?;
    tracing::info!(
        ms = t0.elapsed().as_millis() as u64,
        ?stats,
        "overlay built"
    );
    Ok(stats)
}

/// The devices of a VM restored from `base`: its own disk file (wherever the base now lives).
pub fn base_devices(base: &Path, manifest: &Manifest) -> vmm::config::DevicesConfig {
    vmm::config::DevicesConfig {
        disk: manifest.disk_bytes.map(|_| vmm::config::DiskConfig {
            base: Some(base.join(format::base::DISK)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A file to place on the guest's disk: its guest path (`format::disk_file`) and bytes.
#[derive(Clone, Debug)]
pub struct DiskFile {
    /// `/dev/vda@OFFSET`.
    pub path: String,
    /// The content.
    pub data: Vec<u8>,
}

/// Places `files` on `base`'s disk as a snapshot directory of its own (`staged`): the base's
/// state and memory (linked) with a disk δ holding the files, so the restored guest finds
/// them on its disk and the snapshot taken later carries them in its δ.
fn stage_files(
    base: &Path,
    manifest: &Manifest,
    files: &[DiskFile],
    staged: &Path,
    report: &mut dyn FnMut(Step),
) -> Result<()> {
    use vmm::devices::virtio::{CowDisk, Delta};
    if files.len() > format::disk_file::MAX_FILES {
        bail!(
            "{} files given, at most {} are placed by one build",
            files.len(),
            format::disk_file::MAX_FILES
        );
    }
    let total: usize = files.iter().map(|f| f.data.len()).sum();
    if total > format::disk_file::MAX_TOTAL_BYTES {
        bail!(
            "the files hold {total} bytes, at most {} are placed by one build",
            format::disk_file::MAX_TOTAL_BYTES
        );
    }
    let mut placed = Vec::with_capacity(files.len());
    for f in files {
        placed.push(format::disk_file::check(
            &f.path,
            f.data.len(),
            manifest.disk_bytes,
        )?);
    }
    let disk_bytes = manifest.disk_bytes.expect("checked: the base has a disk");
    if staged.exists() {
        std::fs::remove_dir_all(staged)?;
    }
    std::fs::create_dir_all(staged)?;
    for name in [format::base::STATE, format::base::MEMORY] {
        let from = std::fs::canonicalize(base.join(name))
            .with_context(|| format!("the base has no {name}"))?;
        std::os::unix::fs::symlink(&from, staged.join(name))?;
    }
    let delta = Delta::create(&staged.join(vmm::snapshot::DISK_DELTA_FILE), disk_bytes)
        .context("cannot make the disk δ for the files")?;
    let mut disk = CowDisk::new(
        Some(CowDisk::open_base(&base.join(format::base::DISK))?),
        delta,
    )?;
    for (i, (f, offset)) in files.iter().zip(placed).enumerate() {
        disk.write_at(offset, &f.data)
            .with_context(|| format!("cannot place {} on the disk", f.path))?;
        tracing::info!(path = %f.path, bytes = f.data.len(), "file placed");
        report(Step::File {
            index: i as u32 + 1,
            total: files.len() as u32,
            path: f.path.clone(),
            bytes: f.data.len() as u64,
        });
    }
    disk.flush()?;
    Ok(())
}

/// Places `files` on `base`'s disk, restores it, runs `script` (commands separated by `,`,
/// `:` between a command and its argument, as in `micro.run=`) on its console, snapshots it
/// into `snapshot_dir` and builds the overlay from that, telling `report` each step as it
/// starts (`format::progress`).
#[allow(clippy::too_many_arguments)]
pub fn from_script(
    base: &Path,
    script: &str,
    files: &[DiskFile],
    snapshot_dir: &Path,
    out: &Path,
    opts: BuildOptions,
    timeout: Duration,
    report: &mut dyn FnMut(Step),
) -> Result<Stats> {
    let manifest = Manifest::load(base)?;
    std::fs::create_dir_all(snapshot_dir)?;
    let staged = snapshot_dir.join("base-with-files");
    let restore_from = if files.is_empty() {
        base.to_owned()
    } else {
        stage_files(base, &manifest, files, &staged, report)?;
        staged.clone()
    };
    report(Step::Restore);
    let log = snapshot_dir.join("console.log");
    let machine = build_from_snapshot(&RestoreConfig {
        snapshot: restore_from,
        serial: SerialOutput::File(log.clone()),
        serial_input: false,
        paused: false,
        kvm_path: "/dev/kvm".into(),
        devices: base_devices(base, &manifest),
    })
    .context("failed to restore the base")?;
    let _ = std::fs::remove_dir_all(&staged);
    let mut console = Console::new(&log);
    let cmds: Vec<&str> = script
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    for (i, cmd) in cmds.iter().enumerate() {
        let line = cmd.replace(':', " ");
        let reply = console.command(&machine, &line, timeout)?;
        tracing::info!(%line, %reply, "customising");
        report(Step::Command {
            index: i as u32 + 1,
            total: cmds.len() as u32,
            line,
            reply,
        });
    }
    report(Step::Snapshot);
    machine
        .snapshot(snapshot_dir)
        .context("failed to snapshot the customised guest")?;
    drop(machine);
    report(Step::Diff);
    from_snapshot(base, snapshot_dir, out, opts)
}
