//! `cargo xtask flash --board NAME --device DEV`: writes a board's raw disk image
//! (`target/image/NAME/cloudlet-NAME.img`) to a whole disk and reads it back to verify it.
//!
//! The order is the safety: [`disk::inspect`] looks at DEV through `/proc` and `/sys` only (no
//! open for writing) and lists every reason to refuse it; only when there is none, and the
//! operator confirmed, is DEV opened for writing ([`copy::write_image`], exclusively, so the
//! kernel refuses too if something claimed it meanwhile). Then [`copy::verify`] reads back
//! exactly the image's length, bypassing the page cache, and compares it with the image.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{step, target_dir};

mod copy;
mod disk;

use copy::{mismatch_message, verify, write_image};
use disk::{inspect, partitions, refusal_message, reread_partitions, Target};

/// The long `--help` of `cargo xtask flash`.
pub const LONG_HELP: &str = "\
Write a board's disk image to a whole disk (a USB stick, an SSD in an adapter, a VM disk) and
verify it by reading it back.

The image is target/image/NAME/cloudlet-NAME.img (made by `cargo xtask image --board NAME`),
or --image FILE.

Before anything is opened for writing, DEV is refused, with every reason and nothing
written, when it:
  - is not a block device (a regular file only with --allow-file: VM disks, tests);
  - is a partition (/dev/sdb1) rather than the whole disk (/dev/sdb): it says which disk;
  - is the disk the host runs from (the disks under /, /boot, /boot/efi and /usr, followed
    through device-mapper and md to the physical disks);
  - is mounted, or any of its partitions is, or is in use as swap, or held by
    device-mapper or md;
  - is read-only, or smaller than the image.
Then it shows what will be overwritten (vendor, model, size, the partitions, filesystems and
labels on it now) and asks for `yes` on the terminal; --yes answers for scripts (without it,
a stdin that is not a terminal is refused).

The image is written whole (zeros too: the disk may hold old data) with 4 MiB direct writes,
progress shown (MiB, MiB/s, ETA), then fsync'd; the device is opened exclusively, so the
kernel refuses it too if something mounts it meanwhile. Verify reads back exactly the image's
length, bypassing the page cache, compares it with the image and prints the image's SHA-256;
a difference prints the offsets that differ and fails. Last, the kernel is told the new
partitions (BLKRRPART, else `partx --update`). Times and throughput of write and verify
are reported.";

/// Options of `cargo xtask flash`.
#[derive(clap::Args, Debug)]
pub struct FlashArgs {
    /// The board whose image to write: target/image/NAME/cloudlet-NAME.img.
    #[arg(long, required_unless_present = "image")]
    pub board: Option<String>,
    /// The whole disk to overwrite, e.g. /dev/sdb (not a partition such as /dev/sdb1).
    #[arg(long)]
    pub device: PathBuf,
    /// Write this image file instead of the board's.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Overwrite without asking (needed when stdin is not a terminal).
    #[arg(long)]
    pub yes: bool,
    /// Accept a regular file as DEV (a VM disk, a test) instead of a block device.
    #[arg(long)]
    pub allow_file: bool,
}

const MIB: f64 = 1048576.0;

/// Writes the image to the device, verifies it, re-reads the partition table.
pub fn flash(a: &FlashArgs) -> Result<()> {
    let image = match (&a.image, &a.board) {
        (Some(i), _) => i.clone(),
        (None, Some(b)) => board_image(b),
        (None, None) => bail!("say which image: --board NAME or --image FILE"),
    };
    let image_len = match std::fs::metadata(&image) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => bail!("{} is not a regular file", image.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match (&a.image, &a.board) {
            (None, Some(b)) => bail!(
                "no image for board {b} at {}: run `cargo xtask image --board {b}` first",
                image.display()
            ),
            _ => bail!("the image {} does not exist", image.display()),
        },
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", image.display())),
    };
    if image_len == 0 {
        bail!("the image {} is empty", image.display());
    }

    step(&format!("checking {}", a.device.display()));
    let ins = inspect(&a.device, &image, image_len, a.allow_file)?;
    if !ins.refusals.is_empty() {
        bail!("{}", refusal_message(&a.device, &ins.refusals));
    }
    let target = ins.target;
    show_target(&target, &image, image_len);
    confirm(&target.path, a.yes)?;
    let t0 = Instant::now();

    step(&format!(
        "writing {} ({:.1} MiB) to {}",
        image.display(),
        image_len as f64 / MIB,
        target.path.display()
    ));
    let w = write_image(&image, &target.path, target.disk.is_some())?;
    eprintln!(
        "    wrote {:.1} MiB in {} ({:.1} MiB/s{}), fsync included",
        w.bytes as f64 / MIB,
        secs(w.secs),
        w.bytes as f64 / MIB / w.secs.max(1e-9),
        if w.direct {
            ", direct I/O"
        } else {
            ", buffered: O_DIRECT not supported here"
        }
    );

    step("verifying: reading back what was written");
    let v = verify(&image, &target.path, image_len)?;
    if !v.mismatches.is_empty() {
        bail!("{}", mismatch_message(&target.path, &v));
    }
    eprintln!(
        "    read back {:.1} MiB in {} ({:.1} MiB/s): identical to the image, SHA-256 {}",
        v.bytes as f64 / MIB,
        secs(v.secs),
        v.bytes as f64 / MIB / v.secs.max(1e-9),
        hex(&v.sha256)
    );

    if let Some(disk) = &target.disk {
        step("telling the kernel about the new partition table");
        match tell_kernel(&target.path, disk) {
            Ok(how) => {
                let names: Vec<String> =
                    partitions(&disk.sys).into_iter().map(|p| p.name).collect();
                eprintln!("    {how}: partitions now {}", names.join(", "));
            }
            Err(why) => eprintln!(
                "    the kernel does not see the new partitions ({why}); the image is written \
                 and verified: replug the device or run `partx --update {}`",
                target.path.display()
            ),
        }
    }
    step(&format!(
        "flashed {} to {} and verified it in {} (write {}, verify {})",
        image.display(),
        target.path.display(),
        secs(t0.elapsed().as_secs_f64()),
        secs(w.secs),
        secs(v.secs)
    ));
    Ok(())
}

