//! `cloudlet-update` end to end against a temporary "disk": file-backed partitions in a
//! `--devices` directory, a directory as ESP, a command-line file and a data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use format::update::{write_artifact_from, PartKind, UpdateRecord, UpdateResult};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet-update");
const SLOT_BYTES: u64 = 4 << 20;
const CMDLINE_A: &str = "BOOT_IMAGE=/cloudlet/a/vmlinuz root=PARTLABEL=cloudlet-root-a rw \
                         rootwait console=tty0 console=ttyS0,115200 cloudlet.slot=a \
                         cloudlet.generation=100\n";
const ENTRY_A: &str = "title Cloudlet 0.1.0 (slot a, generation 100)\nsort-key cloudlet\n\
                       version 100\nlinux /cloudlet/a/vmlinuz\ninitrd /cloudlet/a/initrd.img\n\
                       options root=PARTLABEL=cloudlet-root-a rw cloudlet.slot=a cloudlet.generation=100\n";

/// A box booted from slot A, generation 100, board `dev`.
struct Box {
    dir: PathBuf,
}

impl Box {
    fn new(name: &str) -> Box {
        let dir = std::env::temp_dir().join(format!("updater-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in [
            "esp/loader/entries",
            "esp/cloudlet/a",
            "devices",
            "data",
            "etc",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("esp/loader/entries/cloudlet-a.conf"), ENTRY_A).unwrap();
        std::fs::write(dir.join("esp/cloudlet/a/vmlinuz"), b"old kernel").unwrap();
        std::fs::write(dir.join("esp/cloudlet/a/initrd.img"), b"old initrd").unwrap();
        for s in ["a", "b"] {
            let f = std::fs::File::create(dir.join(format!("devices/cloudlet-root-{s}"))).unwrap();
            f.set_len(SLOT_BYTES).unwrap();
        }
        std::fs::write(dir.join("cmdline"), CMDLINE_A).unwrap();
        let board = Path::new(env!("CARGO_MANIFEST_DIR")).join("../board-configs/dev.toml");
        std::fs::copy(board, dir.join("etc/board.toml")).unwrap();
        Box { dir }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new(BIN)
            .arg("--esp")
            .arg(d.join("esp"))
            .arg("--devices")
            .arg(d.join("devices"))
            .arg("--cmdline")
            .arg(d.join("cmdline"))
            .arg("--board-file")
            .arg(d.join("etc/board.toml"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Every file under the box and its bytes (artifacts excluded).
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_none_or(|x| x != "cup") {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir, &mut out);
        out
    }

    fn record(&self) -> UpdateRecord {
        UpdateRecord::parse(&std::fs::read_to_string(self.p("data/updates/last.json")).unwrap())
            .unwrap()
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.p("esp/loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Box {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn root_image(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            if i % 4096 < 32 {
                (i / 4096) as u8 ^ 0x5A
            } else {
                0
            }
        })
        .collect()
}

/// An artifact for `board` at `generation` with a root of `root_len` bytes; returns its path.
fn artifact(b: &Box, name: &str, board: &str, generation: u64, root_len: usize) -> PathBuf {
    let root = root_image(root_len);
    let path = b.p(name);
    let mut f = std::fs::File::create(&path).unwrap();
    write_artifact_from(
        &mut f,
        board,
        generation,
        "0.2.0",
        1,
        vec![
            (PartKind::Root, &root[..]),
            (PartKind::Kernel, &b"new kernel"[..]),
            (PartKind::Initrd, &b"new initrd"[..]),
        ],
    )
    .unwrap();
    path
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_good_update_writes_the_other_slot_and_a_counting_entry() {
    let b = Box::new("good");
    let cup = artifact(&b, "u.cup", "dev", 200, 3 << 20);
    let o = b.run(&["apply", cup.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("100%"), "{}", text(&o));

    let dev = std::fs::read(b.p("devices/cloudlet-root-b")).unwrap();
    assert_eq!(dev.len() as u64, SLOT_BYTES);
    assert_eq!(&dev[..3 << 20], &root_image(3 << 20)[..]);
    assert_eq!(
        std::fs::read(b.p("esp/cloudlet/b/vmlinuz")).unwrap(),
        b"new kernel"
    );
    assert_eq!(
        std::fs::read(b.p("esp/cloudlet/b/initrd.img")).unwrap(),
        b"new initrd"
    );
    // The running slot is untouched.
    assert_eq!(
        std::fs::read(b.p("esp/cloudlet/a/vmlinuz")).unwrap(),
        b"old kernel"
    );
    assert_eq!(
        std::fs::read_to_string(b.p("esp/loader/entries/cloudlet-a.conf")).unwrap(),
        ENTRY_A
    );
    assert_eq!(b.entries(), ["cloudlet-a.conf", "cloudlet-b+1.conf"]);
    let entry = std::fs::read_to_string(b.p("esp/loader/entries/cloudlet-b+1.conf")).unwrap();
    assert_eq!(
        entry,
        "title Cloudlet 0.2.0 (slot b, generation 200)\nsort-key cloudlet\nversion 200\n\
         linux /cloudlet/b/vmlinuz\ninitrd /cloudlet/b/initrd.img\n\
         options root=PARTLABEL=cloudlet-root-b rw rootwait console=tty0 console=ttyS0,115200 \
         cloudlet.slot=b cloudlet.generation=200\n"
    );
    // The record and its directory belong to the data directory's owner (the agent's user).
    {
        use std::os::unix::fs::MetadataExt;
        std::os::unix::fs::chown(b.p("data"), Some(4242), Some(4343)).unwrap();
        std::fs::remove_dir_all(b.p("data/updates")).unwrap();
        let o = b.run(&["apply", "--allow-downgrade", cup.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        for f in ["data/updates", "data/updates/last.json"] {
            let m = std::fs::metadata(b.p(f)).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{f}");
        }
    }
    let r = b.record();
    assert_eq!(
        (r.result, r.generation, r.slot, r.error),
        (UpdateResult::Applied, 200, format::update::Slot::B, None)
    );

    let o = b.run(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["booted"]["slot"], "a");
    assert_eq!(s["slots"][1]["entries"][0]["generation"], 200);
    assert_eq!(s["slots"][1]["entries"][0]["assessment"]["state"], "trying");
    assert_eq!(s["slots"][1]["entries"][0]["assessment"]["left"], 1);
    assert_eq!(s["update"]["state"], "pending");

    // Booted from it (systemd-boot counted the try), still on trial: no update now.
    std::fs::write(
        b.p("cmdline"),
        "root=PARTLABEL=cloudlet-root-b cloudlet.slot=b cloudlet.generation=200",
    )
    .unwrap();
    let e = b.p("esp/loader/entries");
    std::fs::rename(e.join("cloudlet-b+1.conf"), e.join("cloudlet-b+0-1.conf")).unwrap();
    let o = b.run(&["status"]);
    assert!(
        text(&o).contains("slot b (running): generation 200, bad (no tries left, 1 used), this boot is being assessed"),
        "{}",
        text(&o)
    );
    let o = b.run(&["apply", cup.to_str().unwrap()]);
    assert!(text(&o).contains("still being assessed"), "{}", text(&o));
    // Blessed (systemd-bless-boot drops the counter): the same artifact again is not newer.
    std::fs::rename(e.join("cloudlet-b+0-1.conf"), e.join("cloudlet-b.conf")).unwrap();
    let o = b.run(&["status"]);
    assert!(
        text(&o).contains("generation 200 (0.2.0) is running"),
        "{}",
        text(&o)
    );
    let o = b.run(&["apply", cup.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not newer"), "{}", text(&o));
}

#[test]
fn a_corrupt_artifact_leaves_the_target_slot_without_an_entry() {
    let b = Box::new("corrupt");
    std::fs::write(
        b.p("esp/loader/entries/cloudlet-b+0-1.conf"),
        "version 50\n",
    )
    .unwrap();
    let cup = artifact(&b, "u.cup", "dev", 200, 3 << 20);
    let mut bytes = std::fs::read(&cup).unwrap();
    let head = format::update::read_header(&mut &bytes[..]).unwrap();
    let root = head.header.part(PartKind::Root).unwrap();
    let at = (head.payload_start + root.stored_len / 2) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&cup, &bytes).unwrap();

    let o = b.run(&["apply", cup.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("corrupt"), "{}", text(&o));
    assert_eq!(b.entries(), ["cloudlet-a.conf"]);
    assert_eq!(
        std::fs::read_to_string(b.p("esp/loader/entries/cloudlet-a.conf")).unwrap(),
        ENTRY_A
    );
    assert!(!b.p("esp/cloudlet/b/vmlinuz").exists());
    let r = b.record();
    assert_eq!((r.result, r.generation), (UpdateResult::Failed, 200));
    assert!(r.error.unwrap().contains("Root part is corrupt"));
    let o = b.run(&["status"]);
    assert!(text(&o).contains("slot b: empty"), "{}", text(&o));
    assert!(text(&o).contains("last update: failed"), "{}", text(&o));
}

#[test]
fn refusals_change_nothing() {
    let b = Box::new("refuse");
    let cases = [
        (
            artifact(&b, "board.cup", "minipc-4c", 200, 1 << 20),
            "for board 'minipc-4c', this box is board 'dev'",
        ),
        (
            artifact(&b, "old.cup", "dev", 100, 1 << 20),
            "not newer than the running generation 100",
        ),
        (
            artifact(&b, "big.cup", "dev", 200, (SLOT_BYTES + 1) as usize),
            "larger than the target partition",
        ),
    ];
    let before = b.snapshot();
    for (cup, why) in &cases {
        let o = b.run(&["apply", cup.to_str().unwrap()]);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(text(&o).contains(why), "{why}: {}", text(&o));
        assert!(text(&o).contains("nothing changed"), "{}", text(&o));
        assert!(b.snapshot() == before, "{why}: something changed");
    }
    // Another apply holding the lock, an ESP that is not mounted: refused too.
    let held = nix::fcntl::Flock::lock(
        std::fs::File::open(b.p("data")).unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let o = b.run(&["apply", "--allow-downgrade", cases[1].0.to_str().unwrap()]);
    assert!(
        text(&o).contains("another update is being applied"),
        "{}",
        text(&o)
    );
    drop(held);
    std::fs::rename(b.p("esp/loader"), b.p("esp/loader.away")).unwrap();
    let o = b.run(&["apply", "--allow-downgrade", cases[1].0.to_str().unwrap()]);
    assert!(
        text(&o).contains("is the ESP mounted there?"),
        "{}",
        text(&o)
    );
    std::fs::rename(b.p("esp/loader.away"), b.p("esp/loader")).unwrap();
    assert!(b.snapshot() == before, "something changed");

    // A downgrade is allowed when asked for.
    let o = b.run(&["apply", "--allow-downgrade", cases[1].0.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(b.entries(), ["cloudlet-a.conf", "cloudlet-b+1.conf"]);

    // Running a slot still on trial: its fallback (the target) is left alone.
    std::fs::remove_file(b.p("esp/loader/entries/cloudlet-b+1.conf")).unwrap();
    std::fs::rename(
        b.p("esp/loader/entries/cloudlet-a.conf"),
        b.p("esp/loader/entries/cloudlet-a+0-1.conf"),
    )
    .unwrap();
    let before = b.snapshot();
    let o = b.run(&["apply", "--allow-downgrade", cases[1].0.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("slot a is still being assessed (cloudlet-a+0-1.conf)"),
        "{}",
        text(&o)
    );
    assert!(b.snapshot() == before, "something changed");

    // Not booted from a slot: refused.
    std::fs::write(b.p("cmdline"), "root=/dev/sda1 quiet").unwrap();
    let o = b.run(&["apply", cases[1].0.to_str().unwrap()]);
    assert!(
        text(&o).contains("did not boot from a cloudlet root slot"),
        "{}",
        text(&o)
    );
}

#[test]
fn status_reads_counters() {
    let b = Box::new("status");
    std::fs::rename(
        b.p("esp/loader/entries/cloudlet-a.conf"),
        b.p("esp/loader/entries/cloudlet-a+2-1.conf"),
    )
    .unwrap();
    std::fs::write(
        b.p("esp/loader/entries/cloudlet-b+0-1.conf"),
        "version 90\n",
    )
    .unwrap();
    let o = b.run(&["status"]);
    let t = text(&o);
    assert!(t.contains("booted: slot a, generation 100"), "{t}");
    assert!(
        t.contains("slot a (running): generation 100, trying (2 tries left, 1 used), this boot is being assessed"),
        "{t}"
    );
    assert!(
        t.contains("slot b: generation 90, bad (no tries left, 1 used)"),
        "{t}"
    );
    assert!(t.contains("last update: none recorded"), "{t}");

    std::fs::remove_file(b.p("esp/loader/entries/cloudlet-b+0-1.conf")).unwrap();
    std::fs::write(b.p("esp/loader/entries/cloudlet-b.conf"), "version 300\n").unwrap();
    let o = b.run(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["slots"][1]["entries"][0]["assessment"]["state"], "good");
    assert_eq!(s["slots"][1]["entries"][0]["generation"], 300);
    assert_eq!(s["slots"][0]["booted"], true);

    // A record of generation 200 on slot b, applied before this boot: rolled back.
    let rec = format::update::UpdateRecord {
        v: 1,
        generation: 200,
        version: "0.2.0".into(),
        slot: format::update::Slot::B,
        applied_unix: 1,
        result: UpdateResult::Applied,
        error: None,
    };
    std::fs::create_dir_all(b.p("data/updates")).unwrap();
    std::fs::write(b.p("data/updates/last.json"), rec.to_json()).unwrap();
    let o = b.run(&["status"]);
    assert!(
        text(&o).contains("generation 200 did not come up healthy"),
        "{}",
        text(&o)
    );
}

#[test]
fn apply_pending_applies_or_records_and_always_removes() {
    let b = Box::new("pending");
    let o = b.run(&["apply-pending", "--no-reboot"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no update pending"));

    std::fs::create_dir_all(b.p("data/updates")).unwrap();
    let cup = artifact(&b, "x.cup", "minipc-4c", 200, 1 << 20);
    std::fs::rename(&cup, b.p("data/updates/pending.cup")).unwrap();
    let o = b.run(&["apply-pending", "--no-reboot"]);
    assert!(!o.status.success());
    assert!(!b.p("data/updates/pending.cup").exists());
    let r = b.record();
    assert_eq!((r.result, r.generation), (UpdateResult::Failed, 200));
    assert!(r.error.unwrap().contains("board 'minipc-4c'"));
    assert_eq!(b.entries(), ["cloudlet-a.conf"]);

    let cup = artifact(&b, "y.cup", "dev", 300, 1 << 20);
    std::fs::rename(&cup, b.p("data/updates/pending.cup")).unwrap();
    let o = b.run(&["apply-pending", "--no-reboot"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!b.p("data/updates/pending.cup").exists());
    assert_eq!(b.record().result, UpdateResult::Applied);
    assert_eq!(b.entries(), ["cloudlet-a.conf", "cloudlet-b+1.conf"]);
}

#[test]
fn pack_and_inspect() {
    let b = Box::new("inspect");
    std::fs::write(b.p("root.img"), root_image(1 << 20)).unwrap();
    std::fs::write(b.p("vmlinuz"), b"k").unwrap();
    std::fs::write(b.p("initrd.img"), b"i").unwrap();
    let cup = b.p("u.cup");
    let o = Command::new(BIN)
        .args([
            "pack",
            "--board",
            "dev",
            "--generation",
            "200",
            "--version",
            "0.2.0",
        ])
        .arg("--root")
        .arg(b.p("root.img"))
        .arg("--kernel")
        .arg(b.p("vmlinuz"))
        .arg("--initrd")
        .arg(b.p("initrd.img"))
        .arg("-o")
        .arg(&cup)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = b.run(&["inspect", "--verify", cup.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("board dev, generation 200"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("Initrd: verified"), "{}", text(&o));
    let mut bytes = std::fs::read(&cup).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    std::fs::write(&cup, &bytes).unwrap();
    let o = b.run(&["inspect", "--verify", cup.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("Initrd part is corrupt"), "{}", text(&o));
}
