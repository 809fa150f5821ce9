//! Tests of `cargo xtask flash` on real loop devices (we are root). Every file, loop device,
//! partition, mount and swap is made here and removed by a guard's `Drop`. Without loop
//! devices the tests fail with a message saying so: they are never skipped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::copy::*;
use super::disk::*;
use super::{flash, FlashArgs};

const MIB_U: u64 = 1 << 20;

/// A directory removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p =
            std::env::temp_dir().join(format!("xtask-flash-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        // Canonical, so it compares equal to mountinfo's mount points.
        TempDir(std::fs::canonicalize(&p).unwrap())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a command that must succeed; its stdout.
fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a file, detached (its partitions removed first) at the end.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop::with_flags(file, &[])
    }

    fn with_flags(file: &Path, flags: &[&str]) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--partscan"])
            .args(flags)
            .arg(file)
            .output()
            .expect("losetup (util-linux) is needed by the flash tests");
        assert!(
            out.status.success(),
            "the flash tests need a loop device and none could be set up (losetup --find: {}); \
             they are not skipped: run them where /dev/loop-control works (modprobe loop)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }

    fn name(&self) -> String {
        self.dev.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn sys(&self) -> PathBuf {
        Path::new("/sys/class/block").join(self.name())
    }

    /// Makes the kernel show the partitions of the GPT on it: `--partscan` does when the
    /// kernel parses GPT; otherwise `partx -a` adds them (BLKPG, no kernel parser needed).
    fn with_partitions(self, count: usize) -> Loop {
        if partitions(&self.sys()).len() < count {
            sh(Command::new("partx").arg("-a").arg(&self.dev));
        }
        assert_eq!(
            partitions(&self.sys()).len(),
            count,
            "partitions of {}",
            self.name()
        );
        for n in 1..=count {
            let node = self.part(n);
            let t = Instant::now();
            while !node.exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(5),
                    "{} never appeared",
                    node.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self
    }

    fn part(&self, n: usize) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.dev.display()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !partitions(&self.sys()).is_empty() {
            let _ = Command::new("partx").arg("-d").arg(&self.dev).output();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

/// A mount, unmounted at the end.
struct Mount(PathBuf);

impl Mount {
    fn new(node: &Path, at: &Path) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        sh(Command::new("mount").arg(node).arg(at));
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

/// A file of `len` bytes, all `byte`.
fn file_of(path: &Path, len: u64, byte: u8) {
    std::fs::write(path, vec![byte; len as usize]).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sparse file of `len` bytes with a GPT (partitions `root`, `data`) made by sfdisk.
fn gpt_file(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package) is needed by the flash tests");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nsize=8MiB, type=L, name=root\ntype=L, name=data\n")
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "sfdisk on {}",
        path.display()
    );
}

/// A fake appliance image: a GPT, data in both partitions, zeros (holes) between.
fn fake_image(path: &Path, len: u64) {
    gpt_file(path, len);
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&noise(3 << 20, 7), MIB_U).unwrap();
    f.write_all_at(&noise(MIB_U as usize, 9), 12 * MIB_U)
        .unwrap();
}

fn read_dev(dev: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(dev).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn args(device: &Path, image: &Path) -> FlashArgs {
    FlashArgs {
        board: None,
        device: device.to_path_buf(),
        image: Some(image.to_path_buf()),
        yes: true,
        allow_file: false,
    }
}

#[test]
fn flashes_a_gpt_image_to_a_loop_device_and_the_bytes_match() {
    let d = TempDir::new("ok");
    // Not a multiple of 4 KiB: the tail goes through the plain descriptor.
    let len = 20 * MIB_U + 1536;
    let image = d.0.join("cloudlet-test.img");
    fake_image(&image, len);
    // The disk holds old data everywhere, holes of the image included.
    let backing = d.0.join("disk");
    file_of(&backing, 32 * MIB_U, 0xa5);
    let lp = Loop::new(&backing);

    flash(&args(&lp.dev, &image)).expect("flash to a clean loop device");

    let want = std::fs::read(&image).unwrap();
    let got = read_dev(&lp.dev);
    assert_eq!(got.len() as u64, 32 * MIB_U);
    assert!(
        got[..len as usize] == want[..],
        "the device does not hold the image"
    );
    assert!(
        got[len as usize..].iter().all(|b| *b == 0xa5),
        "bytes past the image were touched"
    );
    // The kernel was told about the image's two partitions.
    let parts: Vec<String> = partitions(&lp.sys()).into_iter().map(|p| p.name).collect();
    assert_eq!(
        parts,
        vec![format!("{}p1", lp.name()), format!("{}p2", lp.name())]
    );
    let table = sh(Command::new("sfdisk").arg("--dump").arg(&lp.dev));
    assert!(
        table.contains("name=\"root\"") && table.contains("name=\"data\""),
        "{table}"
    );
}

#[test]
fn refuses_a_disk_whose_partition_is_mounted_and_writes_nothing() {
    let d = TempDir::new("mounted");
    let backing = d.0.join("disk");
    gpt_file(&backing, 32 * MIB_U);
    let lp = Loop::new(&backing).with_partitions(2);
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(lp.part(1)));
    let mnt = d.0.join("mnt");
    let _m = Mount::new(&lp.part(1), &mnt);
    let image = d.0.join("image");
    file_of(&image, MIB_U, 0x5a);

    let ins = inspect(&lp.dev, &image, MIB_U, false).unwrap();
    let part1 = format!("{}p1", lp.dev.display());
    assert_eq!(
        ins.refusals,
        vec![Refusal::Mounted {
            node: part1.clone(),
            at: vec![mnt.display().to_string()]
        }]
    );
    let before = read_dev(&lp.dev);
    let err = flash(&args(&lp.dev, &image)).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{part1} is mounted on {}", mnt.display())),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    // Even past the checks, the kernel refuses the exclusive open for writing.
    let err = write_image(&image, &lp.dev, true).unwrap_err().to_string();
    assert!(err.contains("is in use"), "{err}");
    assert!(read_dev(&lp.dev)[..MIB_U as usize] == before[..MIB_U as usize]);

    // The mounted partition itself: a partition, and mounted.
    let ins = inspect(&lp.part(1), &image, MIB_U, false).unwrap();
    assert!(ins.refusals.contains(&Refusal::Partition {
        number: 1,
        disk: lp.name()
    }));
    assert!(ins
        .refusals
        .iter()
        .any(|r| matches!(r, Refusal::Mounted { .. })));
}

#[test]
fn refuses_a_mounted_disk_without_partitions() {
    let d = TempDir::new("mounted-whole");
    let backing = d.0.join("disk");
    file_of(&backing, 16 * MIB_U, 0);
    let lp = Loop::new(&backing);
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&lp.dev));
    let mnt = d.0.join("mnt");
    let _m = Mount::new(&lp.dev, &mnt);
    let image = d.0.join("image");
    file_of(&image, MIB_U, 1);

    let ins = inspect(&lp.dev, &image, MIB_U, false).unwrap();
    assert_eq!(
        ins.refusals,
        vec![Refusal::Mounted {
            node: lp.dev.display().to_string(),
            at: vec![mnt.display().to_string()]
        }]
    );
}

/// The host's root disk(s), found independently of the code under test: findmnt and lsblk.
fn root_disks_by_util_linux() -> Vec<String> {
    let majmin = sh(Command::new("findmnt").args(["-no", "MAJ:MIN", "/"]));
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{majmin}/uevent"))
        .unwrap_or_else(|e| panic!("/ is on {majmin}, which is no block device: {e}"));
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .expect("DEVNAME in uevent");
    sh(Command::new("lsblk")
        .args(["-snro", "NAME,TYPE"])
        .arg(format!("/dev/{name}")))
    .lines()
    .filter_map(|l| l.strip_suffix(" disk"))
    .map(str::to_string)
    .collect()
}

#[test]
fn refuses_the_disk_the_host_runs_from() {
    // Only `inspect` runs here, which never opens for writing: never flash the host's disk.
    let disks = root_disks_by_util_linux();
    assert!(!disks.is_empty(), "no disk found under /");
    let d = TempDir::new("host");
    let image = d.0.join("image");
    file_of(&image, 4096, 0);
    for disk in disks {
        let dev = PathBuf::from(format!("/dev/{disk}"));
        let ins = inspect(&dev, &image, 4096, false).unwrap();
        let host = ins
            .refusals
            .iter()
            .find(|r| matches!(r, Refusal::HostDisk { .. }))
            .unwrap_or_else(|| panic!("{} not refused as the host's disk: {ins:?}", dev.display()));
        match host {
            Refusal::HostDisk { disk: d, mounts } => {
                assert_eq!(*d, disk);
                assert!(mounts.iter().any(|m| m == "/"), "{mounts:?}");
            }
            _ => unreachable!(),
        }
        let msg = refusal_message(&dev, &ins.refusals);
        assert!(
            msg.contains(&format!("/dev/{disk} is the disk the host runs from")),
            "{msg}"
        );
        assert!(msg.contains("nothing was written"), "{msg}");
    }
}

#[test]
fn refuses_a_device_smaller_than_the_image() {
    let d = TempDir::new("small");
    let backing = d.0.join("disk");
    file_of(&backing, 8 * MIB_U, 0);
    let lp = Loop::new(&backing);
    let image = d.0.join("image");
    File::create(&image).unwrap().set_len(20 * MIB_U).unwrap();

    let ins = inspect(&lp.dev, &image, 20 * MIB_U, false).unwrap();
    assert_eq!(
        ins.refusals,
        vec![Refusal::TooSmall {
            size: 8 * MIB_U,
            image: 20 * MIB_U
        }]
    );
    let err = flash(&args(&lp.dev, &image)).unwrap_err().to_string();
    assert!(
        err.contains("8388608 bytes (8.0 MiB), less than the image's 20971520"),
        "{err}"
    );
}

#[test]
fn refuses_a_read_only_device() {
    let d = TempDir::new("ro");
    let backing = d.0.join("disk");
    file_of(&backing, 8 * MIB_U, 0);
    let lp = Loop::with_flags(&backing, &["--read-only"]);
    let image = d.0.join("image");
    file_of(&image, MIB_U, 1);
    let ins = inspect(&lp.dev, &image, MIB_U, false).unwrap();
    assert_eq!(ins.refusals, vec![Refusal::ReadOnly]);
}

#[test]
fn refuses_a_partition_and_names_its_disk() {
    let d = TempDir::new("part");
    let backing = d.0.join("disk");
    gpt_file(&backing, 32 * MIB_U);
    let lp = Loop::new(&backing).with_partitions(2);
    let image = d.0.join("image");
    file_of(&image, MIB_U, 1);

    let ins = inspect(&lp.part(2), &image, MIB_U, false).unwrap();
    assert_eq!(
        ins.refusals,
        vec![Refusal::Partition {
            number: 2,
            disk: lp.name()
        }]
    );
    let msg = refusal_message(&lp.part(2), &ins.refusals);
    assert!(
        msg.contains(&format!("it is partition 2 of {}", lp.dev.display()))
            && msg.contains(&format!("flash the whole disk {}", lp.dev.display())),
        "{msg}"
    );
}

#[test]
fn refuses_a_device_in_use_as_swap() {
    let d = TempDir::new("swap");
    let backing = d.0.join("disk");
    file_of(&backing, 16 * MIB_U, 0);
    let lp = Loop::new(&backing);
    sh(Command::new("mkswap").arg(&lp.dev));
    // The lowest priority: the host would use its own swap (if any) first.
    sh(Command::new("swapon")
        .args(["--priority", "0"])
        .arg(&lp.dev));
    struct SwapOff(PathBuf);
    impl Drop for SwapOff {
        fn drop(&mut self) {
            let _ = Command::new("swapoff").arg(&self.0).output();
        }
    }
    let _s = SwapOff(lp.dev.clone());
    let image = d.0.join("image");
    file_of(&image, MIB_U, 1);

    let ins = inspect(&lp.dev, &image, MIB_U, false).unwrap();
    assert_eq!(
        ins.refusals,
        vec![Refusal::Swap {
            node: lp.dev.display().to_string()
        }]
    );
}

#[test]
fn a_regular_file_only_with_allow_file_and_never_the_image_itself() {
    let d = TempDir::new("file");
    // Not a multiple of 4 KiB: the tail goes through the plain descriptor.
    let len = 3 * MIB_U + 100;
    let image = d.0.join("image");
    std::fs::write(&image, noise(len as usize, 3)).unwrap();
    let disk = d.0.join("vm-disk.raw");
    file_of(&disk, 8 * MIB_U, 0xee);

    let ins = inspect(&disk, &image, len, false).unwrap();
    assert_eq!(
        ins.refusals,
        vec![Refusal::NotBlock {
            kind: "a regular file"
        }]
    );
    let err = flash(&args(&disk, &image)).unwrap_err().to_string();
    assert!(
        err.contains("not a block device (pass --allow-file"),
        "{err}"
    );
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0xee));

    assert_eq!(
        inspect(&image, &image, len, true).unwrap().refusals,
        vec![Refusal::IsImage]
    );

    let mut a = args(&disk, &image);
    a.allow_file = true;
    flash(&a).expect("flash to a file with --allow-file");
    let got = std::fs::read(&disk).unwrap();
    assert!(got[..len as usize] == std::fs::read(&image).unwrap()[..]);
    assert!(got[len as usize..].iter().all(|b| *b == 0xee));
}

