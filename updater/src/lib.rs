//! The appliance's A/B updater (`cloudlet-update`): writes an update artifact
//! (`format::update`, a `.cup` file) to the root slot the box did not boot from, and hands the
//! new slot to systemd-boot's automatic boot assessment.
//!
//! The disk: GPT partitions `cloudlet-esp` (vfat, `/boot/efi`), `cloudlet-root-a`,
//! `cloudlet-root-b` (ext4 root slots) and `cloudlet-data` (the agent's data directory). Each
//! slot boots through a Boot Loader Specification entry on the ESP,
//! `loader/entries/cloudlet-SLOT[+LEFT[-DONE]].conf`, with its kernel and initrd in
//! `ESP/cloudlet/SLOT/`; the kernel command line names the slot and generation
//! (`cloudlet.slot=`, `cloudlet.generation=`).
//!
//! An update, in an order that never leaves a bootable half-written slot ([`apply`]):
//! the target slot's entries are removed first, then its root partition, kernel and initrd are
//! written and verified, and only then its entry appears, with a boot counter (`+1`):
//! systemd-boot tries it once; `systemd-bless-boot` makes it permanent once the box reaches
//! `boot-complete.target`, which [`health`] (the `check-health` command) gates on the agent
//! answering; otherwise the entry is left with no tries and the box boots the other slot.
//!
//! - [`entries`]: entry file names with their boot counters, reading and writing entries;
//! - [`apply`]: the checks (board, generation, size, mounted) and the write;
//! - [`status`]: what each slot holds and where the last update stands;
//! - [`health`]: the boot assessment (the agent answers `GET /v1/system`);
//! - [`paths`]: where everything is on an appliance, each overridable for tests.
//!
//! `updater/systemd/` holds reference units: `cloudlet-boot-check.service` (the assessment,
//! only on a counted boot, rebooting when unhealthy) and `cloudlet-update.path` + `.service`
//! (apply what the agent left in `DATA/updates/pending.cup`).

pub mod apply;
pub mod entries;
pub mod health;
pub mod paths;
pub mod status;

pub use paths::Paths;

use std::io::{self, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsynced, renamed over it,
/// then the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Fsyncs a directory, so that a rename or removal in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Seconds since the epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
