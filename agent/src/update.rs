//! System updates of an A/B appliance image: what the agent says about the booted slot, and
//! how it accepts an update artifact (`format::update`) over its API.
//!
//! The agent is unprivileged: it checks an uploaded artifact completely (prefix, header, this
//! board, a newer generation than it runs, every part's length and SHA-256) and leaves it at
//! `DATA/updates/pending.cup`. A root service (`cloudlet-update.path` → `cloudlet-update
//! apply-pending`) writes it to the slot not booted, records the result in
//! `DATA/updates/last.json` and reboots into it; systemd-boot's boot counting falls back to
//! the old slot when the new one does not come up healthy. See docs/appliance-image.md.

use std::io::Read;
use std::path::{Path, PathBuf};

use format::update::{
    read_header, Booted, PartKind, PartReader, UpdateRecord, UpdateState, PENDING_PATH, RECORD_PATH,
};
use serde::{Deserialize, Serialize};

/// What `GET /v1/system` says about the booted image (absent when the agent does not run
/// from an A/B appliance image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    /// The root slot booted (`a` or `b`).
    pub slot: format::update::Slot,
    /// The generation of the image in it.
    pub generation: u64,
    /// Where the last update stands.
    pub update: UpdateState,
    /// An accepted update waits to be applied (the box reboots once it is written).
    pub pending: bool,
    /// Each slot's boot entry on the ESP (a slot without one is empty or being written).
    pub slots: Vec<SlotEntry>,
}

/// A slot's boot entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotEntry {
    /// The slot.
    pub slot: format::update::Slot,
    /// The generation it boots (its `version` line).
    pub generation: Option<u64>,
    /// Good, on trial or bad (boot counting).
    #[serde(flatten)]
    pub state: format::update::EntryState,
}

/// Where the ESP holds the boot entries on an appliance image.
pub const ENTRIES_DIR: &str = "/boot/efi/loader/entries";

/// The slots' boot entries in `dir` (systemd-boot's `loader/entries`), A first.
pub fn slot_entries(dir: &Path) -> Vec<SlotEntry> {
    let mut out: Vec<SlotEntry> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let (slot, state) = format::update::parse_entry_name(name.to_str()?)?;
            let generation = std::fs::read_to_string(e.path()).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("version")?.trim().parse().ok())
            });
            Some(SlotEntry {
                slot,
                generation,
                state,
            })
        })
        .collect();
    out.sort_by_key(|e| e.slot.label());
    out
}

/// Why an update was not accepted; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateRefused {
    /// Not an A/B image.
    #[error("this agent does not run from an A/B appliance image (no cloudlet.slot= on the kernel command line): update a package install with apt instead")]
    NotAnImage,
    /// One is pending already.
    #[error("an update is already waiting to be applied: wait for the box to reboot into it")]
    Pending,
    /// The artifact is damaged or not one.
    #[error("the update artifact is damaged or not one: {0}")]
    Damaged(#[from] format::update::UpdateError),
    /// For another board.
    #[error("the update is for board '{0}', but this box is board '{1}': build it with `cargo xtask image --board {1}`")]
    WrongBoard(String, String),
    /// Not newer.
    #[error("the update's generation {0} is not newer than the running generation {1}: build a newer one")]
    NotNewer(u64, u64),
    /// I/O on the data directory.
    #[error("cannot {0}: {1}")]
    Io(&'static str, std::io::Error),
}

/// The boot information of a box whose kernel command line is `cmdline`, booted at unix
/// time `booted_at`, with data directory `data` and boot entries in `entries`.
pub fn boot_info(
    cmdline: &str,
    booted_at: Option<u64>,
    data: &Path,
    entries: &Path,
) -> Option<BootInfo> {
    Boot {
        booted: format::update::parse_cmdline(cmdline),
        booted_at,
        entries: entries.to_path_buf(),
    }
    .info(data)
}

/// Where the agent learns how the box booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSource {
    /// The kernel command line (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The boot entries (`/boot/efi/loader/entries`).
    pub entries: PathBuf,
}

impl Default for BootSource {
    fn default() -> Self {
        BootSource {
            cmdline: "/proc/cmdline".into(),
            entries: ENTRIES_DIR.into(),
        }
    }
}

impl BootSource {
    /// `DIR/cmdline` and `DIR/entries/` (the agent's hidden `--boot-info-dir`, for tests of
    /// the manager and the API on a machine not booted from an appliance image).
    pub fn in_dir(dir: &Path) -> BootSource {
        BootSource {
            cmdline: dir.join("cmdline"),
            entries: dir.join("entries"),
        }
    }
}

