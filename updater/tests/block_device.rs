//! An update written to a real block device (a loop device over a file, as root): the slot
//! then holds the new ext4 filesystem, mountable with its files; a mounted target is refused.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use format::update::{write_artifact, PartKind};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet-update");

fn sh(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A loop device over a file, detached (and unmounted) on drop.
struct Loop {
    dev: String,
    mounted: Option<PathBuf>,
}

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop {
            dev: sh("losetup", &["-f", "--show", file.to_str().unwrap()]),
            mounted: None,
        }
    }

    fn mount_ro(&mut self, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        sh("mount", &["-o", "ro", &self.dev, at.to_str().unwrap()]);
        self.mounted = Some(at.into());
    }

    fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            sh("umount", &[m.to_str().unwrap()]);
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.umount();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn an_update_lands_on_a_block_device_as_a_mountable_filesystem() {
    let d = std::env::temp_dir().join(format!("updater-blockdev-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    for sub in ["esp/loader/entries", "devices", "data", "tree/etc"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    // The new root: an ext4 image made from a tree, smaller than the slot.
    std::fs::write(d.join("tree/etc/cloudlet-generation"), "200\n").unwrap();
    let blob: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("tree/blob"), &blob).unwrap();
    let root = d.join("root.img");
    std::fs::File::create(&root)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            d.join("tree").to_str().unwrap(),
            root.to_str().unwrap(),
        ],
    );
    std::fs::write(d.join("vmlinuz"), b"kernel").unwrap();
    std::fs::write(d.join("initrd.img"), b"initrd").unwrap();
    let cup = d.join("u.cup");
    write_artifact(
        &mut std::fs::File::create(&cup).unwrap(),
        "dev",
        200,
        "0.2.0",
        1,
        &[
            (PartKind::Root, &root),
            (PartKind::Kernel, &d.join("vmlinuz")),
            (PartKind::Initrd, &d.join("initrd.img")),
        ],
    )
    .unwrap();

    // Slot B: a 32 MiB loop device holding old bytes; slot A: a plain file.
    let slot_b = d.join("slot-b.img");
    std::fs::write(&slot_b, vec![0xEEu8; 32 << 20]).unwrap();
    let mut lo = Loop::new(&slot_b);
    std::os::unix::fs::symlink(&lo.dev, d.join("devices/cloudlet-root-b")).unwrap();
    std::fs::write(d.join("devices/cloudlet-root-a"), b"").unwrap();
    std::fs::write(
        d.join("cmdline"),
        "root=PARTLABEL=cloudlet-root-a rw console=ttyS0,115200 cloudlet.slot=a cloudlet.generation=100",
    )
    .unwrap();
    let board = Path::new(env!("CARGO_MANIFEST_DIR")).join("../board-configs/dev.toml");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("--esp")
            .arg(d.join("esp"))
            .arg("--devices")
            .arg(d.join("devices"))
            .arg("--cmdline")
            .arg(d.join("cmdline"))
            .arg("--board-file")
            .arg(&board)
            .arg("--data-dir")
            .arg(d.join("data"))
            .args(args)
            .output()
            .unwrap()
    };

    let o = run(&["apply", cup.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let m = d.join("mnt");
    lo.mount_ro(&m);
    assert_eq!(
        std::fs::read_to_string(m.join("etc/cloudlet-generation")).unwrap(),
        "200\n"
    );
    assert!(std::fs::read(m.join("blob")).unwrap() == blob);

    // Mounted: refused, nothing written.
    let entries = std::fs::read_dir(d.join("esp/loader/entries"))
        .unwrap()
        .count();
    let o = run(&["apply", "--allow-downgrade", cup.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("is mounted at {}", m.display())),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_dir(d.join("esp/loader/entries"))
            .unwrap()
            .count(),
        entries
    );
    lo.umount();

    // Held by someone else (as swap or a device mapper would hold it): refused too.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&lo.dev)
        .unwrap();
    let o = run(&["apply", "--allow-downgrade", cup.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is in use"), "{}", text(&o));
    drop(held);
    let o = run(&["apply", "--allow-downgrade", cup.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    drop(lo);
    std::fs::remove_dir_all(&d).unwrap();
}
