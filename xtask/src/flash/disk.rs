//! What a device is, read from `/proc` and `/sys` (never opened for writing): the whole disk
//! behind a node, its partitions, mounts, swap, device-mapper/md holders, the disks the host
//! runs from, and every reason to refuse writing to it ([`inspect`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::MIB;

/// The mount points whose disks are the host's own.
const HOST_MOUNTS: [&str; 4] = ["/", "/boot", "/boot/efi", "/usr"];

// <linux/fs.h>: BLKRRPART = _IO(0x12, 95); BLKGETSIZE64 = _IOR(0x12, 114, size_t)
// (direction read = 2 << 30, size 8 << 16). The libc crate does not export them.
const BLKRRPART: libc::Ioctl = 0x125f;
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// A block device as `/sys` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SysDev {
    /// Kernel name, e.g. `sdb`, `sdb1`, `loop3p1`, `dm-0`.
    pub name: String,
    /// `major:minor`.
    pub dev: (u32, u32),
    /// Its directory under /sys/devices (canonical).
    pub sys: PathBuf,
}

impl SysDev {
    /// The device node, `/dev/NAME`.
    pub fn node(&self) -> String {
        format!("/dev/{}", self.name)
    }
}

/// What DEV turned out to be.
#[derive(Debug)]
pub struct Target {
    /// DEV as given.
    pub path: PathBuf,
    /// The whole disk when DEV is a block device (None for a regular file).
    pub disk: Option<SysDev>,
    /// Its size in bytes.
    pub size: u64,
}

/// A reason not to write to DEV.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// DEV is not a block device (`kind` says what it is).
    NotBlock { kind: &'static str },
    /// DEV is the image itself.
    IsImage,
    /// DEV is a partition of `disk`.
    Partition { number: u32, disk: String },
    /// DEV's disk is (or underlies) a disk the host runs from.
    HostDisk { disk: String, mounts: Vec<String> },
    /// A node of DEV's disk is mounted.
    Mounted { node: String, at: Vec<String> },
    /// A node of DEV's disk is in use as swap.
    Swap { node: String },
    /// A node of DEV's disk is held by device-mapper or md.
    Held { node: String, holders: Vec<String> },
    /// DEV is smaller than the image.
    TooSmall { size: u64, image: u64 },
    /// DEV is read-only (a write-protect switch, a read-only loop device).
    ReadOnly,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NotBlock { kind } if *kind == "a regular file" => write!(
                f,
                "it is a regular file, not a block device (pass --allow-file to write a VM disk \
                 file)"
            ),
            Refusal::NotBlock { kind } => write!(f, "it is {kind}, not a block device"),
            Refusal::IsImage => write!(f, "it is the image itself"),
            Refusal::Partition { number, disk } => write!(
                f,
                "it is partition {number} of /dev/{disk}, not a whole disk: the image holds its \
                 own partition table; flash the whole disk /dev/{disk}"
            ),
            Refusal::HostDisk { disk, mounts } => write!(
                f,
                "/dev/{disk} is the disk the host runs from (it holds {}): overwriting it \
                 would destroy this system",
                mounts.join(", ")
            ),
            Refusal::Mounted { node, at } => write!(
                f,
                "{node} is mounted on {}: unmount it first if its data may go",
                at.join(", ")
            ),
            Refusal::Swap { node } => {
                write!(
                    f,
                    "{node} is in use as swap: `swapoff {node}` first if it may go"
                )
            }
            Refusal::Held { node, holders } => write!(
                f,
                "{node} is in use by {} (device-mapper/md): stop those first if they may go",
                holders.join(", ")
            ),
            Refusal::ReadOnly => write!(
                f,
                "it is read-only (a write-protect switch, or marked so: `blockdev --setrw` clears that)"
            ),
            Refusal::TooSmall { size, image } => write!(
                f,
                "it holds {size} bytes ({:.1} MiB), less than the image's {image} bytes \
                 ({:.1} MiB)",
                *size as f64 / MIB,
                *image as f64 / MIB
            ),
        }
    }
}

