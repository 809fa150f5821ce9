//! The control socket and the snapshot/restore commands, as an operator uses them: `vmm run
//! --api-sock`, `vmm status|pause|resume|snapshot|stop`, `vmm restore`. Garbage on the socket
//! never disturbs the VM, nor does a client that connects and says nothing. The report channel
//! a supervisor gives the vmm (`--report-fd`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use format::control::{read_frame, FailureKind, Report};

use cloudlet_tests::{micro_guest, run_vmm, Scratch, Vmm};

const T: Duration = Duration::from_secs(30);

fn ctl(args: &[&str]) -> cloudlet_tests::Finished {
    run_vmm(args, T)
}

/// Arguments of `vmm run` for the micro guest (64 MiB) with a control socket at `sock`.
fn run_args(sock: &str) -> Vec<String> {
    let kernel = micro_guest().display().to_string();
    [
        "run",
        "--kernel",
        &kernel,
        "--mem",
        "64",
        "--api-sock",
        sock,
    ]
    .map(String::from)
    .to_vec()
}

/// `vmm run` of the micro guest (64 MiB) with a control socket `vm.sock` in `s`, once the
/// guest has answered `echo WORD` (the socket listens by then); with the socket's path.
fn run_with_socket(s: &Scratch, word: &str) -> (Vmm, std::path::PathBuf, String) {
    let sock = s.path("vm.sock");
    let sock_s = sock.display().to_string();
    let mut vm = Vmm::spawn(run_args(&sock_s));
    vm.expect_line(T, |l| l.starts_with("micro-guest"));
    vm.send(&format!("echo {word}\n"));
    let want = format!("ok echo {word}");
    vm.expect_line(T, |l| l == want);
    (vm, sock, sock_s)
}

#[test]
fn snapshot_through_the_socket_and_restore_from_the_command_line() {
    let s = Scratch::new("api");
    let (mut vm, sock, sock_s) = run_with_socket(&s, "before");

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

#[test]
fn a_silent_client_blocks_no_other() {
    let s = Scratch::new("api-silent");
    let (mut vm, sock, sock_s) = run_with_socket(&s, "up");
    // One client connected that sends nothing, one that sends half a frame.
    let _silent = UnixStream::connect(&sock).unwrap();
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(&[3, 0, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let timed = |args: &[&str]| {
        let t = Instant::now();
        let fin = ctl(args);
        (fin, t.elapsed())
    };
    // Spawning the vmm client itself takes a few milliseconds; the old server made every
    // request wait for the silent client's 30 s read timeout.
    let quick = Duration::from_millis(800);
    for (cmd, want) in [
        ("status", "running vcpus=1 mem_mib=64"),
        ("pause", "ok"),
        ("status", "paused vcpus=1 mem_mib=64"),
        ("resume", "ok"),
    ] {
        let (fin, took) = timed(&[cmd, "--api-sock", &sock_s]);
        assert_eq!(fin.stdout, [want], "{cmd}: {fin:?}");
        assert!(
            took < quick,
            "{cmd} took {took:?} with a silent client connected"
        );
    }
    vm.send("echo still\n");
    vm.expect_line(T, |l| l == "ok echo still");
    let (fin, took) = timed(&["stop", "--api-sock", &sock_s]);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(
        took < quick,
        "stop took {took:?} with a silent client connected"
    );
    assert_eq!(vm.finish(T).code(), 0);
}

/// `vmm` with `run_args(sock)`, then `forward`, and `--report-fd` on one end of a socket
/// pair; returns the other end.
fn spawn_reporting(sock: &str, forward: &str) -> (Vmm, UnixStream) {
    let mut cmd = Command::new(cloudlet_tests::vmm_bin());
    cmd.args(run_args(sock)).args(["--forward", forward]);
    Vmm::spawn_reporting(&mut cmd, T)
}

#[test]
fn the_report_channel_says_ready_with_the_bound_port_then_exited_then_eof() {
    let s = Scratch::new("api-report");
    let sock = s.path("vm.sock").display().to_string();
    let (mut vm, mut report) = spawn_reporting(&sock, "127.0.0.1:0=10.0.2.15:80");
    let ready = match read_frame::<Report>(&mut report).unwrap().unwrap() {
        Report::Ready(r) => r,
        other => panic!("expected Ready, got {other:?}"),
    };
    assert_eq!(ready.synthesis, None, "a boot has no synthesis timings");
    assert_eq!(ready.forwards.len(), 1, "{ready:?}");
    let host = ready.forwards[0].host;
    assert_ne!(host.port(), 0, "the bound port is reported");
    assert_eq!(ready.forwards[0].guest_port, 80);
    std::net::TcpStream::connect(host).expect("the forward listens");
    // Ready means the control socket answers too.
    assert_eq!(ctl(&["status", "--api-sock", &sock]).code(), 0);

    assert_eq!(ctl(&["stop", "--api-sock", &sock]).code(), 0);
    assert_eq!(
        read_frame::<Report>(&mut report).unwrap().unwrap(),
        Report::Exited { code: 0 }
    );
    assert!(
        std::net::TcpStream::connect(host).is_err(),
        "the forward is closed by the time the exit is reported"
    );
    let mut rest = Vec::new();
    report.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "end of file after Exited: {rest:?}");
    assert_eq!(vm.finish(T).code(), 0);
}

#[test]
fn the_report_channel_says_why_a_start_failed() {
    let s = Scratch::new("api-report-fail");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fwd = format!("{}=10.0.2.15:80", taken.local_addr().unwrap());
    let sock = s.path("vm.sock").display().to_string();
    let (mut vm, mut report) = spawn_reporting(&sock, &fwd);
    let failed = match read_frame::<Report>(&mut report).unwrap().unwrap() {
        Report::Failed(f) => f,
        other => panic!("expected Failed, got {other:?}"),
    };
    assert_eq!(failed.kind, FailureKind::AddressInUse, "{failed:?}");
    assert!(failed.chain.len() >= 2, "the causes are kept: {failed:?}");
    assert_eq!(vm.finish(T).code(), 1);
}