/// How this box booted: the kernel command line and the boot time are read once, when the
/// agent starts (they do not change while it runs, and `GET /v1/system` and every mDNS
/// refresh ask); the record and the boot entries, which updates change, when asked.
#[derive(Clone, Debug, Default)]
pub struct Boot {
    /// The slot and generation booted; None off an A/B appliance image.
    pub booted: Option<Booted>,
    /// The boot time, unix seconds (`btime` in `/proc/stat`).
    booted_at: Option<u64>,
    /// The boot entries' directory.
    entries: PathBuf,
}

impl Boot {
    /// Reads the command line of `src` and the boot time.
    pub fn read(src: &BootSource) -> Boot {
        let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
        });
        Boot {
            booted: std::fs::read_to_string(&src.cmdline)
                .ok()
                .and_then(|c| format::update::parse_cmdline(&c)),
            booted_at: btime,
            entries: src.entries.clone(),
        }
    }

    /// What `GET /v1/system` says about the boot with data directory `data` (None, with
    /// nothing read, off an A/B image).
    pub fn info(&self, data: &Path) -> Option<BootInfo> {
        let b = self.booted?;
        let record = std::fs::read_to_string(data.join(RECORD_PATH))
            .ok()
            .and_then(|s| UpdateRecord::parse(&s).ok());
        Some(BootInfo {
            slot: b.slot,
            generation: b.generation,
            update: UpdateState::of(Some(&b), record.as_ref(), self.booted_at),
            pending: data.join(PENDING_PATH).exists(),
            slots: slot_entries(&self.entries),
        })
    }
}

/// An update the agent accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Its generation.
    pub generation: u64,
    /// Its version.
    pub version: String,
    /// The slot it goes to.
    pub slot: format::update::Slot,
    /// Its size, bytes.
    pub bytes: u64,
    /// What happens next.
    pub next: String,
}

/// Checks the artifact at `file` (uploaded into the data directory `data`) for board
/// `board` on a box running `booted`, and moves it to `DATA/updates/pending.cup`; the file
/// is removed when refused.
pub fn accept(
    file: &Path,
    data: &Path,
    board: &str,
    booted: Option<Booted>,
) -> Result<Accepted, UpdateRefused> {
    let r = check(file, data, board, booted);
    if r.is_err() {
        let _ = std::fs::remove_file(file);
    }
    r
}

