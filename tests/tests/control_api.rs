//! The control socket and the snapshot/restore commands, as an operator uses them: `vmm run
//! --api-sock`, `vmm status|pause|resume|snapshot|stop`, `vmm restore`. Garbage on the socket
//! never disturbs the VM.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use cloudlet_tests::{micro_guest, run_vmm, Scratch, Vmm};

const T: Duration = Duration::from_secs(30);

fn ctl(args: &[&str]) -> cloudlet_tests::Finished {
    run_vmm(args, T)
}

#[test]
fn snapshot_through_the_socket_and_restore_from_the_command_line() {
    let s = Scratch::new("api");
    let sock = s.path("vm.sock");
    let sock_s = sock.display().to_string();
    let mut vm = Vmm::spawn([
        "run",
        "--kernel",
        &micro_guest().display().to_string(),
        "--mem",
        "64",
        "--api-sock",
        &sock_s,
    ]);
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    vm.send("echo before\n");
    vm.expect_line(T, |l| l == "ok echo before");

    let st = ctl(&["status", "--api-sock", &sock_s]);
    assert_eq!(
        (st.code(), st.stdout.as_slice()),
        (0, &["running vcpus=1 mem_mib=64".to_string()][..]),
        "{st:?}"
    );
    assert_eq!(ctl(&["pause", "--api-sock", &sock_s]).code(), 0);
    assert_eq!(
        ctl(&["status", "--api-sock", &sock_s]).stdout,
        ["paused vcpus=1 mem_mib=64"]
    );
    assert_eq!(ctl(&["resume", "--api-sock", &sock_s]).code(), 0);

    // Garbage, an oversized length and a wrong protocol version: the VM keeps running.
    for junk in [&b"hello"[..], &[0xff, 0xff, 0xff, 0xff][..]] {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(junk).unwrap();
    }
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(&[3, 0, 0, 0, 7, 0, 0]).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert!(
        String::from_utf8_lossy(&reply).contains("protocol version 7"),
        "{reply:?}"
    );

    let snap = s.path("snap");
    let out = ctl(&[
        "snapshot",
        "--api-sock",
        &sock_s,
        "--out",
        &snap.display().to_string(),
    ]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert!(out.stdout[0].starts_with("snapshot written"), "{out:?}");
    vm.send("echo after\n");
    vm.expect_line(T, |l| l == "ok echo after");
    assert_eq!(ctl(&["stop", "--api-sock", &sock_s]).code(), 0);
    let fin = vm.finish(T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(!sock.exists(), "the socket file is removed at exit");

    // The restored VM has served `echo before` and not `echo after`.
    let mut r = Vmm::spawn(["restore", "--snapshot", &snap.display().to_string()]);
    let (stats, _) = r.stats_and_poweroff(6, T);
    assert!(stats.contains("requests=2"), "{stats}");
}

#[test]
fn control_commands_fail_clearly_without_a_vm() {
    let s = Scratch::new("api-none");
    let sock = s.path("none.sock").display().to_string();
    let fin = ctl(&["status", "--api-sock", &sock]);
    assert_eq!(fin.code(), 1);
    assert!(
        fin.stderr.contains("cannot reach the vmm"),
        "{}",
        fin.stderr
    );
    let fin = ctl(&[
        "restore",
        "--snapshot",
        &s.path("nothing").display().to_string(),
    ]);
    assert_eq!(fin.code(), 1);
    assert!(
        fin.stderr.contains("failed to restore the snapshot"),
        "{}",
        fin.stderr
    );
}
