//! Step 1 of `cargo xtask image`: the `cloudlet` Debian package, laid out by hand and built
//! with `dpkg-deb` (see docs/appliance-image.md for why not debhelper or cargo-deb).
//!
//! ```text
//! /usr/lib/cloudlet/{agent,vmm,image-builder}   the binaries (the agent finds the vmm beside it)
//! /usr/bin/cloudlet                              the client
//! /usr/bin/cloudlet-update                       the A/B updater (root; used on the disk image)
//! /usr/bin/cloudlet-agent, cloudlet-image-builder  links into /usr/lib/cloudlet (operator use)
//! /etc/cloudlet/board.toml                       the board's config (a conffile)
//! /lib/systemd/system/cloudlet-agent.service     the hardened unit (logs to the journal)
//! /lib/udev/rules.d/60-cloudlet.rules            /dev/userfaultfd for group kvm
//! /usr/share/doc/cloudlet/{README,copyright}
//! DEBIAN/{control,conffiles,md5sums,postinst,prerm,postrm}
//! /var/lib/cloudlet                              made by postinst (user cloudlet, 0750)
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{root, run, target_dir};

/// The package's name.
pub const PACKAGE: &str = "cloudlet";
/// The unit's name.
pub const UNIT: &str = "cloudlet-agent.service";
/// The hardened unit.
pub const UNIT_FILE: &str = include_str!("files/cloudlet-agent.service");
const UDEV_RULES: &str = include_str!("files/60-cloudlet.rules");
const POSTINST: &str = include_str!("files/postinst");
const PRERM: &str = include_str!("files/prerm");
const POSTRM: &str = include_str!("files/postrm");
/// Where the package keeps its data.
pub const DATA_DIR: &str = "/var/lib/cloudlet";
/// Where the board's config goes.
pub const BOARD_FILE: &str = "/etc/cloudlet/board.toml";

/// The binaries the package carries: (name in target/release, path in the package).
const BINARIES: [(&str, &str); 5] = [
    ("agent", "usr/lib/cloudlet/agent"),
    ("vmm", "usr/lib/cloudlet/vmm"),
    ("image-builder", "usr/lib/cloudlet/image-builder"),
    ("cloudlet", "usr/bin/cloudlet"),
    ("cloudlet-update", "usr/bin/cloudlet-update"),
];

/// The board file `board-configs/NAME.toml` as the package ships it: its `data_dir` set to
/// [`DATA_DIR`] (the unit passes it too; this keeps the file telling the truth).
pub fn packaged_board(name: &str) -> Result<String> {
    let path = root().join("board-configs").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        let boards: Vec<String> = std::fs::read_dir(root().join("board-configs"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(".toml")
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "no board '{name}' ({} is missing); the boards are: {}",
            path.display(),
            boards.join(", ")
        )
    })?;
    agent::board::Board::parse(&text, &path.display().to_string(), None)
        .with_context(|| format!("board-configs/{name}.toml does not check"))?;
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("data_dir") {
                found = true;
                format!("data_dir = \"{DATA_DIR}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        bail!("board-configs/{name}.toml has no storage.data_dir line to point at {DATA_DIR}");
    }
    Ok(out.join("\n") + "\n")
}

/// The agent's version (agent/Cargo.toml), the package's.
pub fn version() -> String {
    std::fs::read_to_string(root().join("agent/Cargo.toml"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("version = \"")?
                    .strip_suffix('"')
                    .map(str::to_string)
            })
        })
        .unwrap_or_else(|| "0.0.0".into())
}

