//! The slots' Boot Loader Specification entries on the ESP and systemd-boot's boot counting
//! in their file names (`loader/entries/`):
//!
//! ```text
//! cloudlet-a.conf        good: blessed (or never counted); boots whenever it sorts first
//! cloudlet-b+1.conf      trying: 1 try left, not yet blessed
//! cloudlet-b+1-2.conf    trying: 1 try left, 2 tries used
//! cloudlet-b+0-1.conf    bad: no tries left; systemd-boot sorts it last, so the other slot boots
//! ```
//!
//! systemd-boot decrements `LEFT` (and increments `DONE`) when it boots an entry;
//! `systemd-bless-boot.service` renames it to the plain name once `boot-complete.target` is
//! reached. Entries sort by `sort-key`, then by `version` (the generation), newest first.

use std::io;
use std::path::{Path, PathBuf};

use format::update::Slot;
use serde::Serialize;

/// Entry file names start with this, then the slot's label.
pub const PREFIX: &str = format::update::ENTRY_PREFIX;

/// An entry's boot-counting state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Assessment {
    /// No counter: blessed, or never counted.
    Good,
    /// Counting: `left` tries remain, `done` were used.
    Trying {
        /// Tries left.
        left: u32,
        /// Tries used.
        done: u32,
    },
    /// No tries left: the boot loader sorts it last.
    Bad {
        /// Tries used.
        done: u32,
    },
}

impl std::fmt::Display for Assessment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Assessment::Good => f.write_str("good"),
            Assessment::Trying { left, done } => write!(
                f,
                "trying ({left} {} left, {done} used)",
                if *left == 1 { "try" } else { "tries" }
            ),
            Assessment::Bad { done } => write!(f, "bad (no tries left, {done} used)"),
        }
    }
}

pub use format::update::EntryName;

/// An entry's boot-counting state, with the tries used.
pub fn assessment(name: &EntryName) -> Assessment {
    match name.left {
        None => Assessment::Good,
        Some(0) => Assessment::Bad {
            done: name.done.unwrap_or(0),
        },
        Some(left) => Assessment::Trying {
            left,
            done: name.done.unwrap_or(0),
        },
    }
}

/// An entry file of a slot on the ESP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its path.
    pub path: PathBuf,
    /// Its parsed name.
    pub name: EntryName,
    /// The generation it boots (its `version` line), when readable.
    pub generation: Option<u64>,
    /// Its `options` line.
    pub options: Option<String>,
}

/// The value of `key` in an entry's text (`key value` lines).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim())
    })
}

