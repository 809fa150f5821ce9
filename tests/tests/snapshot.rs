//! Snapshot and restore through the `vmm` library: a guest snapshotted in the middle of a
//! computation continues exactly where it was after restore; several VMs restored from one
//! snapshot are independent; a damaged snapshot is refused before any vCPU runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudlet_tests::{error_chain, file_digest, micro_guest, Scratch};
use format::base::{MEMORY, STATE};
use vmm::builder::{build_for_boot, build_from_snapshot, RestoreConfig};
use vmm::config::{SerialOutput, VmConfig};
use vmm::loader::{BootProtocol, KernelConfig};
use vmm::machine::Machine;

const T: Duration = Duration::from_secs(30);

fn boot(serial: &Path, mem_mib: u64) -> Machine {
    let cfg = VmConfig::new(
        KernelConfig {
            kernel: micro_guest(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            protocol: BootProtocol::Linux,
        },
        mem_mib,
        1,
        SerialOutput::File(serial.to_owned()),
        false,
    )
    .unwrap();
    build_for_boot(&cfg).unwrap()
}

fn restore(snapshot: &Path, serial: &Path) -> Machine {
    build_from_snapshot(&RestoreConfig {
        snapshot: snapshot.to_owned(),
        serial: SerialOutput::File(serial.to_owned()),
        serial_input: false,
        paused: false,
        kvm_path: "/dev/kvm".into(),
        devices: Default::default(),
    })
    .unwrap()
}

/// Waits until the serial log has a line starting with `prefix`; returns it.
fn wait_line(log: &Path, prefix: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Whole lines only: the guest may be writing the last one right now.
        let whole = text
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'));
        if let Some(l) = whole
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.starts_with(prefix))
        {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no line {prefix:?} in {text:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn field(line: &str, key: &str) -> u64 {
    micro_service::client::field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Boots the micro guest with `mem_mib` MiB (serial to `s`'s `boot.log`), snapshots it once
/// it is up into `s`'s `snap` and ends it; returns the snapshot's directory.
fn booted_snapshot(s: &Scratch, mem_mib: u64) -> PathBuf {
    let boot_log = s.path("boot.log");
    let m = boot(&boot_log, mem_mib);
    wait_line(&boot_log, "micro-guest");
    let snap = s.path("snap");
    m.snapshot(&snap).unwrap();
    snap
}

fn send(m: &Machine, text: &str) {
    assert_eq!(m.serial_input(text.as_bytes()), text.len(), "fits the FIFO");
}

#[test]
fn guest_continues_exactly_where_it_was_snapshotted() {
    let s = Scratch::new("snap-rt");
    let before = s.path("before.log");
    let m = boot(&before, 64);
    wait_line(&before, "micro-guest");
    send(&m, "echo one\nstats\n");
    let stats = wait_line(&before, "ok stats");
    assert_eq!(field(&stats, "requests"), 2);
    let uptime_before = field(&stats, "uptime_us");

    // A computation of about a second, snapshotted while it runs.
    send(&m, "primes 1000000000\n");
    std::thread::sleep(Duration::from_millis(150));
    let snap = s.path("snap");
    let info = m.snapshot(&snap).unwrap();
    drop(m);
    let log = std::fs::read_to_string(&before).unwrap();
    assert!(
        !log.contains("ok primes"),
        "snapshot taken mid-computation: {log}"
    );
    assert!(
        info.memory_bytes_written < info.memory_bytes / 4,
        "sparse: {info:?}"
    );

    let after = s.path("after.log");
    let r = restore(&snap, &after);
    let primes = wait_line(&after, "ok primes");
    assert_eq!(field(&primes, "count"), 50_847_534, "π(10^9)");
    send(&r, "stats\n");
    let stats = wait_line(&after, "ok stats");
    assert_eq!(
        field(&stats, "requests"),
        4,
        "the request counter continued"
    );
    assert!(
        field(&stats, "uptime_us") > uptime_before,
        "guest time continued"
    );
}

#[test]
fn vms_restored_from_one_snapshot_are_independent_and_leave_it_unchanged() {
    let s = Scratch::new("snap-two");
    let snap = booted_snapshot(&s, 64);
    let (mem_digest, state_digest) = (
        file_digest(&snap.join(MEMORY)),
        file_digest(&snap.join(STATE)),
    );

    let (a_log, b_log) = (s.path("a.log"), s.path("b.log"));
    let a = restore(&snap, &a_log);
    let b = restore(&snap, &b_log);
    send(&a, "echo from-a\nstats\n");
    send(&b, "stats\n");
    assert_eq!(wait_line(&a_log, "ok echo"), "ok echo from-a");
    assert_eq!(field(&wait_line(&a_log, "ok stats"), "requests"), 2);
    assert_eq!(
        field(&wait_line(&b_log, "ok stats"), "requests"),
        1,
        "b saw none of a's requests"
    );
    assert!(!std::fs::read_to_string(&b_log).unwrap().contains("from-a"));
    drop((a, b));
    assert_eq!(
        file_digest(&snap.join(MEMORY)),
        mem_digest,
        "the snapshot's memory is untouched"
    );
    assert_eq!(file_digest(&snap.join(STATE)), state_digest);
}

#[test]
fn damaged_snapshots_are_refused_before_anything_runs() {
    let s = Scratch::new("snap-bad");
    let snap = booted_snapshot(&s, 16);
    let state = std::fs::read(snap.join(STATE)).unwrap();
    let cfg = |dir: &Path| RestoreConfig {
        snapshot: dir.to_owned(),
        serial: SerialOutput::File(s.path("never.log")),
        serial_input: false,
        paused: false,
        kvm_path: "/dev/kvm".into(),
        devices: Default::default(),
    };
    let refused = |name: &str, mutate: &dyn Fn(&Path)| -> String {
        let dir = s.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(snap.join(MEMORY), dir.join(MEMORY)).unwrap();
        std::fs::write(dir.join(STATE), &state).unwrap();
        mutate(&dir);
        let err = build_from_snapshot(&cfg(&dir)).map(|_| ()).unwrap_err();
        assert!(!s.path("never.log").exists(), "{name}: nothing ran");
        error_chain(&err)
    };
    let flipped = refused("flip", &|d| {
        let mut b = state.clone();
        b[state.len() / 2] ^= 0x10;
        std::fs::write(d.join(STATE), b).unwrap();
    });
    assert!(flipped.contains("corrupt"), "{flipped}");
    let cut = refused("cut", &|d| {
        std::fs::write(d.join(STATE), &state[..state.len() - 9]).unwrap()
    });
    assert!(cut.contains("truncated"), "{cut}");
    let version = refused("version", &|d| {
        let mut b = state.clone();
        b[8] = 9;
        std::fs::write(d.join(STATE), b).unwrap();
    });
    assert!(version.contains("version 9"), "{version}");
    let short_mem = refused("short-mem", &|d| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(MEMORY))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
    });
    assert!(short_mem.contains("memory image"), "{short_mem}");
    let missing = refused("missing", &|d| {
        std::fs::remove_file(d.join(MEMORY)).unwrap()
    });
    assert!(missing.contains(MEMORY), "{missing}");
}
