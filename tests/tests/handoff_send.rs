//! The source side of a handoff, end to end: a VM synthesised from a base and an overlay is
//! handed off with `vmm handoff` to a **test receiver** written here with `format::handoff`
//! (not the product's `vmm receive`). The receiver rebuilds the VM's memory image from the
//! base and the pages, its disk δ and its state into a snapshot directory, which `vmm
//! restore` then runs: the guest answers from there with the model in RAM, the table entries
//! written before and during the handoff, and its request counter. A receiver that refuses,
//! fails or cuts the link at any phase leaves the source VM running with all its state.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cloudlet_tests::{
    arg, micro_guest, service_images, vmm_bin, vmm_status, Finished, Scratch, ServiceImages, Vmm,
};
use format::base::{Manifest, MEMORY, STATE};
use format::control::{HandoffPhase, Report};
use format::handoff::{
    Codec, Fill, FrameReader, FrameWriter, Message, Pages, Refusal, RefuseKind, Resumed, Start,
};
use format::PAGE_SIZE as PAGE;
use micro_service::client::{field, Client};
use micro_service::oracle::{get_reply, query_reply, table_value};

const T: Duration = Duration::from_secs(60);
const GUEST_SERVICE: &str = "10.0.2.15:80";
const TOKEN: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn images() -> &'static ServiceImages {
    service_images()
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// A synthesised VM with a control socket, its service forwarded, and its report channel.
struct Source {
    vmm: Vmm,
    sock: String,
    addr: SocketAddr,
    reports: UnixStream,
}

fn synthesise(s: &Scratch) -> Source {
    let img = images();
    let port = free_port();
    let sock = s.path("vm.sock").display().to_string();
    let mut cmd = Command::new(vmm_bin());
    cmd.args(img.synthesize_args(&sock, &format!("127.0.0.1:{port}")));
    let (vmm, reports) = Vmm::spawn_reporting(&mut cmd, T);
    Source {
        vmm,
        sock,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        reports,
    }
}

/// Every report until end of file.
fn all_reports(r: &mut UnixStream) -> Vec<Report> {
    let mut out = Vec::new();
    while let Ok(Ok(rep)) = format::control::read_frame::<Report>(r) {
        out.push(rep);
    }
    out
}

/// `vmm handoff` of the VM behind `sock` to `to`.
fn handoff(sock: &str, to: SocketAddr, downtime_ms: u32) -> Finished {
    let mut v = Vmm::spawn_cmd(
        Command::new(vmm_bin())
            .args([
                "handoff",
                "--api-sock",
                sock,
                "--to",
                &to.to_string(),
                "--downtime-ms",
                &downtime_ms.to_string(),
            ])
            .env("VMM_HANDOFF_TOKEN", TOKEN),
    );
    v.close_stdin();
    v.finish(T)
}

/// What the test receiver does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Everything, then `Resumed`.
    Accept,
    /// `Refuse` after `Start`.
    Refuse,
    /// Closes the connection after `Start`, before answering.
    CutBeforeAccept,
    /// Closes after the first `Pages` frame (round 0, the δ).
    CutInDelta,
    /// Answers `Failed` at the first `Pages` frame, then discards the rest.
    FailInDelta,
    /// Closes at the first `Pages` frame after a `Disk` frame (a dirty round).
    CutInRounds,
    /// Closes after `Complete`, without an answer.
    CutAfterComplete,
    /// Answers `Failed` after `Complete`.
    FailAfterComplete,
}

/// What the receiver rebuilt.
struct Received {
    start: Start,
    image: Vec<u8>,
    disk: BTreeMap<u64, Vec<u8>>,
    state: Vec<u8>,
    rounds_seen: u32,
}

/// A receiver listening on an ephemeral port; its thread returns what it rebuilt (`None`
/// when it stopped early as its mode says).
fn receiver(mode: Mode) -> (SocketAddr, JoinHandle<Option<Received>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let img = images();
    let base_image = std::fs::read(img.base.join(MEMORY)).unwrap();
    let base_id = Manifest::load(&img.base).unwrap().id_bytes();
    let h = std::thread::spawn(move || {
        let (conn, _) = l.accept().unwrap();
        conn.set_read_timeout(Some(T)).unwrap();
        serve(conn, mode, base_image, base_id)
    });
    (addr, h)
}