#[test]
fn verify_reports_where_the_device_differs() {
    let d = TempDir::new("verify");
    let len = 5 * MIB_U + 123;
    let image = d.0.join("image");
    let data = noise(len as usize, 5);
    std::fs::write(&image, &data).unwrap();

    let same = d.0.join("same");
    std::fs::write(&same, &data).unwrap();
    let v = verify(&image, &same, len).unwrap();
    assert!(v.mismatches.is_empty() && v.differing == 0, "{v:?}");
    assert_eq!(v.bytes, len);
    assert_eq!(v.sha256[..], Sha256::digest(&data)[..]);

    let mut bad = data.clone();
    for at in [1000, 1001, 4 * MIB_U as usize + 7, len as usize - 1] {
        bad[at] ^= 0xff;
    }
    let other = d.0.join("other");
    std::fs::write(&other, &bad).unwrap();
    let v = verify(&image, &other, len).unwrap();
    assert_eq!(v.differing, 4);
    assert_eq!(
        v.mismatches,
        vec![
            Mismatch {
                offset: 1000,
                len: 2
            },
            Mismatch {
                offset: 4 * MIB_U + 7,
                len: 1
            },
            Mismatch {
                offset: len - 1,
                len: 1
            },
        ]
    );
    let msg = mismatch_message(&other, &v);
    assert!(
        msg.contains("4 of 5243003 bytes") && msg.contains("0x3e8 (1000), 2 bytes"),
        "{msg}"
    );

    let short = d.0.join("short");
    std::fs::write(&short, &data[..MIB_U as usize]).unwrap();
    let err = verify(&image, &short, len).unwrap_err().to_string();
    assert!(err.contains("ended at offset 1048576"), "{err}");
}

