//! Step 2 of `cargo xtask image`: the flashable raw disk image of a board, and the root
//! filesystem and boot files step 3 (the update artifact) is made of.
//!
//! ```text
//! GPT, 1 MiB aligned                                      PARTLABEL          mounted at
//! ┌──────────┬────────────────┬────────────────┬────────┐
//! │ ESP vfat │ root slot A    │ root slot B    │ data   │  cloudlet-esp      /boot/efi
//! │ esp_mib  │ root_mib, ext4 │ root_mib, ext4 │ ext4   │  cloudlet-root-a/b /
//! └──────────┴────────────────┴────────────────┴────────┘  cloudlet-data     /var/lib/cloudlet
//! ESP: EFI/BOOT/BOOTX64.EFI (systemd-boot), loader/loader.conf,
//!      loader/entries/cloudlet-a.conf, cloudlet/a/{vmlinuz,initrd.img}
//! ```
//!
//! The root is Debian (debootstrap minbase + systemd, udev, systemd-boot, the board's kernel
//! and packages: one cached tarball per package set) with the `cloudlet` package installed
//! and the appliance's configuration (host name, fstab, systemd-networkd, the units of boot
//! assessment and updates). The data partition holds the agent's data directory with the
//! board's base images and sample service staged. Slot B starts empty: the first update
//! fills it. See docs/appliance-image.md for why systemd-boot's boot counting and these tools.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::deb::{write, BOARD_FILE, DATA_DIR};
use super::install_test::{cached_root_with, Root};
use crate::util::{run, step, timed};

/// The partition labels; `cloudlet-update` and the kernel command line find them by these.
pub const ESP_LABEL: &str = "cloudlet-esp";
/// Root slot A's label (B: `cloudlet-root-b`).
pub const ROOT_A_LABEL: &str = "cloudlet-root-a";
/// The data partition's label.
pub const DATA_LABEL: &str = "cloudlet-data";
/// GPT partition types (Discoverable Partitions Specification).
const TYPE_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const TYPE_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

const BOOT_CHECK_UNIT: &str = include_str!("../../../updater/systemd/cloudlet-boot-check.service");
const UPDATE_PATH_UNIT: &str = include_str!("../../../updater/systemd/cloudlet-update.path");
const UPDATE_UNIT: &str = include_str!("../../../updater/systemd/cloudlet-update.service");
const GROWFS_ROOT_UNIT: &str = include_str!("files/cloudlet-growfs-root.service");

/// What the disk image step made (everything under `target/image/NAME/`).
pub struct Disk {
    /// The flashable raw image.
    pub image: PathBuf,
    /// Slot A's root filesystem (the update artifact's root part).
    pub root_fs: PathBuf,
    /// The kernel and initrd of that root.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: PathBuf,
    /// The generation slot A boots as.
    pub generation: u64,
}

/// The packages of the appliance root beyond minbase, for `board`'s image.
fn packages(img: &agent::board::RawImage) -> String {
    let mut p: Vec<&str> = vec![
        "libusb-1.0-0",
        "systemd-sysv",
        "udev",
        "dbus",
        "systemd-boot",
        "iproute2",
        "kmod",
        &img.kernel,
    ];
    p.extend(img.packages.iter().map(String::as_str));
    p.join(",")
}

/// The board file as the image ships it: the package's ([`super::deb::packaged_board`]) with
/// `[api] listen` and `port` taken from `[image]`.
pub fn image_board(name: &str, img: &agent::board::RawImage) -> Result<String> {
    let text = super::deb::packaged_board(name)?;
    let mut section = String::new();
    let listen = img
        .listen
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with('[') {
                section = t.to_string();
            }
            if section == "[api]" && t.starts_with("listen") {
                format!("listen = [{listen}]")
            } else if section == "[api]" && t.starts_with("port") {
                format!("port = {}", img.port)
            } else {
                l.to_string()
            }
        })
        .collect();
    let text = out.join("\n") + "\n";
    agent::board::Board::parse(&text, "the image's board.toml", None)
        .context("the image's board file does not check")?;
    Ok(text)
}

/// The kernel command line of slot `slot` (`a`/`b`) booting as `generation`.
pub fn cmdline(img: &agent::board::RawImage, slot: char, generation: u64) -> String {
    let consoles: String = img
        .console
        .iter()
        .map(|c| format!(" console={c}"))
        .collect();
    format!(
        "root=PARTLABEL=cloudlet-root-{slot} rw rootwait panic=10 systemd.gpt_auto=0 quiet{consoles} cloudlet.slot={slot} cloudlet.generation={generation}"
    )
}

