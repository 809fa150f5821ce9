//! Applying an update artifact to the slot the box did not boot from.
//!
//! [`plan`] checks everything first and changes nothing: the running system's slot and
//! generation (kernel command line), that the running slot is blessed (while it is on trial,
//! the other slot is its fallback and stays as it is), the board (`/etc/cloudlet/board.toml`), the artifact's
//! prefix and header, its generation (newer than the booted one unless downgrades are
//! allowed), that it has a root, kernel and initrd, and that the target partition exists, is
//! not mounted and is large enough. [`Plan::execute`] then writes, in this order, so that a
//! power cut or a corrupt part never leaves a bootable half-written slot:
//!
//! 1. the target slot's entries are removed (directory fsynced): nothing boots it any more;
//! 2. the root part is streamed into the target partition, fsynced, read back and compared
//!    (SHA-256);
//! 3. kernel and initrd go to `ESP/cloudlet/SLOT/` (temporary file, fsync, rename);
//! 4. its entry `cloudlet-SLOT+TRIES.conf` is written, with the booted command line's
//!    board-specific parameters carried over.
//!
//! Every part is verified (length, SHA-256) while it streams; a part that fails stops the
//! apply before step 4. The caller records the outcome ([`record`]) and reboots.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use format::update::{
    open_part, read_header, ArtifactHead, Booted, PartKind, PartReader, Slot, UpdateError,
    UpdateHeader, UpdateRecord, UpdateResult, RECORD_VERSION,
};
use sha2::{Digest, Sha256};

use crate::entries::{self, EntrySpec};
use crate::Paths;

/// Why an update was refused (nothing changed) or failed (the target slot has no entry).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The command line could not be read.
    #[error("cannot read the kernel command line {0}")]
    Cmdline(PathBuf, #[source] io::Error),
    /// The command line names no slot.
    #[error("the kernel command line ({0}) has no cloudlet.slot= and cloudlet.generation=: this system did not boot from a cloudlet root slot, so there is no inactive slot to update")]
    NotBooted(PathBuf),
    /// The board file is missing or invalid.
    #[error("cannot read the board config")]
    Board(#[source] agent::board::BoardError),
    /// The data directory cannot be opened or locked.
    #[error("cannot lock the data directory {0} (it must exist; --data-dir)")]
    DataDir(PathBuf, #[source] io::Error),
    /// Another apply holds the lock.
    #[error("another update is being applied (it holds the lock on {0}): wait for it to finish")]
    Busy(PathBuf),
    /// The ESP is not where it should be.
    #[error("no ESP at {0} (it has no loader/ directory): is the ESP mounted there? (--esp)")]
    NoEsp(PathBuf),
    /// The running slot is itself on trial: the other slot is its fallback.
    #[error("the running slot {slot} is still being assessed ({entry}): its fallback, slot {other}, must stay as it is until this boot is blessed; apply once `cloudlet-update status` shows slot {slot} good")]
    NotBlessed {
        /// The running slot.
        slot: Slot,
        /// The other slot.
        other: Slot,
        /// Its entry's file name.
        entry: String,
    },
    /// The ESP's entries cannot be read.
    #[error("cannot read the boot entries in {0}")]
    Entries(PathBuf, #[source] io::Error),
    /// The artifact could not be opened.
    #[error("cannot open the update artifact {0}")]
    Open(PathBuf, #[source] io::Error),
    /// The artifact's prefix or header is invalid, or a part is missing.
    #[error("the update artifact {0} is not usable")]
    Artifact(PathBuf, #[source] UpdateError),
    /// Made for another board.
    #[error("the update is for board '{artifact}', this box is board '{board}': use the artifact built for '{board}'")]
    WrongBoard {
        /// The artifact's board.
        artifact: String,
        /// This box's board.
        board: String,
    },
    /// Not newer than what runs.
    #[error("the update's generation {artifact} is not newer than the running generation {booted}: nothing to do (pass --allow-downgrade to install it anyway)")]
    NotNewer {
        /// The artifact's generation.
        artifact: u64,
        /// The booted generation.
        booted: u64,
    },
    /// The target partition does not exist or cannot be opened.
    #[error("cannot open the target partition {0} (is the disk partitioned with cloudlet-root-a and cloudlet-root-b?)")]
    Device(PathBuf, #[source] io::Error),
    /// The target partition is mounted.
    #[error("the target partition {path} is mounted at {mountpoint}: unmount it first")]
    Mounted {
        /// The partition.
        path: PathBuf,
        /// Where it is mounted.
        mountpoint: String,
    },
    /// The target partition is held by the kernel (mounted elsewhere, swap, a device mapper).
    #[error("the target partition {0} is in use (mounted in another namespace, swap, RAID or device mapper): free it first")]
    InUse(PathBuf),
    /// The root image does not fit.
    #[error("the update's root image ({len} bytes) is larger than the target partition {path} ({size} bytes): build the image for this disk layout")]
    TooBig {
        /// The root image's length.
        len: u64,
        /// The partition.
        path: PathBuf,
        /// The partition's size.
        size: u64,
    },
    /// A step after the first change failed; the target slot has no entry.
    #[error(
        "{step} failed; slot {slot} has no boot entry, the box keeps booting the running slot"
    )]
    Failed {
        /// What was being done.
        step: String,
        /// The slot being written.
        slot: Slot,
        /// Why.
        #[source]
        source: UpdateError,
    },
}

impl ApplyError {
    /// Whether nothing was changed (a refusal), as opposed to a failure part way.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ApplyError::Failed { .. })
    }

    /// The error and its causes on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

/// Options of an apply.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    /// Install a generation not newer than the booted one.
    pub allow_downgrade: bool,
    /// Boot tries the new entry gets (`+TRIES`); 0 makes it good at once (no fallback).
    pub tries: u32,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            allow_downgrade: false,
            tries: 1,
        }
    }
}

/// What an apply reports while it works.
#[derive(Clone, Debug)]
pub enum Event {
    /// A step begins.
    Step(String),
    /// Root bytes written so far.
    Root {
        /// Bytes written.
        written: u64,
        /// Bytes in all.
        total: u64,
    },
    /// A step ended after `secs`.
    Done(String, f64),
}

/// A checked update, ready to write.
#[derive(Debug)]
pub struct Plan {
    /// Held until the plan is dropped: one apply at a time.
    _lock: nix::fcntl::Flock<File>,
    paths: Paths,
    artifact: PathBuf,
    head: ArtifactHead,
    booted: Booted,
    cmdline: String,
    tries: u32,
    /// The slot it writes.
    pub target: Slot,
    /// The partition it writes.
    pub device: PathBuf,
}

/// What a successful apply did.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The artifact's header.
    pub header: UpdateHeader,
    /// The slot written.
    pub slot: Slot,
    /// The entry written.
    pub entry: PathBuf,
    /// Each step and how long it took.
    pub timings: Vec<(String, Duration)>,
}

