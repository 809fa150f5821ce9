//! A handoff between two appliances on one machine: the real source (`vmm synthesize`, then
//! `vmm handoff`) in network namespace A, the real target (`vmm receive`) in namespace B, the
//! two joined by a shaped veth pair (`cloudlet_tests::netns`; this kernel has no netem, so the
//! shaping is a rate alone: 100 Mbit/s, 25 Mbit/s where a phase must last long enough to be
//! cut inside it). The lab is made and removed by the test (root and iproute2 needed).
//!
//! One source VM (a disk and a NIC; a client inside A keeps writing its disk table with `put`
//! and its RAM counter with `incr` during every handoff) meets a failure at each phase:
//!
//! ```text
//! case                       how the link is cut                          link
//! before the first byte      veth down before `vmm handoff`               100 Mbit/s
//! in the δ (round 0)         veth down at the source's Delta report        25 Mbit/s
//! in the dirty rounds        relay: cut after the first Pages past a Disk  25 Mbit/s
//! the target killed          SIGKILL to `vmm receive` at the Delta report  25 Mbit/s
//! during the final pause     relay: cut after the source's State          100 Mbit/s
//! after Resumed, before ack  relay: the target's Resumed is not passed    100 Mbit/s
//! Resumed later than the     relay: the target's Resumed held back, the   100 Mbit/s
//!   source's patience          source's direction (Abandon, close) passed
//! ```
//!
//! The relay (in the test, in namespace A, between the source and the target) passes frames
//! whole and stops at a frame boundary; a cut sends nothing more either way and reads nothing
//! more (no FIN: a cut link does not close), as a dead link would. Once the target has given
//! up (its `--timeout-ms`), the link "comes back": veth up, or for the relay a reset to the
//! source, as the target's kernel answers a segment for a connection it no longer has. The
//! cases left to the source's own timeout are those after `Resumed`: the source waits for it,
//! gives up and resumes, while the target, which never sees the source let go, discards —
//! also when the source's `Abandon` and close do reach a target still waiting (a close alone
//! would be the release).
//!
//! After each: the source VM serves with all its state (every acknowledged put, the counter
//! exactly as last acknowledged), `vmm status` says running, the target has ended with no
//! process and no file left (control socket, disk δ, serial log). Then the handoff that
//! completes, with the client writing throughout: the target (through the forward it
//! reports, from inside B) answers every acknowledged change, and the source exits with 0.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cloudlet_tests::netns::{Pair, Shape};
use cloudlet_tests::{
    error_chain, service_images, vmm_bin, vmm_status, Finished, Scratch, ServiceImages, Vmm,
};
use format::control::{read_frame, HandoffPhase, HandoffProgress, Report};
use format::handoff::{Kind, FRAME_HEADER_LEN, FRAME_TRAILER_LEN, PREAMBLE_LEN};
use micro_service::client::{field, Client};
use micro_service::oracle::{count_reply, get_reply, query_reply, table_value};

/// Timeout for anything a VM or a build does on a loaded 2-core host.
const T: Duration = Duration::from_secs(60);
/// The target's `--timeout-ms`: to be connected to, for each read, for the source's release.
const TARGET_TIMEOUT_MS: u64 = 1500;
/// How soon after the cut a target must have ended (its timeout, and some slack).
const QUICK: Duration = Duration::from_secs(10);
const GUEST_SERVICE: &str = "10.0.2.15:80";
/// The source VM's service, forwarded inside namespace A.
const SOURCE_SERVICE: &str = "127.0.0.1:8080";
const TOKEN: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn arg(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

fn images() -> &'static ServiceImages {
    service_images()
}