/// The image `cargo xtask image --board NAME` makes.
pub fn board_image(board: &str) -> PathBuf {
    target_dir()
        .join("image")
        .join(board)
        .join(format!("cloudlet-{board}.img"))
}

/// Prints what is about to be overwritten.
fn show_target(t: &Target, image: &Path, image_len: u64) {
    step(&format!("about to overwrite {}", t.path.display()));
    match &t.disk {
        None => eprintln!("    a regular file (--allow-file)"),
        Some(d) => {
            let read = |f: &str| {
                std::fs::read_to_string(d.sys.join("device").join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            let (vendor, model) = (read("vendor"), read("model"));
            let what = format!("{vendor} {model}").trim().to_string();
            eprintln!(
                "    disk:       /dev/{} ({}:{}), {}",
                d.name,
                d.dev.0,
                d.dev.1,
                if what.is_empty() {
                    "no vendor/model in /sys".to_string()
                } else {
                    what
                }
            );
            eprintln!("    holds now:  {}", describe(&d.node()));
            for p in partitions(&d.sys) {
                let size = std::fs::read_to_string(p.sys.join("size"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
                    * 512;
                eprintln!(
                    "      {:<12} {:>9.1} MiB  {}",
                    p.name,
                    size as f64 / MIB,
                    describe(&p.node())
                );
            }
        }
    }
    eprintln!(
        "    size:       {:.1} MiB ({} bytes)",
        t.size as f64 / MIB,
        t.size
    );
    eprintln!(
        "    image:      {} ({:.1} MiB)",
        image.display(),
        image_len as f64 / MIB
    );
}

/// What `blkid -p` (a direct probe, no udev needed) finds on a node: partition table,
/// filesystem, labels.
fn describe(node: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "export", node])
        .output();
    let Ok(out) = out else {
        return "(blkid not found)".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_string)
    };
    let mut parts = Vec::new();
    if let Some(pt) = get("PTTYPE") {
        parts.push(format!("{pt} partition table"));
    }
    if let Some(ty) = get("TYPE") {
        parts.push(ty);
    }
    if let Some(l) = get("LABEL") {
        parts.push(format!("label {l:?}"));
    }
    if let Some(l) = get("PART_ENTRY_NAME") {
        parts.push(format!("partition name {l:?}"));
    }
    if parts.is_empty() {
        "nothing recognised".into()
    } else {
        parts.join(", ")
    }
}

/// Asks for `yes` on the terminal unless `yes` was given.
fn confirm(device: &Path, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "not confirmed: stdin is not a terminal, so nobody can answer; pass --yes to \
             overwrite {} (nothing was written)",
            device.display()
        );
    }
    eprint!(
        "Everything on {} will be lost. Type yes to write the image: ",
        device.display()
    );
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    if answer.trim() != "yes" {
        bail!(
            "not confirmed (answered {:?}); nothing was written",
            answer.trim()
        );
    }
    Ok(())
}

/// Makes the kernel see the partitions just written: BLKRRPART, else (it failed, e.g. a loop
/// device without partscan, or found nothing, e.g. a kernel without a GPT parser) `partx
/// --update`, which reads the table itself and tells the kernel each partition (BLKPG).
/// Returns how, or why not.
fn tell_kernel(device: &Path, disk: &disk::SysDev) -> std::result::Result<String, String> {
    let why = match reread_partitions(device) {
        Ok(()) if !partitions(&disk.sys).is_empty() => return Ok("re-read (BLKRRPART)".into()),
        Ok(()) => "BLKRRPART found no partitions".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let out = Command::new("partx").arg("--update").arg(device).output();
    match out {
        Ok(o) if o.status.success() && !partitions(&disk.sys).is_empty() => {
            Ok(format!("{why}; added by `partx --update`"))
        }
        Ok(o) => Err(format!(
            "{why}; partx --update: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{why}; partx: {e}")),
    }
}

/// A duration for people: milliseconds when short.
fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

/// Lower-case hex.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