/// The entries of `slot` in `dir` (`ESP/loader/entries`), by file name; none when the
/// directory does not exist.
pub fn slot_entries(dir: &Path, slot: Slot) -> io::Result<Vec<Entry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let Some(name) = e.file_name().to_str().and_then(EntryName::parse) else {
            continue;
        };
        if name.slot != slot {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.push(Entry {
            path: e.path(),
            name,
            generation: field(&text, "version").and_then(|v| v.parse().ok()),
            options: field(&text, "options").map(str::to_string),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Removes every entry of `slot` in `dir` and fsyncs the directory; returns how many.
pub fn remove_slot_entries(dir: &Path, slot: Slot) -> io::Result<usize> {
    let entries = slot_entries(dir, slot)?;
    for e in &entries {
        std::fs::remove_file(&e.path)?;
    }
    if !entries.is_empty() {
        crate::sync_dir(dir)?;
    }
    Ok(entries.len())
}

/// Kernel command-line parameters the updater sets itself for each slot; the booted
/// system's others (console, quiet, …) carry over to the new entry.
const OWN_PARAMS: [&str; 5] = [
    "root=",
    "cloudlet.slot=",
    "cloudlet.generation=",
    "BOOT_IMAGE=",
    "initrd=",
];

/// The booted command line without the parameters the updater sets per slot.
pub fn carried_options(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|a| !OWN_PARAMS.iter().any(|p| a.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// What a new entry says.
#[derive(Clone, Debug)]
pub struct EntrySpec {
    /// The slot it boots.
    pub slot: Slot,
    /// The generation in it.
    pub generation: u64,
    /// The product version, for its title.
    pub version: String,
    /// Parameters carried over from the booted command line.
    pub carried: Vec<String>,
}

impl EntrySpec {
    /// The entry's text.
    pub fn render(&self) -> String {
        let s = self.slot.label();
        let g = self.generation;
        let mut options = vec![format!("root=PARTLABEL={}", self.slot.partlabel())];
        options.extend(self.carried.iter().cloned());
        options.push(format!("cloudlet.slot={s}"));
        options.push(format!("cloudlet.generation={g}"));
        format!(
            "title Cloudlet {} (slot {s}, generation {g})\n\
             sort-key cloudlet\n\
             version {g}\n\
             linux /cloudlet/{s}/vmlinuz\n\
             initrd /cloudlet/{s}/initrd.img\n\
             options {}\n",
            self.version,
            options.join(" ")
        )
    }
}

/// Writes the entry of `spec` into `dir` with `tries` boot tries (atomically); returns its
/// path.
pub fn write_entry(dir: &Path, spec: &EntrySpec, tries: u32) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(EntryName::counting(spec.slot, tries).file_name());
    crate::write_atomic(&path, spec.render().as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_counters() {
        let n = EntryName::parse("cloudlet-a.conf").unwrap();
        assert_eq!((n.slot, assessment(&n)), (Slot::A, Assessment::Good));
        let n = EntryName::parse("cloudlet-b+1.conf").unwrap();
        assert_eq!(
            (n.slot, assessment(&n)),
            (Slot::B, Assessment::Trying { left: 1, done: 0 })
        );
        let n = EntryName::parse("cloudlet-b+0-1.conf").unwrap();
        assert_eq!(assessment(&n), Assessment::Bad { done: 1 });
        let n = EntryName::parse("cloudlet-a+2-1.conf").unwrap();
        assert_eq!(assessment(&n), Assessment::Trying { left: 2, done: 1 });
        for bad in [
            "cloudlet-c.conf",
            "cloudlet-ab.conf",
            "cloudlet-a+.conf",
            "cloudlet-a+1-.conf",
            "cloudlet-a+x.conf",
            "cloudlet-a",
            "other-a.conf",
            "cloudlet-a.conf.new",
        ] {
            assert_eq!(EntryName::parse(bad), None, "{bad}");
        }
        for name in [
            "cloudlet-a.conf",
            "cloudlet-b+1.conf",
            "cloudlet-b+0-1.conf",
        ] {
            assert_eq!(EntryName::parse(name).unwrap().file_name(), name);
        }
        assert_eq!(
            EntryName::counting(Slot::B, 3).file_name(),
            "cloudlet-b+3.conf"
        );
        assert_eq!(
            EntryName::counting(Slot::A, 0).file_name(),
            "cloudlet-a.conf"
        );
    }

    #[test]
    fn entries_render_as_the_layout_says() {
        let cmdline = "BOOT_IMAGE=/vmlinuz initrd=\\x root=PARTLABEL=cloudlet-root-a rw rootwait \
                       console=tty0 console=ttyS0,115200 cloudlet.slot=a \
                       cloudlet.generation=1765000000\n";
        let spec = EntrySpec {
            slot: Slot::B,
            generation: 1765000100,
            version: "0.1.0".into(),
            carried: carried_options(cmdline),
        };
        assert_eq!(
            spec.render(),
            "title Cloudlet 0.1.0 (slot b, generation 1765000100)\n\
             sort-key cloudlet\n\
             version 1765000100\n\
             linux /cloudlet/b/vmlinuz\n\
             initrd /cloudlet/b/initrd.img\n\
             options root=PARTLABEL=cloudlet-root-b rw rootwait console=tty0 \
             console=ttyS0,115200 cloudlet.slot=b cloudlet.generation=1765000100\n"
        );
        let d = std::env::temp_dir().join(format!("updater-entries-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let p = write_entry(&d, &spec, 1).unwrap();
        assert!(p.ends_with("cloudlet-b+1.conf"));
        std::fs::write(d.join("cloudlet-a.conf"), "version 7\n").unwrap();
        std::fs::write(d.join("cloudlet-b+0-1.conf"), "version 5\n").unwrap();
        let b = slot_entries(&d, Slot::B).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].generation, Some(5));
        assert_eq!(b[1].generation, Some(1765000100));
        assert!(b[1]
            .options
            .as_deref()
            .unwrap()
            .contains("console=ttyS0,115200"));
        assert_eq!(remove_slot_entries(&d, Slot::B).unwrap(), 2);
        assert!(slot_entries(&d, Slot::B).unwrap().is_empty());
        assert_eq!(slot_entries(&d, Slot::A).unwrap()[0].generation, Some(7));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