#[test]
fn a_missing_board_image_says_to_build_it() {
    let a = FlashArgs {
        board: Some("no-such-board".into()),
        device: PathBuf::from("/dev/null"),
        image: None,
        yes: true,
        allow_file: false,
    };
    let err = flash(&a).unwrap_err().to_string();
    assert!(
        err.contains("run `cargo xtask image --board no-such-board` first"),
        "{err}"
    );
    assert!(
        err.contains("target/image/no-such-board/cloudlet-no-such-board.img"),
        "{err}"
    );
}

#[test]
fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
    let text = "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n\
                90 27 7:3 / /mnt/my\\040disk rw - ext4 /dev/loop3 rw\n\
                91 27 0:55 / /merged rw - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u\n";
    let m = parse_mountinfo(text);
    assert_eq!(m.len(), 3);
    assert_eq!(
        (m[0].dev, m[0].mount_point.as_str(), m[0].source.as_str()),
        ((254, 0), "/", "/dev/vda")
    );
    assert_eq!(m[1].mount_point, "/mnt/my disk");
    assert_eq!(m[2].fstype, "overlay");
    let mut devs = Vec::new();
    mount_devices(&m[2], &m, 0, &mut devs);
    // Every layer is on / (254:0).
    assert_eq!(devs, vec![(254, 0); 3]);
}