/// The boot entry of slot `slot` (Boot Loader Specification type #1).
pub fn entry(img: &agent::board::RawImage, version: &str, slot: char, generation: u64) -> String {
    format!(
        "title Cloudlet {version} (slot {slot}, generation {generation})\nsort-key cloudlet\nversion {generation}\nlinux /cloudlet/{slot}/vmlinuz\ninitrd /cloudlet/{slot}/initrd.img\noptions {}\n",
        cmdline(img, slot, generation)
    )
}

/// Builds the disk image of board `name` (its `[image]` is `img`) with package `deb` under
/// `out`, slot A at `generation`; `base_dir` and `overlay` are staged into the data
/// partition as base `micro` and service `model` by the agent binary `agent_bin`;
/// `operator_token` (factory provisioning, and the image tests) is written as the data
/// directory's operator token.
#[allow(clippy::too_many_arguments)]
pub fn build(
    name: &str,
    img: &agent::board::RawImage,
    deb: &Path,
    out: &Path,
    generation: u64,
    stage: &dyn Fn(&Path) -> Result<()>,
    operator_token: Option<&str>,
    version: &str,
) -> Result<Disk> {
    crate::util::ensure_programs(&[
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
        ("mkfs.ext4", "e2fsprogs"),
    ])?;
    let include = packages(img);
    let tar = cached_root_with(&include)?;
    let work = out.join("disk-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let root_dir = work.join("root");
    let root = timed("unpacking the appliance root", || {
        Root::unpack(&tar, &root_dir)
    })?;
    timed("installing the cloudlet package in it", || {
        std::fs::copy(deb, root.path("/tmp/cloudlet.deb"))?;
        root.out(&["dpkg", "-i", "/tmp/cloudlet.deb"])?;
        std::fs::remove_file(root.path("/tmp/cloudlet.deb"))?;
        Ok(())
    })?;
    timed(
        "configuring the appliance (host name, mounts, network, units)",
        || configure(&root, name, img),
    )?;
    // The data partition: the agent's data directory as the package made it, with the
    // board's bases staged, owned by the service user.
    let data_dir = work.join("data");
    timed(
        "staging the data partition (base images, sample service)",
        || {
            std::fs::create_dir_all(&data_dir)?;
            stage(&data_dir)?;
            if let Some(t) = operator_token {
                agent::auth::write_private(
                    &data_dir.join(agent::auth::OPERATOR_TOKEN_FILE),
                    t.as_bytes(),
                )?;
            }
            let uid = root.out(&["id", "-u", "cloudlet"])?;
            let gid = root.out(&["id", "-g", "cloudlet"])?;
            run(Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", uid.trim(), gid.trim()))
                .arg(&data_dir))?;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o750))?;
            Ok(())
        },
    )?;
    let boot = root.path("/boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        found.sort();
        found
            .pop()
            .with_context(|| format!("no /boot/{prefix}* in the root: is the kernel installed?"))
    };
    let kernel = work.join("vmlinuz");
    let initrd = work.join("initrd.img");
    std::fs::copy(find("vmlinuz-")?, &kernel)?;
    std::fs::copy(find("initrd.img-")?, &initrd)?;
    let efi = root.path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    let efi_copy = work.join("systemd-bootx64.efi");
    std::fs::copy(&efi, &efi_copy).context("no systemd-boot in the root")?;
    // mkfs.ext4 -d copies the tree: /proc and /dev must not be mounted in it any more.
    let root_dir = root.unmount()?;

    let root_fs = out.join("root.ext4");
    let data_fs = work.join("data.ext4");
    let esp_fs = work.join("esp.vfat");
    // The root filesystem is made just big enough for its files (plus room for the first
    // boot's writes): an update carries, writes and reads back only that much, and
    // cloudlet-growfs-root.service grows it to its slot on boot.
    let content = du_mib(&root_dir)?;
    let root_fs_mib = ((content * 5 / 4 + 96).div_ceil(16) * 16).min(img.root_mib);
    if content + 32 > img.root_mib {
        bail!(
            "the root's files ({content} MiB) do not fit a {} MiB root slot: raise image.root_mib in the board file",
            img.root_mib
        );
    }
    timed(
        &format!(
            "making slot A's root filesystem ({content} MiB of files in {root_fs_mib} MiB, ext4; the slot is {} MiB)",
            img.root_mib
        ),
        || mkfs_ext4(&root_fs, "root", &root_dir, root_fs_mib),
    )?;
    timed(
        &format!("making the data filesystem ({} MiB, ext4)", img.data_mib),
        || mkfs_ext4(&data_fs, "data", &data_dir, img.data_mib),
    )?;
    timed(
        "making the EFI system partition (systemd-boot, slot A's entry)",
        || {
            esp(
                &esp_fs, img, &efi_copy, &kernel, &initrd, version, generation,
            )
        },
    )?;
    let image = out.join(format!("cloudlet-{name}.img"));
    timed("assembling the GPT disk image", || {
        assemble(&image, img, &esp_fs, &root_fs, &data_fs)
    })?;
    let _ = std::fs::remove_file(&data_fs);
    let _ = std::fs::remove_file(&esp_fs);
    let _ = std::fs::remove_dir_all(&root_dir);
    let _ = std::fs::remove_dir_all(&data_dir);
    let kept_kernel = out.join("vmlinuz");
    let kept_initrd = out.join("initrd.img");
    std::fs::rename(&kernel, &kept_kernel)?;
    std::fs::rename(&initrd, &kept_initrd)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(Disk {
        image,
        root_fs,
        kernel: kept_kernel,
        initrd: kept_initrd,
        generation,
    })
}