/// The full refusal: which device, every reason, and that nothing was written.
pub fn refusal_message(device: &Path, refusals: &[Refusal]) -> String {
    let mut m = format!(
        "refusing to write to {}; nothing was written:",
        device.display()
    );
    for r in refusals {
        m.push_str("\n  - ");
        m.push_str(&r.to_string());
    }
    m
}

/// What [`inspect`] found: the target and every reason to refuse it.
#[derive(Debug)]
pub struct Inspection {
    /// DEV resolved.
    pub target: Target,
    /// Empty when DEV may be written.
    pub refusals: Vec<Refusal>,
}

/// Looks at `device` without opening it for writing and lists every reason to refuse writing
/// `image` (`image_len` bytes) to it. Errors only when the system cannot be read.
pub fn inspect(
    device: &Path,
    image: &Path,
    image_len: u64,
    allow_file: bool,
) -> Result<Inspection> {
    let meta = std::fs::metadata(device)
        .with_context(|| format!("{} does not exist or cannot be read", device.display()))?;
    let mut refusals = Vec::new();
    let ft = meta.file_type();
    if !ft.is_block_device() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else {
            "not a file or disk"
        };
        if !(ft.is_file() && allow_file) {
            refusals.push(Refusal::NotBlock { kind });
        }
        if let Ok(im) = std::fs::metadata(image) {
            if im.dev() == meta.dev() && im.ino() == meta.ino() {
                refusals.push(Refusal::IsImage);
            }
        }
        let target = Target {
            path: device.to_path_buf(),
            disk: None,
            size: meta.len(),
        };
        return Ok(Inspection { target, refusals });
    }

    let dev = split_dev(meta.rdev());
    let node = sys_dev(dev)?;
    let (disk, partno) = whole_disk(&node)?;
    let host = host_disks()?;
    if let Some((_, mounts)) = host.iter().find(|(d, _)| d.name == disk.name) {
        refusals.push(Refusal::HostDisk {
            disk: disk.name.clone(),
            mounts: mounts.clone(),
        });
    }
    if let Some(number) = partno {
        refusals.push(Refusal::Partition {
            number,
            disk: disk.name.clone(),
        });
    }
    let mut members = vec![disk.clone()];
    members.extend(partitions(&disk.sys));
    let mounts = mounts()?;
    let swaps = swap_devs()?;
    for m in &members {
        let at: Vec<String> = mounts
            .iter()
            .filter(|e| e.dev == m.dev)
            .map(|e| e.mount_point.clone())
            .collect();
        if !at.is_empty() {
            refusals.push(Refusal::Mounted { node: m.node(), at });
        }
        if swaps.contains(&m.dev) {
            refusals.push(Refusal::Swap { node: m.node() });
        }
        let holders = dir_names(&m.sys.join("holders"));
        if !holders.is_empty() {
            refusals.push(Refusal::Held {
                node: m.node(),
                holders,
            });
        }
    }
    if std::fs::read_to_string(node.sys.join("ro")).is_ok_and(|ro| ro.trim() == "1") {
        refusals.push(Refusal::ReadOnly);
    }
    let size = block_size(device, &node)?;
    if partno.is_none() && size < image_len {
        refusals.push(Refusal::TooSmall {
            size,
            image: image_len,
        });
    }
    let target = Target {
        path: device.to_path_buf(),
        disk: Some(disk),
        size,
    };
    Ok(Inspection { target, refusals })
}

/// `st_rdev` as `(major, minor)`.
pub(super) fn split_dev(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}

/// The block device `major:minor` through /sys/dev/block.
pub fn sys_dev(dev: (u32, u32)) -> Result<SysDev> {
    let link = format!("/sys/dev/block/{}:{}", dev.0, dev.1);
    let sys = std::fs::canonicalize(&link)
        .with_context(|| format!("{link} is missing: no block device {}:{}", dev.0, dev.1))?;
    sys_at(sys)
}