fn serve(conn: TcpStream, mode: Mode, base: Vec<u8>, base_id: [u8; 32]) -> Option<Received> {
    let mut r = FrameReader::new(conn.try_clone().unwrap());
    let mut w = FrameWriter::new(conn.try_clone().unwrap());
    let pre = r.read_preamble().unwrap();
    assert_eq!(pre.base_id, base_id, "the stream names the base");
    assert_eq!(hex(&pre.token), TOKEN, "the token from VMM_HANDOFF_TOKEN");
    let Message::Start(start) = r.read().unwrap() else {
        panic!("Start first")
    };
    assert_eq!(start.mem_mib << 20, base.len() as u64);
    match mode {
        Mode::CutBeforeAccept => return None,
        Mode::Refuse => {
            // Slowly: the test checks meanwhile that the source serves as usual.
            std::thread::sleep(Duration::from_secs(1));
            w.write(
                &Message::Refuse(Refusal {
                    kind: RefuseKind::Other,
                    reason: "the test refuses".into(),
                }),
                Codec::Raw,
            )
            .unwrap();
            return None;
        }
        _ => w.write(&Message::Accept, Codec::Raw).unwrap(),
    }
    let mem_pages = base.len() as u64 / PAGE as u64;
    let mut image = base.clone();
    let mut disk = BTreeMap::new();
    let mut state = None;
    let (mut after_disk, mut rounds_seen) = (false, 0);
    loop {
        let msg = match r.read() {
            Ok(m) => m,
            Err(e) => panic!("the stream broke: {e}"),
        };
        match msg {
            Message::Pages(p) => {
                if mode == Mode::FailInDelta {
                    w.write(
                        &Message::Failed(Refusal {
                            kind: RefuseKind::Other,
                            reason: "the test runs out of memory".into(),
                        }),
                        Codec::Raw,
                    )
                    .unwrap();
                    while r.read().is_ok() {}
                    return None;
                }
                if mode == Mode::CutInDelta || (mode == Mode::CutInRounds && after_disk) {
                    return None;
                }
                if after_disk {
                    rounds_seen += 1;
                    after_disk = false;
                }
                apply(&mut image, &base, &p, mem_pages);
            }
            Message::Disk(blocks) => {
                after_disk = true;
                for (n, data) in blocks {
                    disk.insert(n, data);
                }
            }
            Message::State(s) => state = Some(s),
            Message::Complete(_) => break,
            Message::Abandon(why) => panic!("the source abandoned: {why}"),
            m => panic!("unexpected {:?}", m.kind()),
        }
    }
    match mode {
        Mode::CutAfterComplete => None,
        Mode::FailAfterComplete => {
            w.write(
                &Message::Failed(Refusal {
                    kind: RefuseKind::Other,
                    reason: "the test fails the restore".into(),
                }),
                Codec::Raw,
            )
            .unwrap();
            None
        }
        _ => {
            w.write(&Message::Resumed(Resumed { restore_us: 1 }), Codec::Raw)
                .unwrap();
            Some(Received {
                start,
                image,
                disk,
                state: state.expect("State before Complete"),
                rounds_seen,
            })
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Applies a page batch to `image` as a target does.
fn apply(image: &mut [u8], base: &[u8], p: &Pages, mem_pages: u64) {
    p.check(mem_pages).expect("a consistent batch");
    let mut data = p.data.chunks_exact(PAGE);
    for r in &p.runs {
        for i in 0..u64::from(r.count) {
            let at = ((r.first + i) as usize) * PAGE;
            match r.fill {
                Fill::Data => image[at..at + PAGE].copy_from_slice(data.next().unwrap()),
                Fill::Zero => image[at..at + PAGE].fill(0),
                Fill::Base => image[at..at + PAGE].copy_from_slice(&base[at..at + PAGE]),
                Fill::BaseAt(s) => {
                    let from = ((s + i) as usize) * PAGE;
                    image[at..at + PAGE].copy_from_slice(&base[from..from + PAGE]);
                }
                Fill::Copy(s) => {
                    let from = ((s + i) as usize) * PAGE;
                    image.copy_within(from..from + PAGE, at);
                }
            }
        }
    }
}

/// Writes what the receiver rebuilt as a snapshot directory `dir`.
fn write_snapshot(got: &Received, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(MEMORY), &got.image).unwrap();
    std::fs::write(dir.join(STATE), &got.state).unwrap();
    let blocks: Vec<(u64, Vec<u8>)> = got.disk.iter().map(|(n, d)| (*n, d.clone())).collect();
    vmm::snapshot::save::write_disk_delta(dir, got.start.disk_bytes, blocks).unwrap();
}

fn ask(c: &mut Client, req: &str) -> String {
    c.request(req)
        .unwrap_or_else(|e| panic!("{req}: {}", cloudlet_tests::error_chain(&e)))
}

fn requests(c: &mut Client) -> u64 {
    let r = ask(c, "stats");
    field(&r, "requests").unwrap().parse().unwrap()
}

/// The VM answers with all its state: the model, the overlay's and these `puts`, and a
/// request counter past `served`; `vmm status` says running. Returns the counter.
fn still_serves(c: &mut Client, puts: &[(u64, u64)], served: u64, sock: &str) -> u64 {
    for i in [0u64, 5, 524_287] {
        assert_eq!(ask(c, &format!("query {i}")), query_reply(i));
    }
    assert_eq!(ask(c, "get 7"), get_reply(7, 42));
    assert_eq!(ask(c, "get 8"), get_reply(8, table_value(8)));
    for &(i, v) in puts {
        assert_eq!(ask(c, &format!("get {i}")), get_reply(i, v));
    }
    let n = requests(c);
    assert!(
        n > served,
        "the request counter went on: {n} after {served}"
    );
    let status = vmm_status(sock, T);
    assert!(status.starts_with("running"), "{status}");
    n
}

#[test]
fn a_vm_without_a_base_is_refused() {
    let s = Scratch::new("handoff-nobase");
    let sock = s.path("vm.sock").display().to_string();
    let kernel = micro_guest();
    let mut vm = Vmm::spawn([
        "run",
        "--kernel",
        arg(&kernel),
        "--mem",
        "16",
        "--api-sock",
        &sock,
        "--serial",
        "null",
    ]);
    let deadline = std::time::Instant::now() + T;
    while !Path::new(&sock).exists() {
        assert!(std::time::Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let fin = handoff(&sock, "127.0.0.1:9".parse().unwrap(), 20);
    assert_eq!(fin.code(), 1, "{fin:?}");
    assert!(
        fin.stderr.contains("not synthesised from a base"),
        "{fin:?}"
    );
    assert!(vmm_status(&sock, T).starts_with("running"));
    let _ = run_vmm_stop(&sock);
    assert_eq!(vm.finish(T).code(), 0);
}

fn run_vmm_stop(sock: &str) -> Finished {
    cloudlet_tests::run_vmm(["stop", "--api-sock", sock], T)
}

/// Every failure leaves the VM serving here; then a handoff that completes: the source exits
/// with 0 and the rebuilt VM answers with everything the source had.
#[test]
fn failures_keep_the_vm_here_and_a_completed_handoff_moves_all_of_it() {
    let s = Scratch::new("handoff-e2e");
    let mut src = synthesise(&s);
    let mut c = Client::connect_when_up(src.addr, T, Duration::from_secs(3)).unwrap();
    let mut puts: Vec<(u64, u64)> = Vec::new();
    let mut served = requests(&mut c);
    for (k, mode) in [
        Mode::Refuse,
        Mode::CutBeforeAccept,
        Mode::CutInDelta,
        Mode::FailInDelta,
        Mode::CutInRounds,
        Mode::CutAfterComplete,
        Mode::FailAfterComplete,
    ]
    .into_iter()
    .enumerate()
    {
        let (to, rx) = receiver(mode);
        // A writer during the handoff (its own connection): disk blocks and RAM change
        // until the handoff has ended.
        let addr = src.addr;
        let first = 100 + 200 * k as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut w = Client::connect(addr, T).unwrap();
            let mut done = Vec::new();
            for j in 0..200 {
                if stop2.load(Ordering::Relaxed) && j >= 5 {
                    break;
                }
                let (i, v) = (first + j, 1000 * (k as u64 + 1) + j);
                assert_eq!(
                    ask(&mut w, &format!("put {i} {v}")),
                    format!("ok put i={i} value={v}")
                );
                done.push((i, v));
            }
            done
        });
        // With no downtime budget the source goes round after round while the writer runs.
        let budget = if mode == Mode::CutInRounds { 0 } else { 20 };
        // While the slow refusal is pending: the control socket and the guest serve, and a
        // second handoff is refused.
        let meanwhile = (mode == Mode::Refuse).then(|| {
            let (sock, addr) = (src.sock.clone(), src.addr);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                assert!(vmm_status(&sock, T).starts_with("running"));
                let second = handoff(&sock, "127.0.0.1:9".parse().unwrap(), 20);
                assert_eq!(second.code(), 1, "{second:?}");
                assert!(second.stderr.contains("already in progress"), "{second:?}");
                let mut c = Client::connect(addr, T).unwrap();
                assert_eq!(ask(&mut c, "get 7"), get_reply(7, 42));
            })
        });
        let fin = handoff(&src.sock, to, budget);
        if let Some(m) = meanwhile {
            m.join().unwrap();
        }
        assert_eq!(fin.code(), 1, "{mode:?}: the handoff fails: {fin:?}");
        let why = match mode {
            Mode::Refuse => "the target refused the handoff (Other): the test refuses",
            Mode::FailAfterComplete => "the target failed (Other): the test fails the restore",
            Mode::FailInDelta => "the target failed (Other): the test runs out of memory",
            _ => "the target closed the connection",
        };
        assert!(fin.stderr.contains(why), "{mode:?}: {fin:?}");
        assert!(rx.join().unwrap().is_none());
        stop.store(true, Ordering::Relaxed);
        puts.extend(writer.join().unwrap());
        served = still_serves(&mut c, &puts, served, &src.sock);
        eprintln!("{mode:?}: {}", fin.stderr.trim());
    }

    // The handoff that completes, with the writer still writing.
    let (to, rx) = receiver(Mode::Accept);
    let addr = src.addr;
    let writer = std::thread::spawn(move || {
        let mut w = Client::connect(addr, T).unwrap();
        let mut done = Vec::new();
        for j in 0..20 {
            let (i, v) = (3000 + j, 77_000 + j);
            match w.request(&format!("put {i} {v}")) {
                Ok(r) => {
                    assert_eq!(r, format!("ok put i={i} value={v}"));
                    done.push((i, v));
                }
                // The source stopped: the rest goes to the target.
                Err(_) => break,
            }
        }
        done
    });
    let served_before = requests(&mut c);
    let fin = handoff(&src.sock, to, 20);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(fin.stdout[0].starts_with("handed off:"), "{fin:?}");
    let got = rx.join().unwrap().expect("the receiver rebuilt the VM");
    puts.extend(writer.join().unwrap());
    let exit = src.vmm.finish(T);
    assert_eq!(
        exit.code(),
        0,
        "the source vmm exits with 0 once handed off: {exit:?}"
    );
    eprintln!(
        "{}; rounds after the δ seen: {}",
        fin.stdout[0], got.rounds_seen
    );

    // The supervisor saw every handoff's progress, each failure, then the last one done and
    // the exit with 0.
    let reports = all_reports(&mut src.reports);
    assert!(
        matches!(reports.first(), Some(Report::Ready(_))),
        "{reports:?}"
    );
    let phases: Vec<HandoffPhase> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Handoff(p) => Some(p.phase),
            _ => None,
        })
        .collect();
    let failed = phases
        .iter()
        .filter(|p| **p == HandoffPhase::Failed)
        .count();
    assert_eq!(failed, 7, "one Failed per failed handoff: {phases:?}");
    let last: Vec<HandoffPhase> = phases
        .iter()
        .rev()
        .take_while(|p| **p != HandoffPhase::Failed)
        .copied()
        .collect();
    for want in [
        HandoffPhase::Connecting,
        HandoffPhase::Delta,
        HandoffPhase::Rounds,
        HandoffPhase::Paused,
        HandoffPhase::Done,
    ] {
        assert!(last.contains(&want), "{want:?} missing in {last:?}");
    }
    assert_eq!(last.first(), Some(&HandoffPhase::Done), "{last:?}");
    assert_eq!(
        reports.last(),
        Some(&Report::Exited { code: 0 }),
        "{reports:?}"
    );

    // The rebuilt VM runs and has everything.
    let snap = s.path("rebuilt");
    write_snapshot(&got, &snap);
    let port = free_port();
    let target = Vmm::spawn([
        "restore",
        "--snapshot",
        arg(&snap),
        "--serial",
        "null",
        "--forward",
        &format!("127.0.0.1:{port}={GUEST_SERVICE}"),
    ]);
    let mut t = Client::connect_when_up(
        SocketAddr::from(([127, 0, 0, 1], port)),
        T,
        Duration::from_secs(3),
    )
    .unwrap();
    for i in [0u64, 5, 77, 524_287] {
        assert_eq!(ask(&mut t, &format!("query {i}")), query_reply(i));
    }
    assert_eq!(ask(&mut t, "get 7"), get_reply(7, 42));
    assert_eq!(ask(&mut t, "get 4999"), get_reply(4999, table_value(4999)));
    for &(i, v) in &puts {
        assert_eq!(
            ask(&mut t, &format!("get {i}")),
            get_reply(i, v),
            "entry {i}"
        );
    }
    let n = requests(&mut t);
    assert!(
        n >= served_before + 2,
        "the RAM counter moved with the VM: {n} after {served_before} on the source"
    );
    drop(t);
    drop(target);
}