/// Checks an update of the box described by `paths` with `artifact`; changes nothing.
pub fn plan(paths: &Paths, artifact: &Path, opts: ApplyOptions) -> Result<Plan, ApplyError> {
    let dir =
        File::open(&paths.data_dir).map_err(|e| ApplyError::DataDir(paths.data_dir.clone(), e))?;
    let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| ApplyError::Busy(paths.data_dir.clone()))?;
    if !paths.esp.join("loader").is_dir() {
        return Err(ApplyError::NoEsp(paths.esp.clone()));
    }
    let cmdline = paths
        .read_cmdline()
        .map_err(|e| ApplyError::Cmdline(paths.cmdline.clone(), e))?;
    let booted = format::update::parse_cmdline(&cmdline)
        .ok_or_else(|| ApplyError::NotBooted(paths.cmdline.clone()))?;
    let entries_dir = paths.entries_dir();
    let running = entries::slot_entries(&entries_dir, booted.slot)
        .map_err(|e| ApplyError::Entries(entries_dir.clone(), e))?;
    if let Some(e) = running
        .iter()
        .find(|e| entries::assessment(&e.name) != entries::Assessment::Good)
    {
        return Err(ApplyError::NotBlessed {
            slot: booted.slot,
            other: booted.slot.other(),
            entry: e.name.file_name(),
        });
    }
    let board = agent::board::Board::load(&paths.board_file).map_err(ApplyError::Board)?;
    let mut f = File::open(artifact).map_err(|e| ApplyError::Open(artifact.into(), e))?;
    let head = read_header(&mut io::BufReader::new(&mut f))
        .map_err(|e| ApplyError::Artifact(artifact.into(), e))?;
    let h = &head.header;
    for kind in [PartKind::Root, PartKind::Kernel, PartKind::Initrd] {
        h.require(kind)
            .map_err(|e| ApplyError::Artifact(artifact.into(), e))?;
    }
    let have = f
        .metadata()
        .map_err(|e| ApplyError::Open(artifact.into(), e))?
        .len();
    let need = head.payload_start + h.payload_len();
    if have < need {
        return Err(ApplyError::Artifact(
            artifact.into(),
            UpdateError::Truncated("payload"),
        ));
    }
    if h.board != board.name {
        return Err(ApplyError::WrongBoard {
            artifact: h.board.clone(),
            board: board.name,
        });
    }
    if h.generation <= booted.generation && !opts.allow_downgrade {
        return Err(ApplyError::NotNewer {
            artifact: h.generation,
            booted: booted.generation,
        });
    }
    let target = booted.slot.other();
    let device = paths.root_device(target);
    let size = device_size(&device).map_err(|e| ApplyError::Device(device.clone(), e))?;
    if let Some(mountpoint) = mounted_at(&device) {
        return Err(ApplyError::Mounted {
            path: device,
            mountpoint,
        });
    }
    if let Err(e) = open_exclusive(&device, false) {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            return Err(ApplyError::InUse(device));
        }
        return Err(ApplyError::Device(device, e));
    }
    let len = h.require(PartKind::Root).map(|p| p.len).unwrap_or(0);
    if len > size {
        return Err(ApplyError::TooBig {
            len,
            path: device,
            size,
        });
    }
    Ok(Plan {
        _lock: lock,
        paths: paths.clone(),
        artifact: artifact.into(),
        head,
        booted,
        cmdline,
        tries: opts.tries,
        target,
        device,
    })
}