/// The newest glibc symbol version `bin` needs (e.g. "2.34"), from `objdump -T`.
fn glibc_needed(bin: &Path) -> Result<String> {
    let out = Command::new("objdump")
        .arg("-T")
        .arg(bin)
        .output()
        .context("cannot run objdump (binutils) to find the glibc version needed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut best: Option<(u32, u32)> = None;
    for v in text.split("GLIBC_").skip(1) {
        let v: String = v
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        best = best.max(Some((a, b)));
    }
    let (a, b) = best.context("the agent needs no glibc symbol version (not a glibc binary?)")?;
    Ok(format!("{a}.{b}"))
}

/// Writes `text` as `root/rel` (a leading `/` of `rel` is ignored) with `mode`, making its
/// directories; returns its path.
pub(super) fn write(root: &Path, rel: &str, text: &str, mode: u32) -> Result<PathBuf> {
    let p = root.join(rel.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().expect("a file in a directory"))?;
    std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    Ok(p)
}

/// Every regular file under `dir`, relative, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                todo.push(e.path());
            } else if t.is_file() {
                out.push(e.path().strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Lays out and builds the package for board `name` from the binaries in `bin_dir`
/// (target/release; target/debug for the test suite's check); returns the .deb's path
/// (under target/image/NAME/).
pub fn build(name: &str, bin_dir: &Path) -> Result<PathBuf> {
    let out_dir = target_dir().join("image").join(name);
    let tree = out_dir.join("deb-root");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    for (bin, rel) in BINARIES {
        let from = bin_dir.join(bin);
        let to = tree.join(rel);
        std::fs::create_dir_all(to.parent().expect("in a directory"))?;
        std::fs::copy(&from, &to).with_context(|| {
            format!("cannot copy {} (were the binaries built?)", from.display())
        })?;
        run(Command::new("strip").arg("--strip-unneeded").arg(&to))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    for (link, to) in [
        ("usr/bin/cloudlet-agent", "../lib/cloudlet/agent"),
        (
            "usr/bin/cloudlet-image-builder",
            "../lib/cloudlet/image-builder",
        ),
    ] {
        std::os::unix::fs::symlink(to, tree.join(link))?;
    }
    write(&tree, &BOARD_FILE[1..], &packaged_board(name)?, 0o644)?;
    write(
        &tree,
        "lib/systemd/system/cloudlet-agent.service",
        UNIT_FILE,
        0o644,
    )?;
    write(
        &tree,
        "lib/udev/rules.d/60-cloudlet.rules",
        UDEV_RULES,
        0o644,
    )?;
    write(
        &tree,
        "usr/share/doc/cloudlet/README",
        &format!(
            "cloudlet {} for board {name}\n\nThe agent runs as the systemd service {UNIT} (user cloudlet, data in {DATA_DIR},\nlogs: journalctl -u cloudlet-agent). The operator token is {DATA_DIR}/operator.token;\nthe certificate fingerprint clients pin is on the agent's first log line.\nThe board's config is {BOARD_FILE}.\n",
            version()
        ),
        0o644,
    )?;
    write(
        &tree,
        "usr/share/doc/cloudlet/copyright",
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: cloudlet\n\nFiles: *\nLicense: Apache-2.0\n On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
        0o644,
    )?;

    let payload = files(&tree)?;
    let mut md5 = String::new();
    for f in &payload {
        let out = Command::new("md5sum")
            .arg(f)
            .current_dir(&tree)
            .output()
            .context("cannot run md5sum")?;
        md5.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let size_kib: u64 = payload
        .iter()
        .map(|f| {
            std::fs::metadata(tree.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum::<u64>()
        / 1024;
    let glibc = glibc_needed(&tree.join("usr/lib/cloudlet/agent"))?;
    let control = format!(
        "Package: {PACKAGE}\nVersion: {v}\nArchitecture: amd64\nMaintainer: cloudlet appliance developers <cloudlet@localhost>\nInstalled-Size: {size_kib}\nDepends: libc6 (>= {glibc}), libusb-1.0-0, passwd\nRecommends: systemd\nSection: admin\nPriority: optional\nDescription: cloudlet appliance: service VMs for nearby phones (board {name})\n The agent (a systemd service) synthesises service VMs from a base and an overlay on\n request, pairs phones, serves its API over HTTPS and announces itself over mDNS;\n with it the vmm, the image-builder and the cloudlet client.\n",
        v = version()
    );
    write(&tree, "DEBIAN/control", &control, 0o644)?;
    write(&tree, "DEBIAN/conffiles", &format!("{BOARD_FILE}\n"), 0o644)?;
    write(&tree, "DEBIAN/md5sums", &md5, 0o644)?;
    write(&tree, "DEBIAN/postinst", POSTINST, 0o755)?;
    write(&tree, "DEBIAN/prerm", PRERM, 0o755)?;
    write(&tree, "DEBIAN/postrm", POSTRM, 0o755)?;
    let deb = out_dir.join(format!("{PACKAGE}_{}_amd64.deb", version()));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zzstd", "--build"])
        .arg(&tree)
        .arg(&deb))?;
    Ok(deb)
}
