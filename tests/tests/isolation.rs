//! The vmm locked down: every thread runs under its seccomp filter (a forbidden call kills
//! the vmm with SIGSYS, whichever kind of thread makes it), the control socket is its
//! owner's alone, and with `--confine DIR` nothing is written outside DIR.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_tests::{micro_guest, run_vmm, service_images, vmm_bin, Finished, Scratch, Vmm};

const T: Duration = Duration::from_secs(30);

/// `vmm run` of the micro guest with a virtio disk (so the device thread runs) and a
/// control socket at `sock`, plus `extra`.
fn run_args(sock: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--kernel",
        micro_guest().to_str().unwrap(),
        "--mem",
        "64",
        "--disk-size-mib",
        "1",
        "--api-sock",
        sock.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Starts `args` with the seccomp test hook aimed at thread kind `kind`.
fn spawn_hooked(args: &[String], kind: &str) -> Vmm {
    Vmm::spawn_cmd(
        Command::new(vmm_bin())
            .args(args)
            .env("VMM_SECCOMP_SELFTEST", kind),
    )
}

fn assert_sigsys(fin: &Finished, kind: &str) {
    assert_eq!(
        fin.status.signal(),
        Some(libc::SIGSYS),
        "the {kind} thread's forbidden call did not kill the vmm with SIGSYS: {fin:?}"
    );
    assert!(
        fin.stderr
            .contains(&format!("the {kind} thread makes a forbidden system call")),
        "{fin:?}"
    );
}

/// Waits until the vmm behind `sock` answers `status`.
fn wait_running(sock: &Path) {
    let deadline = Instant::now() + T;
    loop {
        let st = run_vmm(["status", "--api-sock", sock.to_str().unwrap()], T);
        if st.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "the vmm never answered: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_forbidden_call_in_any_thread_kind_kills_the_vmm_with_sigsys() {
    let s = Scratch::new("seccomp-kinds");
    // The threads a booted VM has from the start.
    for kind in ["main", "vcpu", "device", "control"] {
        let sock = s.path(&format!("{kind}.sock"));
        let fin = spawn_hooked(&run_args(&sock, &[]), kind).finish(T);
        assert_sigsys(&fin, kind);
    }
    // The lazy fill's threads, in a synthesised VM.
    let img = service_images();
    let sock = s.path("lazy.sock");
    let args = img.synthesize_args(sock.to_str().unwrap(), "127.0.0.1:0");
    assert_sigsys(&spawn_hooked(&args, "lazy").finish(T), "lazy");

    // The handoff's thread starts only when a handoff is asked for.
    let sock = s.path("handoff.sock");
    let args = img.synthesize_args(sock.to_str().unwrap(), "127.0.0.1:0");
    let mut vm = spawn_hooked(&args, "handoff");
    wait_running(&sock);
    let ho = Vmm::spawn_cmd(
        Command::new(vmm_bin())
            .args(["handoff", "--api-sock", sock.to_str().unwrap()])
            .args(["--to", "127.0.0.1:9"])
            .env("VMM_HANDOFF_TOKEN", "ab".repeat(32)),
    )
    .finish(T);
    assert_ne!(ho.status.code(), Some(0), "{ho:?}");
    assert_sigsys(&vm.finish(T), "handoff");

    // --no-seccomp: no filter, so the hook does nothing; the guest runs.
    let sock = s.path("off.sock");
    let mut vm = spawn_hooked(&run_args(&sock, &["--no-seccomp"]), "vcpu");
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    vm.send("echo free\n");
    vm.expect_line(T, |l| l == "ok echo free");
    vm.stats_and_poweroff(3, T);
}

/// The `Seccomp:` and `NoNewPrivs:` lines of each thread of process `pid`, by thread name.
fn thread_states(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(t.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out.sort();
    out
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_and_its_socket_is_private() {
    let s = Scratch::new("seccomp-threads");
    let sock = s.path("vm.sock");
    let mut vm = Vmm::spawn(run_args(&sock, &[]));
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    wait_running(&sock);
    let threads = thread_states(vm.pid());
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for want in ["vmm", "vcpu0", "virtio", "vmm-control"] {
        assert!(names.contains(&want), "{threads:?}");
    }
    for (name, seccomp, nnp) in &threads {
        // 2: filter mode.
        assert_eq!(
            (seccomp.as_str(), nnp.as_str()),
            ("2", "1"),
            "{name}: {threads:?}"
        );
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");
    assert_limits(vm.pid());
    vm.send("echo filtered\n");
    vm.expect_line(T, |l| l == "ok echo filtered");
    vm.stats_and_poweroff(0, T);

    // A synthesised VM's threads too (the lazy fill's among them).
    let img = service_images();
    let sock = s.path("syn.sock");
    let mut vm = Vmm::spawn(img.synthesize_args(sock.to_str().unwrap(), "127.0.0.1:0"));
    wait_running(&sock);
    let threads = thread_states(vm.pid());
    assert!(
        threads.iter().any(|t| t.0 == "overlay-check"),
        "{threads:?}"
    );
    assert!(threads.iter().all(|t| t.1 == "2"), "{threads:?}");
    let stop = run_vmm(["stop", "--api-sock", sock.to_str().unwrap()], T);
    assert_eq!(stop.code(), 0, "{stop:?}");
    assert_eq!(vm.finish(T).code(), 0);

    // --no-seccomp: no filter anywhere; the process's own limits stay.
    let sock = s.path("off.sock");
    let mut vm = Vmm::spawn(run_args(&sock, &["--no-seccomp"]));
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    let threads = thread_states(vm.pid());
    assert!(
        threads
            .iter()
            .all(|t| (t.1.as_str(), t.2.as_str()) == ("0", "1")),
        "{threads:?}"
    );
    assert_limits(vm.pid());
    vm.stats_and_poweroff(0, T);
}

/// No core dumps (they would hold guest memory) and a bounded descriptor table.
fn assert_limits(pid: u32) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let row = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(String::from)
            .collect()
    };
    assert_eq!(row("Max core file size"), ["0", "0"], "{limits}");
    let files = row("Max open files");
    let n: u64 = files[0].parse().unwrap();
    assert!(
        n <= vmm::limits::MAX_OPEN_FILES && files[0] == files[1],
        "{limits}"
    );
}

#[test]
fn outputs_are_confined_to_the_instance_directory() {
    let s = Scratch::new("confine");
    let inst = s.path("inst");
    let outside = s.path("outside");
    std::fs::create_dir_all(&inst).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, inst.join("link")).unwrap();
    let confine = ["--confine", inst.to_str().unwrap()];

    // Outputs named on the command line outside the directory: refused before anything runs.
    let out_sock = outside.join("vm.sock");
    for (what, args) in [
        ("--api-sock", run_args(&out_sock, &confine)),
        (
            "--serial",
            run_args(
                &inst.join("a.sock"),
                &[
                    &confine[..],
                    &["--serial", inst.join("../outside/s.log").to_str().unwrap()],
                ]
                .concat(),
            ),
        ),
        (
            "--disk-delta",
            run_args(
                &inst.join("b.sock"),
                &[
                    &confine[..],
                    &["--disk-delta", inst.join("link/d").to_str().unwrap()],
                ]
                .concat(),
            ),
        ),
    ] {
        let fin = run_vmm(&args, T);
        assert_eq!(fin.code(), 1, "{what}: {fin:?}");
        assert!(
            fin.stderr.contains("outside this VM's directory"),
            "{what}: {fin:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A snapshot: inside is fine; outside, through `..` or a symbolic link, refused.
    let sock = inst.join("vm.sock");
    let mut vm = Vmm::spawn(run_args(&sock, &confine));
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    wait_running(&sock);
    let sock_s = sock.to_str().unwrap();
    let snap = |dir: &Path| {
        run_vmm(
            [
                "snapshot",
                "--api-sock",
                sock_s,
                "--out",
                dir.to_str().unwrap(),
            ],
            T,
        )
    };
    for bad in [
        outside.join("snap"),
        inst.join("../outside/snap"),
        inst.join("link/snap"),
        inst.join("link"),
    ] {
        let fin = snap(&bad);
        assert_eq!(fin.code(), 1, "{bad:?}: {fin:?}");
        assert!(
            fin.stderr.contains("outside this VM's directory"),
            "{bad:?}: {fin:?}"
        );
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let fin = snap(&inst.join("snaps/one"));
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(inst.join("snaps/one/state").exists());
    // The VM went on.
    vm.send("echo still\n");
    vm.expect_line(T, |l| l == "ok echo still");
    vm.stats_and_poweroff(0, T);
}

/// A vmm without root (uid 65534, no capabilities) still synthesises lazily when it is
/// given the KVM and userfaultfd device nodes (as a jail gives them: here bind-mounted in a
/// mount namespace of its own), and its answers are right.
#[test]
fn lazy_synthesis_runs_without_root_given_the_device_nodes() {
    let s = Scratch::new("no-root");
    let nodes = s.path("dev");
    std::fs::create_dir_all(&nodes).unwrap();
    for (name, minor) in [("kvm", 232), ("userfaultfd", 257)] {
        let p = nodes.join(name);
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: mknod with a valid C path; the result is checked.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, minor)) };
        assert_eq!(r, 0, "mknod {p:?}: {}", std::io::Error::last_os_error());
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let img = service_images();
    let script = format!(
        "mount --bind {dev}/kvm /dev/kvm && mount --bind {dev}/userfaultfd /dev/userfaultfd \
         && exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" \"$@\"",
        dev = nodes.display()
    );
    let mut vm = Vmm::spawn_cmd(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .arg(vmm_bin())
            .args(["-v", "synthesize", "--base", img.base.to_str().unwrap()])
            .args(["--overlay", img.overlay.to_str().unwrap()])
            .args(["--prefetch-delay-ms", "2000"]),
    );
    for i in [3u64, 200_000, 400_000] {
        vm.send(&format!("query {i}\n"));
        let l = vm.expect_line(T, |l| l.starts_with("ok query"));
        assert_eq!(l, micro_service::oracle::query_reply(i));
    }
    let (_, fin) = vm.stats_and_poweroff(0, T);
    assert!(
        fin.stderr.contains("lazy fill start") && !fin.stderr.contains("unavailable"),
        "{}",
        fin.stderr
    );
    // The two far entries lie in chunks the held-back prefetch had not filled: faults,
    // KVM's among them, served through the device node's userfaultfd.
    let faults: u64 = fin
        .stderr
        .split("lazy fill: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lazy fill report in: {}", fin.stderr));
    assert!(faults >= 2, "{}", fin.stderr);
}

/// `vmm --jail` run by hand (not spawned into a pid namespace, so it makes one and forks):
/// the jailed vmm is pid 1 there, its own user with no capability, it sees its own
/// directory (writable), the base and the overlay's directory and nothing else; the process
/// that was started exits as the jailed one did (0 after a stop, SIGSYS when its filter
/// killed it).
#[test]
fn a_vmm_run_with_jail_enters_it_and_ends_as_the_jailed_vmm_did() {
    let s = Scratch::new("jail");
    let img = service_images();
    let inst = s.path("inst");
    let other = s.path("other");
    std::fs::create_dir_all(&inst).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("serial.log"), "another VM's").unwrap();
    let list = s.path("probe.list");
    std::fs::write(
        &list,
        format!(
            "{}\n{}\n/etc/passwd\n{}\n",
            other.display(),
            other.join("serial.log").display(),
            img.overlay.display()
        ),
    )
    .unwrap();
    let sock = inst.join("vm.sock");
    let mut args = img.synthesize_args(sock.to_str().unwrap(), "127.0.0.1:0");
    let uid = 1_500_999_001u32;
    for a in [
        "--confine",
        inst.to_str().unwrap(),
        "--jail",
        &format!("{uid}:{uid}"),
    ] {
        args.push(a.into());
    }
    let mut vm = Vmm::spawn_cmd(
        Command::new(vmm_bin())
            .args(&args)
            .env("VMM_JAIL_PROBE", &list),
    );
    wait_running(&sock);
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", vm.pid())).unwrap();
    let jailed: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{jailed}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec![uid.to_string(); 4]);
    assert_eq!(field("CapEff:"), ["0000000000000000"]);
    assert_eq!(field("NSpid:").last().unwrap(), "1");
    let stop = run_vmm(["stop", "--api-sock", sock.to_str().unwrap()], T);
    assert_eq!(stop.code(), 0, "{stop:?}");
    let fin = vm.finish(T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    let probe = |p: &Path| {
        fin.stderr
            .lines()
            .find(|l| l.starts_with(&format!("vmm: jail probe: {}: ", p.display())))
            .unwrap_or_else(|| panic!("{p:?} not probed: {}", fin.stderr))
            .to_string()
    };
    assert!(probe(&other).contains("unreachable"), "{}", fin.stderr);
    assert!(probe(&other.join("serial.log")).contains("unreachable"));
    assert!(probe(Path::new("/etc/passwd")).contains("unreachable"));
    // What it needs is there, read-only.
    let ov = probe(&img.overlay);
    assert!(ov.contains("REACHABLE (read 1 byte(s))"), "{ov}");
    assert!(!ov.contains("wrote"), "{ov}");
    assert!(
        fin.stderr.contains(&format!(
            "jail probe: uid={uid} gid={uid} pid=1 own directory writable=true"
        )),
        "{}",
        fin.stderr
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&inst).unwrap().uid(), uid);

    // A seccomp kill of the jailed vmm is the started process's end too.
    let sock = inst.join("vm2.sock");
    let mut args = img.synthesize_args(sock.to_str().unwrap(), "127.0.0.1:0");
    for a in [
        "--confine",
        inst.to_str().unwrap(),
        "--jail",
        &format!("{uid}:{uid}"),
    ] {
        args.push(a.into());
    }
    assert_sigsys(&spawn_hooked(&args, "vcpu").finish(T), "vcpu");
}