/// Bytes of a block device or file (its end, as `lseek` finds it).
fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::End(0))
}

/// Opens `path` (for writing when `write`); a block device exclusively (`O_EXCL`: refused
/// with EBUSY while the kernel holds it, mounted or otherwise, and nobody mounts it while
/// this handle is open).
fn open_exclusive(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let block = std::fs::metadata(path)?.file_type().is_block_device();
    let mut o = std::fs::OpenOptions::new();
    o.read(!write).write(write);
    if block {
        o.custom_flags(nix::libc::O_EXCL);
    }
    o.open(path)
}

/// Where the block device `path` is mounted, if it is one and is mounted
/// (`/proc/self/mountinfo`, by device number).
fn mounted_at(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let rdev = m.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let want = format!("{major}:{minor}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let dev = f.nth(2)?;
        let mountpoint = f.nth(1)?;
        (dev == want).then(|| mountpoint.to_string())
    })
}

impl Plan {
    /// The artifact's header.
    pub fn header(&self) -> &UpdateHeader {
        &self.head.header
    }

    /// The running slot and generation.
    pub fn booted(&self) -> Booted {
        self.booted
    }

    /// Writes the update (steps 1–4 of the module doc), reporting progress to `on`.
    pub fn execute(self, on: &mut dyn FnMut(Event)) -> Result<Applied, ApplyError> {
        let slot = self.target;
        let mut steps = Steps {
            slot,
            on,
            timings: Vec::new(),
        };
        let entries_dir = self.paths.entries_dir();
        steps.run(format!("removing slot {slot}'s boot entries"), |_| {
            entries::remove_slot_entries(&entries_dir, slot)?;
            Ok(())
        })?;
        steps.run(
            format!("writing the root image to {}", self.device.display()),
            |on| {
                let mut artifact = File::open(&self.artifact)?;
                write_root(&mut artifact, &self.head, &self.device, on)
            },
        )?;
        let boot_dir = self.paths.slot_boot_dir(slot);
        steps.run(
            format!("writing kernel and initrd to {}", boot_dir.display()),
            |_| {
                let mut artifact = File::open(&self.artifact)?;
                std::fs::create_dir_all(&boot_dir)?;
                for (kind, name) in [
                    (PartKind::Kernel, "vmlinuz"),
                    (PartKind::Initrd, "initrd.img"),
                ] {
                    write_file_part(&mut artifact, &self.head, kind, &boot_dir.join(name))?;
                }
                Ok(crate::sync_dir(&boot_dir)?)
            },
        )?;
        let spec = EntrySpec {
            slot,
            generation: self.head.header.generation,
            version: self.head.header.version.clone(),
            carried: entries::carried_options(&self.cmdline),
        };
        let entry = steps.run(format!("writing slot {slot}'s boot entry"), |_| {
            Ok(entries::write_entry(&entries_dir, &spec, self.tries)?)
        })?;
        Ok(Applied {
            header: self.head.header,
            slot,
            entry,
            timings: steps.timings,
        })
    }
}