/// Lets the child keep `fd` across exec (`ip netns exec` passes it on to the vmm).
fn keep_fd(cmd: &mut Command, fd: i32) {
    // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the child's copy of
    // `fd` only.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A vmm's report channel, read on a thread.
struct Reports {
    rx: Receiver<Report>,
}

impl Reports {
    fn read(mut r: UnixStream) -> Reports {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(Ok(rep)) = read_frame::<Report>(&mut r) {
                if tx.send(rep).is_err() {
                    break;
                }
            }
        });
        Reports { rx }
    }

    /// The next report (`None` at end of file); panics after `T`.
    fn next(&self) -> Option<Report> {
        match self.rx.recv_timeout(T) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no report within {T:?}"),
        }
    }

    /// Handoff progress until one satisfies `pred` (returned with the phases before it);
    /// panics if the handoff ends first.
    fn wait(
        &self,
        pred: impl Fn(&HandoffProgress) -> bool,
    ) -> (HandoffProgress, Vec<HandoffPhase>) {
        let mut seen = Vec::new();
        loop {
            match self.next() {
                Some(Report::Handoff(p)) if pred(&p) => return (p, seen),
                Some(Report::Handoff(p)) => {
                    assert!(
                        !matches!(p.phase, HandoffPhase::Failed | HandoffPhase::Done),
                        "the handoff ended before the awaited phase: {seen:?} {p:?}"
                    );
                    seen.push(p.phase);
                }
                Some(_) => {}
                None => panic!("the report channel ended; handoff phases {seen:?}"),
            }
        }
    }

    /// The handoff's phases until it ended (Failed or Done, included).
    fn until_ended(&self) -> Vec<HandoffPhase> {
        let mut seen = Vec::new();
        loop {
            match self.next() {
                Some(Report::Handoff(p)) => {
                    seen.push(p.phase);
                    if matches!(p.phase, HandoffPhase::Failed | HandoffPhase::Done) {
                        return seen;
                    }
                }
                Some(_) => {}
                None => panic!("the report channel ended; handoff phases {seen:?}"),
            }
        }
    }
}

/// The source: a synthesised VM in namespace A with a control socket, its service forwarded
/// to `SOURCE_SERVICE` inside A, its reports.
struct Source {
    vmm: Vmm,
    sock: String,
    reports: Reports,
}

