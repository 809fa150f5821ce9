//! What each slot holds and where the last update stands (`cloudlet-update status`).

use format::update::{Booted, Slot, UpdateRecord, UpdateState};
use serde::Serialize;

use crate::entries::{self, Assessment};
use crate::Paths;

/// One boot entry of a slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryStatus {
    /// Its file name.
    pub file: String,
    /// The generation it boots, when its `version` line reads.
    pub generation: Option<u64>,
    /// Its boot-counting state.
    pub assessment: Assessment,
}

/// One slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    /// Which.
    pub slot: Slot,
    /// Whether the box runs from it.
    pub booted: bool,
    /// Its entries on the ESP (none: the slot does not boot; more than one only if something
    /// other than the updater wrote them).
    pub entries: Vec<EntryStatus>,
}

/// The whole picture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The running slot and generation, when the command line names them.
    pub booted: Option<Booted>,
    /// Both slots, A first.
    pub slots: Vec<SlotStatus>,
    /// The last update's record.
    pub last: Option<UpdateRecord>,
    /// Where the box stands with it.
    pub update: UpdateState,
}

/// Reads the status of the box described by `paths`; `booted_at_unix` is the boot time
/// (see [`UpdateState::of`]).
pub fn status(paths: &Paths, booted_at_unix: Option<u64>) -> std::io::Result<Status> {
    let booted = paths.booted();
    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let entries = entries::slot_entries(&paths.entries_dir(), slot)?
            .into_iter()
            .map(|e| EntryStatus {
                file: e
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                generation: e.generation,
                assessment: entries::assessment(&e.name),
            })
            .collect();
        slots.push(SlotStatus {
            slot,
            booted: booted.is_some_and(|b| b.slot == slot),
            entries,
        });
    }
    let last = paths.last_record();
    let update = UpdateState::of(booted.as_ref(), last.as_ref(), booted_at_unix);
    Ok(Status {
        booted,
        slots,
        last,
        update,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.booted {
            Some(b) => writeln!(f, "booted: slot {}, generation {}", b.slot, b.generation)?,
            None => writeln!(
                f,
                "booted: unknown (no cloudlet.slot= / cloudlet.generation= on the kernel command line)"
            )?,
        }
        for s in &self.slots {
            let mark = if s.booted { " (running)" } else { "" };
            if s.entries.is_empty() {
                writeln!(f, "slot {}{mark}: empty (no boot entry)", s.slot)?;
            }
            for e in &s.entries {
                let g = e.generation.map_or_else(
                    || "unknown generation".into(),
                    |g| format!("generation {g}"),
                );
                // systemd-boot counts a try before it boots the entry: the running slot's
                // entry shows a counter until systemd-bless-boot renames it.
                let assessed = if s.booted && e.assessment != Assessment::Good {
                    ", this boot is being assessed"
                } else {
                    ""
                };
                writeln!(
                    f,
                    "slot {}{mark}: {g}, {}{assessed} ({})",
                    s.slot, e.assessment, e.file
                )?;
            }
        }
        match (&self.update, &self.last) {
            (UpdateState::None, None) => writeln!(f, "last update: none recorded"),
            (UpdateState::None, Some(r)) => writeln!(
                f,
                "last update: generation {} to slot {} ({:?}), not the running system's",
                r.generation, r.slot, r.result
            ),
            (UpdateState::Running, Some(r)) => writeln!(
                f,
                "last update: generation {} ({}) is running",
                r.generation, r.version
            ),
            (UpdateState::Pending { generation }, _) => writeln!(
                f,
                "last update: generation {generation} applied, boots on the next restart"
            ),
            (UpdateState::RolledBack { attempted }, _) => writeln!(
                f,
                "last update: generation {attempted} did not come up healthy; the box rolled back"
            ),
            (UpdateState::Failed { error }, _) => writeln!(f, "last update: failed: {error}"),
            (UpdateState::Running, None) => writeln!(f, "last update: running"),
        }
    }
}
