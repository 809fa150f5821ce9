//! Where the updater finds everything on an appliance; each path has a command-line override
//! so tests run against temporary directories and files.

use std::path::{Path, PathBuf};

use format::update::{parse_cmdline, Booted, Slot, UpdateRecord, RECORD_PATH};

/// The paths the updater reads and writes.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The mounted ESP (`/boot/efi`).
    pub esp: PathBuf,
    /// The directory of partitions by GPT label (`/dev/disk/by-partlabel`).
    pub devices: PathBuf,
    /// The running kernel's command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The board's config (`/etc/cloudlet/board.toml`).
    pub board_file: PathBuf,
    /// The agent's data directory (`/var/lib/cloudlet`).
    pub data_dir: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            esp: "/boot/efi".into(),
            devices: "/dev/disk/by-partlabel".into(),
            cmdline: "/proc/cmdline".into(),
            board_file: "/etc/cloudlet/board.toml".into(),
            data_dir: "/var/lib/cloudlet".into(),
        }
    }
}

impl Paths {
    /// A slot's root partition (`DEVICES/cloudlet-root-SLOT`).
    pub fn root_device(&self, slot: Slot) -> PathBuf {
        self.devices.join(slot.partlabel())
    }

    /// A slot's kernel and initrd directory on the ESP (`ESP/cloudlet/SLOT`).
    pub fn slot_boot_dir(&self, slot: Slot) -> PathBuf {
        self.esp.join("cloudlet").join(slot.label())
    }

    /// The boot entries directory (`ESP/loader/entries`).
    pub fn entries_dir(&self) -> PathBuf {
        self.esp.join("loader").join("entries")
    }

    /// The last update's record (`DATA/updates/last.json`).
    pub fn record(&self) -> PathBuf {
        self.data_dir.join(RECORD_PATH)
    }

    /// The artifact the agent leaves for `apply-pending` (`DATA/updates/pending.cup`).
    pub fn pending(&self) -> PathBuf {
        self.data_dir.join(format::update::PENDING_PATH)
    }

    /// The command line's text, or why it could not be read.
    pub fn read_cmdline(&self) -> std::io::Result<String> {
        std::fs::read_to_string(&self.cmdline)
    }

    /// The booted slot and generation, when the command line names them.
    pub fn booted(&self) -> Option<Booted> {
        parse_cmdline(&self.read_cmdline().ok()?)
    }

    /// The last update's record, when there is a readable one (a damaged record is logged
    /// and treated as none).
    pub fn last_record(&self) -> Option<UpdateRecord> {
        read_record(&self.record())
    }
}

/// The record at `path`, when there is a readable, valid one.
pub fn read_record(path: &Path) -> Option<UpdateRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    match UpdateRecord::parse(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

/// The boot time in unix seconds (`btime` in `/proc/stat`).
pub fn boot_time_unix() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}