fn synthesise(lab: &Pair, s: &Scratch) -> Source {
    let img = images();
    let sock = s.path("source.sock").display().to_string();
    let (reports, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = lab.a().command(vmm_bin());
    cmd.args(img.synthesize_args(&sock, SOURCE_SERVICE));
    cmd.args(["--report-fd", &fd.to_string()]);
    keep_fd(&mut cmd, fd);
    let vmm = Vmm::spawn_cmd(&mut cmd);
    drop(theirs);
    let reports = Reports::read(reports);
    match reports.next() {
        Some(Report::Ready(_)) => {}
        other => panic!("the source did not start: {other:?}"),
    }
    Source { vmm, sock, reports }
}

/// `vmm handoff` of the VM behind `sock` to `to` (it talks to the control socket only: it
/// runs outside the namespaces).
fn start_handoff(sock: &str, to: SocketAddr, downtime_ms: u32) -> Vmm {
    let mut v = Vmm::spawn_cmd(
        Command::new(vmm_bin())
            .args(["handoff", "--api-sock", sock, "--to", &to.to_string()])
            .args(["--downtime-ms", &downtime_ms.to_string()])
            .env("VMM_HANDOFF_TOKEN", TOKEN),
    );
    v.close_stdin();
    v
}

/// `vmm receive` in namespace B, and the files it may create.
struct Target {
    vmm: Vmm,
    reports: Reports,
    addr: SocketAddr,
    files: [PathBuf; 3],
    timeout: Duration,
}

fn receiver(lab: &Pair, s: &Scratch, name: &str, timeout_ms: u64) -> Target {
    let img = images();
    let (reports, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let files = [
        s.path(&format!("{name}.sock")),
        s.path(&format!("{name}.delta")),
        s.path(&format!("{name}.serial")),
    ];
    let mut cmd = lab.b().command(vmm_bin());
    cmd.args(["receive", "--base", arg(&img.base)])
        .args(["--listen", &format!("{}:0", lab.b().addr())])
        .args(["--timeout-ms", &timeout_ms.to_string()])
        .args(["--forward", &format!("127.0.0.1:0={GUEST_SERVICE}")])
        .args(["--api-sock", arg(&files[0]), "--disk-delta", arg(&files[1])])
        .args(["--serial", arg(&files[2])])
        .args(["--report-fd", &fd.to_string(), "--no-stdin"])
        .env("VMM_HANDOFF_TOKEN", TOKEN);
    keep_fd(&mut cmd, fd);
    let mut vmm = Vmm::spawn_cmd(&mut cmd);
    drop(theirs);
    let reports = Reports::read(reports);
    let addr = match reports.next() {
        Some(Report::Listening { addr }) => addr,
        other => {
            let fin = vmm.finish(QUICK);
            panic!("expected Listening, got {other:?}; {fin:?}")
        }
    };
    Target {
        vmm,
        reports,
        addr,
        files,
        timeout: Duration::from_millis(timeout_ms),
    }
}

impl Target {
    /// The target gave up: within its timeout and `QUICK` it has reported Failed (unless `killed`) and never
    /// Ready, exited 1 (or by the signal), left no file, and no process runs in B.
    fn discarded(mut self, lab: &Pair, killed: bool, needle: &str) -> Finished {
        let fin = self.vmm.finish(self.timeout + QUICK);
        let mut reports = Vec::new();
        while let Some(r) = self.reports.next() {
            reports.push(r);
        }
        assert!(
            !reports.iter().any(|r| matches!(r, Report::Ready(_))),
            "the target never keeps the VM: {reports:?}"
        );
        if killed {
            assert!(fin.status.code().is_none(), "killed: {fin:?}");
        } else {
            assert_eq!(fin.code(), 1, "{fin:?}");
            let failed = reports.iter().find_map(|r| match r {
                Report::Failed(f) => Some(f.chain.join(": ")),
                _ => None,
            });
            let chain = failed.unwrap_or_else(|| panic!("no Failed report: {reports:?}"));
            assert!(chain.contains(needle), "expected {needle:?} in {chain:?}");
            assert!(!fin.stderr.contains("panicked"), "{}", fin.stderr);
        }
        for f in &self.files {
            assert!(!f.exists(), "{} is left", f.display());
        }
        assert!(
            lab.b().pids().is_empty(),
            "no process in B: {:?}",
            lab.b().pids()
        );
        fin
    }
}

/// A client of a VM's service inside namespace `ns`.
fn client(ns: &cloudlet_tests::netns::Ns, addr: SocketAddr) -> Client {
    ns.run_in(|| Client::connect_when_up(addr, T, Duration::from_secs(3)))
        .unwrap()
        .unwrap_or_else(|e| panic!("the service at {addr}: {}", error_chain(&e)))
}

fn ask(c: &mut Client, req: &str) -> String {
    c.request(req)
        .unwrap_or_else(|e| panic!("{req}: {}", error_chain(&e)))
}

/// What a client had acknowledged.
#[derive(Debug, Default)]
struct Acked {
    /// Table entries, the last value acknowledged for each.
    puts: BTreeMap<u64, u64>,
    /// The counter as last acknowledged.
    count: Option<u64>,
    /// A put sent whose answer never came (the source stopped): it may or may not have
    /// been applied.
    unsure: Option<(u64, u64)>,
    /// It stopped when told (no request left unanswered), not on an error.
    clean: bool,
}

/// A client that keeps changing the VM — `put` into entries `first..first+50` (values
/// unique to this case) and `incr` — until `stop` (after at least 5 rounds) or the first
/// error; returns what was acknowledged.
fn writer(mut c: Client, first: u64, stop: Arc<AtomicBool>) -> JoinHandle<Acked> {
    std::thread::spawn(move || {
        let mut a = Acked::default();
        for j in 0u64.. {
            if stop.load(Ordering::Relaxed) && j >= 5 {
                a.clean = true;
                break;
            }
            let (i, v) = (first + j % 50, first * 1000 + j);
            match c.request(&format!("put {i} {v}")) {
                Ok(r) => assert_eq!(r, format!("ok put i={i} value={v}")),
                Err(_) => {
                    a.unsure = Some((i, v));
                    break;
                }
            }
            a.puts.insert(i, v);
            match c.request("incr") {
                Ok(r) => {
                    let n = field(&r, "n").and_then(|n| n.parse().ok());
                    assert!(n.is_some(), "{r}");
                    assert!(n > a.count, "the counter grows: {r} after {:?}", a.count);
                    a.count = n;
                }
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        a
    })
}

/// The VM behind `c` has every change in `puts` (or the `unsure` one instead) and the
/// base's and overlay's content; its counter lies in `counts`.
fn has_everything(
    c: &mut Client,
    puts: &BTreeMap<u64, u64>,
    unsure: Option<(u64, u64)>,
    counts: std::ops::RangeInclusive<u64>,
) {
    for i in [0u64, 5, 524_287] {
        assert_eq!(ask(c, &format!("query {i}")), query_reply(i));
    }
    assert_eq!(ask(c, "get 7"), get_reply(7, 42));
    assert_eq!(ask(c, "get 4999"), get_reply(4999, table_value(4999)));
    for (&i, &v) in puts {
        let got = ask(c, &format!("get {i}"));
        match unsure {
            Some((u, w)) if u == i && got == get_reply(i, w) => {}
            _ => assert_eq!(got, get_reply(i, v), "entry {i}"),
        }
    }
    if let Some((u, w)) = unsure.filter(|(u, _)| !puts.contains_key(u)) {
        let got = ask(c, &format!("get {u}"));
        assert!(
            got == get_reply(u, w) || got == get_reply(u, table_value(u)),
            "entry {u}: {got}"
        );
    }
    let r = ask(c, "count");
    if counts.start() == counts.end() {
        assert_eq!(r, count_reply(*counts.start()));
    } else {
        let n: u64 = field(&r, "n").unwrap().parse().unwrap();
        assert!(counts.contains(&n), "the counter {n} lies in {counts:?}");
    }
}

/// Where the relay stops passing frames.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// After the first source `Pages` frame that follows a `Disk` frame (a dirty round).
    InRounds,
    /// After the source's `State` (the VM is paused).
    AfterState,
    /// At the target's `Resumed` (not passed).
    AtResumed,
    /// The target's `Resumed` held back (not passed) while the source's direction still
    /// works, its close included: a `Resumed` later than the source's patience.
    HoldResumed,
}

/// A frame-aware TCP relay in namespace A between the source and the target.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// The source's and the target's connections, held open (a cut does not close).
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(lab: &Pair, target: SocketAddr, at: Cut) -> Relay {
        let listener = lab.a().listen(0).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let ns = lab.a().name().to_string();
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (cut2, stop2, conns2) = (cut.clone(), stop.clone(), conns.clone());
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            let src = loop {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(e) => panic!("relay accept: {e}"),
                }
            };
            src.set_nonblocking(false).unwrap();
            let dst = TcpStream::connect_timeout(&target, T).expect("relay to the target");
            for c in [&src, &dst] {
                c.set_nodelay(true).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            }
            conns2
                .lock()
                .unwrap()
                .extend([src.try_clone().unwrap(), dst.try_clone().unwrap()]);
            let there = {
                let (src, dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                let (cut, stop) = (cut2.clone(), stop2.clone());
                std::thread::spawn(move || pump(src, dst, true, at, &cut, &stop))
            };
            pump(dst, src, false, at, &cut2, &stop2);
            let _ = there.join();
        });
        Relay {
            addr,
            cut,
            stop,
            conns,
            thread: Some(thread),
        }
    }

    /// Waits until the relay has cut.
    fn wait_cut(&self) {
        let deadline = Instant::now() + T;
        while !self.cut.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "the relay never reached its cut");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The link comes back after the target gave up: the source's connection is reset, as
    /// the target's kernel answers a segment for a connection it no longer has.
    fn reset_source(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut conns = self.conns.lock().unwrap();
        if !conns.is_empty() {
            let src = conns.remove(0);
            netback::set_linger_zero(&src).expect("SO_LINGER");
            drop(src);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into network namespace `name`.
fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns(2) on a descriptor we hold open; it changes only this thread's network
    // namespace (a thread of the relay's own).
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Passes whole frames (the preamble first when `preamble`) from `from` to `to` until the
/// cut (`at`, for this direction), then reads and passes nothing more until `stop`.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    preamble: bool,
    at: Cut,
    cut: &AtomicBool,
    stop: &AtomicBool,
) {
    let source = preamble;
    // Only the target's direction is cut: the source's goes on, its end passed on.
    let goes_on = source && at == Cut::HoldResumed;
    let mut need_preamble = preamble;
    let mut after_disk = false;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let idle = |stop: &AtomicBool| {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if cut.load(Ordering::Relaxed) && !goes_on {
            // A dead link: nothing is read (the sender's buffers fill), nothing passes.
            return idle(stop);
        }
        match from.read(&mut chunk) {
            Ok(0) => {
                if goes_on {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                }
                return idle(stop);
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return idle(stop),
        }
        loop {
            let need = if need_preamble {
                PREAMBLE_LEN
            } else if buf.len() >= FRAME_HEADER_LEN {
                let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
                FRAME_HEADER_LEN + len + FRAME_TRAILER_LEN
            } else {
                break;
            };
            if buf.len() < need || (cut.load(Ordering::Relaxed) && !goes_on) {
                break;
            }
            let frame: Vec<u8> = buf.drain(..need).collect();
            let kind = (!need_preamble).then(|| frame[4]);
            need_preamble = false;
            let (pass, cut_here) = match (at, source, kind) {
                (Cut::AtResumed | Cut::HoldResumed, false, Some(k)) if k == Kind::Resumed as u8 => {
                    (false, true)
                }
                (Cut::AfterState, true, Some(k)) if k == Kind::State as u8 => (true, true),
                (Cut::InRounds, true, Some(k)) if k == Kind::Disk as u8 => {
                    after_disk = true;
                    (true, false)
                }
                (Cut::InRounds, true, Some(k)) if k == Kind::Pages as u8 && after_disk => {
                    (true, true)
                }
                _ => (true, false),
            };
            if pass {
                let _ = to.write_all(&frame);
            }
            if cut_here {
                cut.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// How a case cuts the link.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    BeforeFirstByte,
    InDelta,
    InRounds,
    TargetKilled,
    DuringPause,
    AfterResumed,
    ResumedLate,
}

/// One failed handoff of `src`; the client writes meanwhile. Returns what it acknowledged.
fn failed_handoff(lab: &Pair, s: &Scratch, src: &Source, case: Case, k: u64) -> Acked {
    let t0 = Instant::now();
    let slow = matches!(case, Case::InDelta | Case::InRounds | Case::TargetKilled);
    lab.shape(Shape::mbit(if slow { 25 } else { 100 })).unwrap();
    // A target that waits longer for the source's release than the source waits for
    // `Resumed` (as the defaults do: 30 s and 10 s).
    let timeout_ms = if case == Case::ResumedLate {
        15_000
    } else {
        TARGET_TIMEOUT_MS
    };
    let target = receiver(lab, s, &format!("target{k}"), timeout_ms);
    let relay = match case {
        Case::InRounds => Some(Relay::start(lab, target.addr, Cut::InRounds)),
        Case::DuringPause => Some(Relay::start(lab, target.addr, Cut::AfterState)),
        Case::AfterResumed => Some(Relay::start(lab, target.addr, Cut::AtResumed)),
        Case::ResumedLate => Some(Relay::start(lab, target.addr, Cut::HoldResumed)),
        _ => None,
    };
    let to = relay.as_ref().map_or(target.addr, |r| r.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        client(lab.a(), SOURCE_SERVICE.parse().unwrap()),
        100 + 100 * k,
        stop.clone(),
    );
    // Some changes before the handoff starts.
    std::thread::sleep(Duration::from_millis(100));
    if case == Case::BeforeFirstByte {
        lab.link_down().unwrap();
    }
    // No budget in the rounds case: the source goes round after round.
    let budget = if case == Case::InRounds { 0 } else { 20 };
    let mut handoff = start_handoff(&src.sock, to, budget);
    let mut relay = relay;
    let mut target = Some(target);
    let target_fin;
    // Why the source says it failed (any of these).
    let needle: &[&str];
    // When the link comes back, the source may first meet the target's `Failed` (written
    // before it gave up) or a reset.
    const GONE: &[&str] = &[
        "the target closed the connection",
        "the target failed (Other): the source sent nothing for",
    ];
    match case {
        Case::BeforeFirstByte => {
            needle = &["cannot connect to the handoff target"];
            target_fin = target
                .take()
                .unwrap()
                .discarded(lab, false, "no source connected");
            lab.link_up().unwrap();
        }
        Case::InDelta => {
            let (_, before) = src.reports.wait(|p| p.phase == HandoffPhase::Delta);
            lab.link_down().unwrap();
            eprintln!("{case:?}: cut after {before:?} Delta");
            needle = GONE;
            target_fin =
                target
                    .take()
                    .unwrap()
                    .discarded(lab, false, "the source sent nothing for");
            lab.link_up().unwrap();
        }
        Case::TargetKilled => {
            src.reports.wait(|p| p.phase == HandoffPhase::Delta);
            let t = target.as_ref().unwrap();
            // SAFETY: kill(2) has no memory effects; the pid is our child's, still running.
            unsafe { libc::kill(t.vmm.pid() as i32, libc::SIGKILL) };
            needle = &GONE[..1];
            target_fin = target.take().unwrap().discarded(lab, true, "");
        }
        Case::InRounds | Case::DuringPause | Case::AfterResumed | Case::ResumedLate => {
            let r = relay.as_mut().unwrap();
            r.wait_cut();
            let t = target.take().unwrap();
            if case == Case::AfterResumed {
                // The source never reads Resumed: its own timeout (the VM paused meanwhile)
                // ends its wait, it resumes; the target sees no release and discards.
                needle = &["the handoff stream failed"];
                target_fin = t.discarded(lab, false, "did not release the VM");
            } else if case == Case::ResumedLate {
                // The source gives up on `Resumed` after its timeout and says so before it
                // closes: the target, whose `Resumed` is held back, must not take the close
                // for a release.
                needle = &["the handoff stream failed"];
                target_fin = t.discarded(lab, false, "the source abandoned the handoff");
            } else {
                needle = &GONE[..1];
                target_fin = t.discarded(lab, false, "the source sent nothing for");
                r.reset_source();
            }
        }
    }
    let fin = handoff.finish(T);
    drop(relay);
    assert_eq!(fin.code(), 1, "{case:?}: the handoff fails: {fin:?}");
    assert!(
        needle.iter().any(|n| fin.stderr.contains(n)),
        "{case:?}: {needle:?} in {fin:?}"
    );
    let phases = src.reports.until_ended();
    assert_eq!(phases.last(), Some(&HandoffPhase::Failed), "{phases:?}");
    let paused = phases.contains(&HandoffPhase::Paused);
    match case {
        Case::BeforeFirstByte => {
            assert_eq!(phases, [HandoffPhase::Connecting, HandoffPhase::Failed])
        }
        Case::DuringPause | Case::AfterResumed | Case::ResumedLate => {
            assert!(paused, "{phases:?}")
        }
        _ => {}
    }
    stop.store(true, Ordering::Relaxed);
    let acked = w.join().unwrap();
    assert!(
        acked.clean,
        "{case:?}: the source served the client throughout"
    );
    // Exactly one VM: the source's, with all its state; none in B.
    let status = vmm_status(&src.sock, T);
    assert!(status.starts_with("running"), "{case:?}: {status}");
    assert!(lab.b().pids().is_empty());
    eprintln!(
        "{case:?}: {:.1} s, {} puts, counter {:?}, phases {phases:?}; source: {}; target: {}",
        t0.elapsed().as_secs_f64(),
        acked.puts.len(),
        acked.count,
        fin.stderr.trim(),
        target_fin
            .stderr
            .lines()
            .find(|l| l.contains("rror"))
            .unwrap_or("(killed)")
    );
    acked
}

#[test]
fn a_vm_moves_between_namespaces_and_a_cut_at_any_phase_keeps_it_on_the_source() {
    let t0 = Instant::now();
    images();
    let lab = Pair::new().expect("the two appliances (root and iproute2 needed)");
    let s = Scratch::new("handoff-netns-run");
    let mut src = synthesise(&lab, &s);
    let mut c = client(lab.a(), SOURCE_SERVICE.parse().unwrap());
    // A guest that dirties pages steadily, as a running service does.
    assert!(ask(&mut c, "dirty 200").starts_with("ok dirty rate=200"));
    let mut puts = BTreeMap::new();
    let mut count = 0;
    for (k, case) in [
        Case::BeforeFirstByte,
        Case::InDelta,
        Case::InRounds,
        Case::TargetKilled,
        Case::DuringPause,
        Case::AfterResumed,
        Case::ResumedLate,
    ]
    .into_iter()
    .enumerate()
    {
        let acked = failed_handoff(&lab, &s, &src, case, k as u64);
        puts.extend(acked.puts);
        count = acked.count.unwrap_or(count);
        has_everything(&mut c, &puts, None, count..=count);
    }
    drop(c);

    // The handoff that completes at 100 Mbit/s, the client writing until the source stops.
    lab.shape(Shape::mbit(100)).unwrap();
    let mut target = receiver(&lab, &s, "target", TARGET_TIMEOUT_MS);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        client(lab.a(), SOURCE_SERVICE.parse().unwrap()),
        4000,
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(100));
    let t1 = Instant::now();
    let fin = start_handoff(&src.sock, target.addr, 20).finish(T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(fin.stdout[0].starts_with("handed off:"), "{fin:?}");
    let took = t1.elapsed();
    let acked = w.join().unwrap();
    assert!(!acked.clean, "the client wrote until the source stopped");
    puts.extend(acked.puts.clone());
    let last = acked.count.unwrap_or(count);
    let phases = src.reports.until_ended();
    assert_eq!(phases.last(), Some(&HandoffPhase::Done), "{phases:?}");
    let exit = src.vmm.finish(T);
    assert_eq!(exit.code(), 0, "the source vmm exits with 0: {exit:?}");
    assert_eq!(src.reports.next(), Some(Report::Exited { code: 0 }));

    let ready = match target.reports.next() {
        Some(Report::Ready(r)) => r,
        other => panic!("expected Ready, got {other:?}"),
    };
    let mut t = client(lab.b(), ready.forwards[0].host);
    // One request at a time: only an `incr` whose answer was lost may have counted too.
    let counts = if acked.unsure.is_some() {
        last..=last
    } else {
        last..=last + 1
    };
    has_everything(&mut t, &puts, acked.unsure, counts);
    assert_eq!(ask(&mut t, "put 9 99"), "ok put i=9 value=99");
    drop(t);
    let stop_fin = Command::new(vmm_bin())
        .args(["stop", "--api-sock", arg(&target.files[0])])
        .output()
        .unwrap();
    assert!(stop_fin.status.success(), "{stop_fin:?}");
    let tfin = target.vmm.finish(T);
    assert_eq!(tfin.code(), 0, "{tfin:?}");
    eprintln!(
        "completed: {} ({:.2} s with the command), {} puts, counter ≥ {last}; whole test {:.1} s",
        fin.stdout[0],
        took.as_secs_f64(),
        puts.len(),
        t0.elapsed().as_secs_f64()
    );
}