/// The block device whose /sys directory is `sys`.
pub(super) fn sys_at(sys: PathBuf) -> Result<SysDev> {
    let name = sys
        .file_name()
        .and_then(|n| n.to_str())
        .context("a /sys block directory without a name")?
        .to_string();
    let text = std::fs::read_to_string(sys.join("dev"))
        .with_context(|| format!("cannot read {}/dev", sys.display()))?;
    let dev = parse_dev(&text).with_context(|| format!("bad {}/dev: {text:?}", sys.display()))?;
    Ok(SysDev { name, dev, sys })
}

/// Parses `major:minor`.
pub(super) fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The whole disk `d` is on, with `d`'s partition number when it is a partition.
pub fn whole_disk(d: &SysDev) -> Result<(SysDev, Option<u32>)> {
    match std::fs::read_to_string(d.sys.join("partition")) {
        Ok(n) => {
            let parent = d.sys.parent().context("a partition without a disk")?;
            Ok((sys_at(parent.to_path_buf())?, n.trim().parse().ok()))
        }
        Err(_) => Ok((d.clone(), None)),
    }
}

/// The partitions of the disk at `disk_sys`, by number.
pub(super) fn partitions(disk_sys: &Path) -> Vec<SysDev> {
    let mut v: Vec<(u32, SysDev)> = std::fs::read_dir(disk_sys)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let number = std::fs::read_to_string(e.path().join("partition")).ok()?;
            Some((number.trim().parse().ok()?, sys_at(e.path()).ok()?))
        })
        .collect();
    // By partition number: minor numbers are reused, so they need not follow it.
    v.sort_by_key(|(n, _)| *n);
    v.into_iter().map(|(_, d)| d).collect()
}

/// Names of the entries of a directory (empty when it does not exist).
pub(super) fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// A line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    /// The device of the mounted filesystem (`0:N` for virtual, btrfs, overlay).
    pub dev: (u32, u32),
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type.
    pub fstype: String,
    /// The mount source (`/dev/sda1`, `overlay`, ...).
    pub source: String,
    /// Superblock options (overlay's `lowerdir=`/`upperdir=` are followed to their disks).
    pub super_opts: String,
}

/// Parses /proc/self/mountinfo (`proc(5)`): `id parent maj:min root mountpoint opts
/// [optional...] - fstype source superopts`, octal escapes (`\040`) decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                dev: parse_dev(f.get(2)?)?,
                mount_point: unescape(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape(f.get(sep + 2)?),
                super_opts: f.get(sep + 3).map(|s| unescape(s)).unwrap_or_default(),
            })
        })
        .collect()
}

/// Decodes the `\NNN` octal escapes of mountinfo and /proc/swaps.
pub(super) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's mounts, each with the block device it really uses: btrfs and other
/// filesystems whose `maj:min` is anonymous (`0:N`) are resolved through their source node.
pub(super) fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    let mut v = parse_mountinfo(&text);
    for e in &mut v {
        if e.dev.0 == 0 && e.source.starts_with("/dev/") {
            if let Ok(m) = std::fs::metadata(&e.source) {
                if m.file_type().is_block_device() {
                    e.dev = split_dev(m.rdev());
                }
            }
        }
    }
    Ok(v)
}

/// The block devices in use as swap (/proc/swaps; a swap file counts for the device it is on).
pub(super) fn swap_devs() -> Result<Vec<(u32, u32)>> {
    let text = std::fs::read_to_string("/proc/swaps").context("cannot read /proc/swaps")?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| std::fs::metadata(unescape(name)).ok())
        .map(|m| {
            if m.file_type().is_block_device() {
                split_dev(m.rdev())
            } else {
                split_dev(m.dev())
            }
        })
        .collect())
}