fn check(
    file: &Path,
    data: &Path,
    board: &str,
    booted: Option<Booted>,
) -> Result<Accepted, UpdateRefused> {
    let b = booted.ok_or(UpdateRefused::NotAnImage)?;
    let pending: PathBuf = data.join(PENDING_PATH);
    if pending.exists() {
        return Err(UpdateRefused::Pending);
    }
    let open = || std::fs::File::open(file).map_err(|e| UpdateRefused::Io("open the upload", e));
    let mut f = std::io::BufReader::new(open()?);
    let head = read_header(&mut f)?;
    if head.header.board != board {
        return Err(UpdateRefused::WrongBoard(head.header.board, board.into()));
    }
    if head.header.generation <= b.generation {
        return Err(UpdateRefused::NotNewer(
            head.header.generation,
            b.generation,
        ));
    }
    for kind in [PartKind::Root, PartKind::Kernel, PartKind::Initrd] {
        head.header.require(kind)?;
    }
    // Every part, in payload order: decompressed, counted and hashed (PartReader fails at
    // the end of a part whose length or hash differ).
    for part in &head.header.parts {
        let mut r = PartReader::new(&mut f, part)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    let msg = e.to_string();
                    let inner = e.into_inner().and_then(|i| i.downcast().ok());
                    return Err(match inner {
                        Some(u) => UpdateRefused::Damaged(*u),
                        None => UpdateRefused::Io("read the upload", std::io::Error::other(msg)),
                    });
                }
            }
        }
    }
    let bytes = std::fs::metadata(file)
        .map_err(|e| UpdateRefused::Io("inspect the upload", e))?
        .len();
    std::fs::create_dir_all(pending.parent().expect("in updates/"))
        .map_err(|e| UpdateRefused::Io("make DATA/updates", e))?;
    std::fs::rename(file, &pending).map_err(|e| UpdateRefused::Io("keep the update", e))?;
    let slot = b.slot.other();
    Ok(Accepted {
        generation: head.header.generation,
        version: head.header.version,
        slot,
        bytes,
        next: format!(
            "cloudlet-update writes it to slot {slot} and reboots into it; if it does not come up healthy the box falls back to slot {} by itself",
            b.slot
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::update::{write_artifact_from, Slot, UpdateResult};

    fn artifact(board: &str, generation: u64) -> Vec<u8> {
        let mut out = vec![];
        write_artifact_from(
            &mut out,
            board,
            generation,
            "0.1.0",
            1,
            vec![
                (PartKind::Root, &[7u8; 4096][..]),
                (PartKind::Kernel, &b"kernel"[..]),
                (PartKind::Initrd, &b"initrd"[..]),
            ],
        )
        .unwrap();
        out
    }

    fn booted_a(generation: u64) -> Option<Booted> {
        Some(Booted {
            slot: Slot::A,
            generation,
        })
    }

    #[test]
    fn a_good_artifact_becomes_pending_for_the_other_slot() {
        let d = tempdir();
        let f = d.join("up");
        std::fs::write(&f, artifact("dev", 20)).unwrap();
        let a = accept(&f, &d, "dev", booted_a(10)).unwrap();
        assert_eq!((a.generation, a.slot), (20, Slot::B));
        assert!(d.join(PENDING_PATH).exists() && !f.exists());
        // A second one waits for the first.
        std::fs::write(&f, artifact("dev", 21)).unwrap();
        assert!(matches!(
            accept(&f, &d, "dev", booted_a(10)),
            Err(UpdateRefused::Pending)
        ));
        assert!(!f.exists(), "a refused upload is removed");
        let info = boot_info(
            "root=x cloudlet.slot=a cloudlet.generation=10",
            None,
            &d,
            &d,
        )
        .unwrap();
        assert!(info.pending);
    }

    #[test]
    fn refusals_leave_nothing_pending() {
        let d = tempdir();
        let f = d.join("up");
        let cases: Vec<(Vec<u8>, Option<Booted>, &str)> = vec![
            (artifact("dev", 20), None, "A/B appliance image"),
            (artifact("minipc-4c", 20), booted_a(10), "board 'minipc-4c'"),
            (artifact("dev", 10), booted_a(10), "not newer"),
            (
                b"not an artifact at all, just some bytes".repeat(4),
                booted_a(1),
                "damaged",
            ),
            (
                {
                    let mut a = artifact("dev", 20);
                    let n = a.len();
                    a[n - 20] ^= 0xff; // in the last part's zstd stream
                    a
                },
                booted_a(10),
                "damaged",
            ),
        ];
        for (bytes, booted, want) in cases {
            std::fs::write(&f, bytes).unwrap();
            let e = accept(&f, &d, "dev", booted).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should say {want}");
            assert!(!d.join(PENDING_PATH).exists() && !f.exists());
        }
    }

    #[test]
    fn boot_info_reads_the_record() {
        let d = tempdir();
        assert_eq!(boot_info("quiet", None, &d, &d), None);
        let entries = d.join("entries");
        std::fs::create_dir_all(&entries).unwrap();
        std::fs::write(entries.join("cloudlet-b+0-1.conf"), "title x\nversion 9\n").unwrap();
        std::fs::write(entries.join("cloudlet-a.conf"), "title x\nversion 7\n").unwrap();
        std::fs::write(entries.join("debian.conf"), "version 1\n").unwrap();
        let i = boot_info("cloudlet.slot=b cloudlet.generation=7", None, &d, &entries).unwrap();
        assert_eq!(
            (i.slot, i.generation, i.update),
            (Slot::B, 7, UpdateState::None)
        );
        assert_eq!(
            i.slots,
            vec![
                SlotEntry {
                    slot: Slot::A,
                    generation: Some(7),
                    state: format::update::EntryState::Good
                },
                SlotEntry {
                    slot: Slot::B,
                    generation: Some(9),
                    state: format::update::EntryState::Bad
                },
            ]
        );
        let rec = UpdateRecord {
            v: 1,
            generation: 9,
            version: "0.1.0".into(),
            slot: Slot::A,
            applied_unix: 100,
            result: UpdateResult::Applied,
            error: None,
        };
        std::fs::create_dir_all(d.join("updates")).unwrap();
        std::fs::write(d.join(RECORD_PATH), rec.to_json()).unwrap();
        let i = boot_info(
            "cloudlet.slot=b cloudlet.generation=7",
            Some(200),
            &d,
            &entries,
        )
        .unwrap();
        assert_eq!(i.update, UpdateState::RolledBack { attempted: 9 });
        let i = boot_info(
            "cloudlet.slot=a cloudlet.generation=9",
            Some(200),
            &d,
            &entries,
        )
        .unwrap();
        assert_eq!(i.update, UpdateState::Running);
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "agent-update-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