/// The appliance's configuration in the root.
fn configure(root: &Root, name: &str, img: &agent::board::RawImage) -> Result<()> {
    let r = root.path("/");
    write(&r, "/etc/hostname", &format!("{}\n", img.hostname), 0o644)?;
    write(
        &r,
        "/etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            img.hostname
        ),
        0o644,
    )?;
    write(
        &r,
        "/etc/fstab",
        &format!(
            "# The appliance's partitions, by GPT label (the root is on the kernel command line).\nPARTLABEL={ESP_LABEL}\t/boot/efi\tvfat\tfmask=0133,dmask=0022,noatime\t0\t2\nPARTLABEL={DATA_LABEL}\t{DATA_DIR}\text4\tdefaults,noatime,x-systemd.growfs\t0\t2\n"
        ),
        0o644,
    )?;
    std::fs::create_dir_all(root.path("/boot/efi"))?;
    // The data partition grows to the rest of the disk on first boot (systemd-repart; the
    // ESP and the root slots keep their size), and its filesystem with it (x-systemd.growfs).
    for (file, ty, weight) in [
        ("10-esp.conf", "esp", 0),
        ("20-root-a.conf", "root", 0),
        ("30-root-b.conf", "root", 0),
        ("40-data.conf", "linux-generic", 1000),
    ] {
        write(
            &r,
            &format!("/etc/repart.d/{file}"),
            &format!("[Partition]\nType={ty}\nWeight={weight}\nPaddingWeight=0\n"),
            0o644,
        )?;
    }
    write(
        &r,
        "/etc/systemd/network/50-cloudlet.network",
        "# Every wired NIC: DHCP, and a link-local address (phones on a network without DHCP\n# still find the box over mDNS).\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\nLinkLocalAddressing=yes\nMulticastDNS=no\n",
        0o644,
    )?;
    write(
        &r,
        "/etc/systemd/journald.conf.d/cloudlet.conf",
        "[Journal]\nSystemMaxUse=64M\n",
        0o644,
    )?;
    write(&r, BOARD_FILE, &image_board(name, img)?, 0o644)?;
    write(
        &r,
        "/etc/systemd/system/cloudlet-boot-check.service",
        BOOT_CHECK_UNIT,
        0o644,
    )?;
    write(
        &r,
        "/etc/systemd/system/cloudlet-update.path",
        UPDATE_PATH_UNIT,
        0o644,
    )?;
    write(
        &r,
        "/etc/systemd/system/cloudlet-update.service",
        UPDATE_UNIT,
        0o644,
    )?;
    write(
        &r,
        "/etc/systemd/system/cloudlet-growfs-root.service",
        GROWFS_ROOT_UNIT,
        0o644,
    )?;
    root.out(&[
        "systemctl",
        "enable",
        "cloudlet-growfs-root.service",
        "systemd-networkd.service",
        "cloudlet-agent.service",
        "cloudlet-boot-check.service",
        "cloudlet-update.path",
    ])?;
    // Each box makes its own machine id on first boot; nobody logs in as root.
    std::fs::write(root.path("/etc/machine-id"), "")?;
    let _ = std::fs::remove_file(root.path("/var/lib/dbus/machine-id"));
    root.out(&["passwd", "--lock", "root"])?;
    // Documentation, manual pages, translations and package caches are of no use on a box.
    for d in [
        "/usr/share/doc",
        "/usr/share/man",
        "/usr/share/info",
        "/var/cache/apt",
        "/var/lib/apt/lists",
    ] {
        let p = root.path(d);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
    }
    if let Ok(locales) = std::fs::read_dir(root.path("/usr/share/locale")) {
        for l in locales.flatten() {
            if l.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let _ = std::fs::remove_dir_all(l.path());
            }
        }
    }
    // The data directory is the data partition's mount point: empty in the root.
    let data = root.path(DATA_DIR);
    for e in std::fs::read_dir(&data)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn mkfs_ext4(out: &Path, label: &str, from: &Path, mib: u64) -> Result<()> {
    let _ = std::fs::remove_file(out);
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-E", "root_owner=0:0", "-d"])
        .arg(from)
        .arg(out)
        .arg(format!("{mib}M"))
        .output()
        .context("cannot run mkfs.ext4")?;
    if !o.status.success() {
        bail!(
            "mkfs.ext4 of the {label} filesystem ({mib} MiB) failed: {}; if it is out of space, raise the partition's size in the board's [image]",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Space the files under `dir` take, MiB (allocated, as a filesystem would hold them).
fn du_mib(dir: &Path) -> Result<u64> {
    let o = Command::new("du").arg("-sm").arg(dir).output()?;
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot measure {} with du", dir.display()))
}

fn mtools(args: &[&str], image: &Path) -> Result<()> {
    let (cmd, rest) = args.split_first().expect("a command");
    run(Command::new(cmd)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(image)
        .args(rest))
}

fn esp(
    out: &Path,
    img: &agent::board::RawImage,
    efi: &Path,
    kernel: &Path,
    initrd: &Path,
    version: &str,
    generation: u64,
) -> Result<()> {
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out)?.set_len(img.esp_mib << 20)?;
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "CLOUDLETESP"])
        .arg(out)
        .stdout(std::process::Stdio::null()))?;
    mtools(
        &[
            "mmd",
            "::/EFI",
            "::/EFI/BOOT",
            "::/EFI/systemd",
            "::/loader",
            "::/loader/entries",
            "::/cloudlet",
            "::/cloudlet/a",
            "::/cloudlet/b",
        ],
        out,
    )?;
    let tmp = out.with_extension("files");
    std::fs::create_dir_all(&tmp)?;
    // No menu (a key held at power-on shows it), no command-line editor (it would be a root
    // shell for anyone at the console), entries ordered by sort-key and version.
    let loader = tmp.join("loader.conf");
    std::fs::write(&loader, "timeout 0\neditor no\nconsole-mode keep\n")?;
    let entry_a = tmp.join("cloudlet-a.conf");
    std::fs::write(&entry_a, entry(img, version, 'a', generation))?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    for (from, to) in [
        (s(efi), "::/EFI/BOOT/BOOTX64.EFI"),
        (s(efi), "::/EFI/systemd/systemd-bootx64.efi"),
        (s(&loader), "::/loader/loader.conf"),
        (s(&entry_a), "::/loader/entries/cloudlet-a.conf"),
        (s(kernel), "::/cloudlet/a/vmlinuz"),
        (s(initrd), "::/cloudlet/a/initrd.img"),
    ] {
        mtools(&["mcopy", &from, to], out)?;
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

fn assemble(
    image: &Path,
    img: &agent::board::RawImage,
    esp: &Path,
    root_fs: &Path,
    data: &Path,
) -> Result<()> {
    let _ = std::fs::remove_file(image);
    let total = 1 + img.esp_mib + 2 * img.root_mib + img.data_mib + 1;
    std::fs::File::create(image)?.set_len(total << 20)?;
    let script = format!(
        "label: gpt\nsize={e}MiB, type={TYPE_ESP}, name={ESP_LABEL}\nsize={r}MiB, type={TYPE_ROOT_X86_64}, name={ROOT_A_LABEL}\nsize={r}MiB, type={TYPE_ROOT_X86_64}, name=cloudlet-root-b\nsize={d}MiB, type={TYPE_LINUX}, name={DATA_LABEL}\n",
        e = img.esp_mib,
        r = img.root_mib,
        d = img.data_mib
    );
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sfdisk")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    if !child.wait()?.success() {
        bail!(
            "sfdisk could not write the partition table of {}",
            image.display()
        );
    }
    let mut at = 1;
    for (part, mib) in [
        (esp, img.esp_mib),
        (root_fs, img.root_mib),
        (root_fs, 0),
        (data, img.data_mib),
    ] {
        if mib == 0 {
            // Slot B stays empty (its entry does not exist): the first update fills it.
            at += img.root_mib;
            continue;
        }
        run(Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", image.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={at}")))?;
        at += mib;
    }
    let size = std::fs::metadata(image)?.len();
    step(&format!(
        "{} ({} MiB; sparse, {} MiB allocated)",
        image.display(),
        size >> 20,
        allocated_mib(image)
    ));
    Ok(())
}

fn allocated_mib(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| (m.blocks() * 512) >> 20)
        .unwrap_or(0)
}