/// The disks the host runs from, each with the host mount points it holds: the devices under
/// [`HOST_MOUNTS`] followed to whole disks and through device-mapper/md slaves to the disks
/// below (every disk on the way counts).
pub fn host_disks() -> Result<Vec<(SysDev, Vec<String>)>> {
    let all = mounts()?;
    let mut out: Vec<(SysDev, Vec<String>)> = Vec::new();
    for mp in HOST_MOUNTS {
        // The last entry for a mount point is the one on top.
        let Some(e) = all.iter().rev().find(|e| e.mount_point == mp) else {
            continue;
        };
        let mut devs = Vec::new();
        mount_devices(e, &all, 0, &mut devs);
        for dev in devs {
            let Ok(d) = sys_dev(dev) else { continue };
            let mut disks = Vec::new();
            disks_under(&d, 0, &mut disks);
            for disk in disks {
                match out.iter_mut().find(|(x, _)| x.name == disk.name) {
                    Some((_, m)) if !m.iter().any(|x| x == mp) => m.push(mp.to_string()),
                    Some(_) => {}
                    None => out.push((disk, vec![mp.to_string()])),
                }
            }
        }
    }
    Ok(out)
}

/// The block devices a mount stands on: its own, or for an overlay those of its layers.
pub(super) fn mount_devices(
    e: &MountEntry,
    all: &[MountEntry],
    depth: u32,
    out: &mut Vec<(u32, u32)>,
) {
    if e.dev.0 != 0 {
        out.push(e.dev);
        return;
    }
    if e.fstype != "overlay" || depth > 4 {
        return;
    }
    for opt in e.super_opts.split(',') {
        let Some((key, dirs)) = opt.split_once('=') else {
            continue;
        };
        if !matches!(key, "lowerdir" | "upperdir") {
            continue;
        }
        for dir in dirs.split(':').filter(|d| d.starts_with('/')) {
            // The mount holding `dir`: the longest mount point that is a prefix of it.
            let holder = all
                .iter()
                .filter(|m| Path::new(dir).starts_with(&m.mount_point))
                .max_by_key(|m| m.mount_point.len());
            if let Some(h) = holder {
                if !std::ptr::eq(h, e) {
                    mount_devices(h, all, depth + 1, out);
                }
            }
        }
    }
}

/// `d`'s whole disk and, through its slaves (device-mapper, md), every disk below it.
pub(super) fn disks_under(d: &SysDev, depth: u32, out: &mut Vec<SysDev>) {
    let Ok((disk, _)) = whole_disk(d) else { return };
    if out.iter().any(|x| x.name == disk.name) || depth > 8 {
        return;
    }
    out.push(disk.clone());
    for slave in dir_names(&disk.sys.join("slaves")) {
        if let Ok(sys) = std::fs::canonicalize(Path::new("/sys/class/block").join(&slave)) {
            if let Ok(s) = sys_at(sys) {
                disks_under(&s, depth + 1, out);
            }
        }
    }
}

/// A block device's size: BLKGETSIZE64 on a read-only open, else /sys's 512-byte sectors.
pub(super) fn block_size(device: &Path, d: &SysDev) -> Result<u64> {
    if let Ok(f) = File::open(device) {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`;
        // the fd is open for the call's duration.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r == 0 {
            return Ok(size);
        }
    }
    let text = std::fs::read_to_string(d.sys.join("size"))
        .with_context(|| format!("cannot read the size of {}", device.display()))?;
    let sectors: u64 = text.trim().parse().context("bad /sys size")?;
    Ok(sectors * 512)
}

/// Asks the kernel to re-read `device`'s partition table (BLKRRPART).
pub(super) fn reread_partitions(device: &Path) -> Result<()> {
    let f = File::open(device).with_context(|| format!("cannot open {}", device.display()))?;
    // SAFETY: BLKRRPART takes no argument; the fd is open for the call's duration.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART, 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("BLKRRPART");
    }
    Ok(())
}