/// Runs an apply's steps: reports and times each, turns its error into
/// [`ApplyError::Failed`].
struct Steps<'a> {
    slot: Slot,
    on: &'a mut dyn FnMut(Event),
    timings: Vec<(String, Duration)>,
}

impl Steps<'_> {
    fn run<T>(
        &mut self,
        what: String,
        work: impl FnOnce(&mut dyn FnMut(Event)) -> Result<T, UpdateError>,
    ) -> Result<T, ApplyError> {
        (self.on)(Event::Step(what.clone()));
        let t = Instant::now();
        let out = work(&mut *self.on).map_err(|source| ApplyError::Failed {
            step: what.clone(),
            slot: self.slot,
            source,
        })?;
        let d = t.elapsed();
        (self.on)(Event::Done(what.clone(), d.as_secs_f64()));
        self.timings.push((what, d));
        Ok(out)
    }
}

/// Chunk of the root copy.
const CHUNK: usize = 1 << 20;

/// Streams the root part into `device`, fsyncs, drops the device's cached pages and reads
/// it back to compare its SHA-256 with the part's.
fn write_root(
    artifact: &mut File,
    head: &ArtifactHead,
    device: &Path,
    on: &mut dyn FnMut(Event),
) -> Result<(), UpdateError> {
    let mut part: PartReader<io::BufReader<&mut File>> =
        open_part(io::BufReader::new(artifact), head, PartKind::Root)?;
    let total = part.part().len;
    let want = part.part().sha256;
    let mut dev = open_exclusive(device, true)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    on(Event::Root { written, total });
    loop {
        let n = part.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dev.write_all(&buf[..n])?;
        written += n as u64;
        on(Event::Root { written, total });
    }
    dev.sync_all()?;
    // Read back from the medium, not the page cache (best effort: a plain file may keep it).
    let _ = nix::fcntl::posix_fadvise(
        &dev,
        0,
        total as i64,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    drop(dev);
    let mut back = File::open(device)?.take(total);
    let mut h = Sha256::new();
    let mut read = 0u64;
    loop {
        let n = back.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        read += n as u64;
    }
    if read != total || h.finalize().as_slice() != want {
        return Err(UpdateError::Io(io::Error::other(format!(
            "reading {} back gave other bytes than were written ({read} of {total} bytes read): the medium may be failing",
            device.display()
        ))));
    }
    Ok(())
}

/// Writes one part to `path` through a temporary file beside it, fsynced, then renamed.
fn write_file_part(
    artifact: &mut File,
    head: &ArtifactHead,
    kind: PartKind,
    path: &Path,
) -> Result<(), UpdateError> {
    let mut part = open_part(io::BufReader::new(artifact), head, kind)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let result = (|| -> Result<(), UpdateError> {
        let mut f = File::create(&tmp)?;
        io::copy(&mut part, &mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The record of an apply's outcome: `applied`, or `failed` with `error`. `header` and
/// `slot` describe the artifact and target when they were known.
pub fn outcome_record(
    header: Option<&UpdateHeader>,
    slot: Option<Slot>,
    error: Option<String>,
) -> UpdateRecord {
    UpdateRecord {
        v: RECORD_VERSION,
        generation: header.map_or(0, |h| h.generation),
        version: header.map_or_else(|| "unknown".into(), |h| h.version.clone()),
        slot: slot.unwrap_or(Slot::A),
        applied_unix: crate::now_unix(),
        result: if error.is_none() {
            UpdateResult::Applied
        } else {
            UpdateResult::Failed
        },
        error,
    }
}

/// Writes `record` to `DATA/updates/last.json` atomically. The updater runs as root, the
/// agent as the data directory's owner: `updates/` and the record are given to that owner, so
/// the agent reads the record and drops its next `pending.cup` there.
pub fn record(paths: &Paths, record: &UpdateRecord) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&paths.data_dir)?;
    let (uid, gid) = (Some(owner.uid()), Some(owner.gid()));
    let path = paths.record();
    if let Some(d) = path.parent() {
        if !d.is_dir() {
            std::fs::create_dir_all(d)?;
            std::os::unix::fs::chown(d, uid, gid)?;
        }
    }
    crate::write_atomic(&path, record.to_json().as_bytes())?;
    std::os::unix::fs::chown(&path, uid, gid)
}

/// The header of `artifact` when it reads (for a failure's record), else `None`.
pub fn peek_header(artifact: &Path) -> Option<UpdateHeader> {
    let f = File::open(artifact).ok()?;
    read_header(&mut io::BufReader::new(f))
        .ok()
        .map(|h| h.header)
}
