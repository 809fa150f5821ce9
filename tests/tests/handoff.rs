//! `vmm receive`, the target of a handoff, fed by a test sender written here with
//! `format::handoff` (not the product's sender): a customised service VM (synthesised, then
//! changed over its network service, then snapshotted) is streamed as its RAM δ against the
//! base, its disk δ and its state, and the received VM answers with all of it. Then every way
//! a handoff can go wrong — a foreign base, a wrong token, another stream version, a stream
//! cut short, a flipped bit, a replayed frame, the source abandoning, a stalled or absent
//! source — ends the receiver with a clear error, no process and no file left.

use cloudlet_tests::Shared;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_tests::{
    arg, error_chain, make_base, make_overlay, run_vmm, vmm_snapshot, Ask, Finished, Scratch, Vmm,
};
use format::base::{Manifest, MEMORY, STATE};
use format::control::{read_frame, Report};
use format::handoff::{
    encode_frame, Codec, Complete, Fill, FrameReader, Message, PageRun, Pages, Preamble, Refusal,
    RefuseKind, Start, DISK_BLOCK, PREAMBLE_LEN,
};
use micro_service::client::Client;
use micro_service::oracle::{get_reply, query_reply, table_image, table_value};

/// Timeout for anything a VM or a build does on a loaded 2-core host.
const T: Duration = Duration::from_secs(60);
/// How soon a refused or broken handoff must have ended its receiver.
const QUICK: Duration = Duration::from_secs(10);
/// The guest's service on the user-mode network.
const GUEST_SERVICE: &str = "10.0.2.15:80";
/// The session token the tests' "agent" issues.
const TOKEN: [u8; 32] = [0x5a; 32];
const PAGE: usize = format::PAGE_SIZE;
/// Pages per `Pages` batch of the test sender (small: the stream has many frames).
const BATCH_PAGES: u64 = 64;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A host TCP port that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// What the test sender streams: the customised VM as the δ against its base.
struct Stream {
    start: Start,
    batches: Vec<Pages>,
    disk: Vec<(u64, Vec<u8>)>,
    state: Vec<u8>,
}

/// The shared images: a service base (disk table + NIC), a second base, and the stream of a
/// VM customised from the first.
struct Images {
    base: PathBuf,
    base_id: [u8; 32],
    other_base: PathBuf,
    stream: Stream,
}

fn images() -> &'static Images {
    static IMAGES: Shared<Images> = Shared::new("handoff");
    IMAGES.get(|dir| {
        let table = dir.write("table.img", &table_image(5000, 1 << 20));
        let base = make_base(&dir.path("base"), "64", &["--disk", arg(&table), "--net"]);
        // A second base: another command line gives another content id.
        let other_base = make_base(
            &dir.path("other-base"),
            "64",
            &[
                "--disk",
                arg(&table),
                "--net",
                "--cmdline",
                "console=ttyS0 other",
            ],
        );
        let overlay = dir.path("app.overlay");
        make_overlay(&base, "put:7:42,load:2", &overlay, &[]);
        let snap = customise(dir, &base, &overlay);
        let base_id = Manifest::load(&base).unwrap().id_bytes();
        let stream = stream_of(&base, &snap);
        Images {
            base,
            base_id,
            other_base,
            stream,
        }
    })
}

/// Synthesises a VM from `overlay`, changes its disk table over its network service, and
/// snapshots it (the VM is then stopped): the customised VM a handoff moves.
fn customise(dir: &Scratch, base: &Path, overlay: &Path) -> PathBuf {
    let port = free_port();
    let sock = dir.path("source.sock");
    let mut vm = Vmm::spawn([
        "synthesize",
        "--base",
        arg(base),
        "--overlay",
        arg(overlay),
        "--forward",
        &format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        "--api-sock",
        arg(&sock),
        "--no-stdin",
    ]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c = Client::connect_when_up(addr, T, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the source VM's service: {}", error_chain(&e)));
    assert_eq!(c.ask("put 4000 9"), "ok put i=4000 value=9");
    assert_eq!(c.ask("get 7"), get_reply(7, 42));
    drop(c);
    let snap = dir.path("snap");
    vmm_snapshot(arg(&sock), &snap, true, T);
    let stop = run_vmm(["stop", "--api-sock", arg(&sock)], T);
    assert_eq!(stop.code(), 0, "{stop:?}");
    assert_eq!(vm.finish(T).code(), 0);
    snap
}

/// The snapshot `snap` of a VM made from `base` as a handoff stream: pages that differ from
/// the base's (zero pages as `Zero`, a page equal to one sent before as `Copy`, the rest as
/// `Data`), one page first written wrong then set back with `Base`, each disk block first
/// sent wrong then right (the later one wins), and the state.
fn stream_of(base: &Path, snap: &Path) -> Stream {
    let m = Manifest::load(base).unwrap();
    let base_mem = std::fs::read(base.join(MEMORY)).unwrap();
    let snap_mem = std::fs::read(snap.join(MEMORY)).unwrap();
    assert_eq!(base_mem.len(), snap_mem.len());
    let pages = (base_mem.len() / PAGE) as u64;
    let page = |mem: &[u8], i: u64| mem[i as usize * PAGE..(i as usize + 1) * PAGE].to_vec();
    let mut batches = Vec::new();
    let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut cur = Pages {
        runs: Vec::new(),
        data: Vec::new(),
    };
    let mut in_batch = 0;
    // A page the VM did not change, first sent as garbage, restored from the base below.
    let unchanged = (0..pages)
        .find(|&i| page(&base_mem, i) == page(&snap_mem, i) && base_mem[i as usize * PAGE] != 0)
        .expect("some non-zero page is unchanged");
    cur.runs.push(PageRun::new(unchanged, 1, Fill::Data));
    cur.data.extend(std::iter::repeat_n(0xee, PAGE));
    batches.push(std::mem::replace(
        &mut cur,
        Pages {
            runs: Vec::new(),
            data: Vec::new(),
        },
    ));
    for i in 0..pages {
        let p = page(&snap_mem, i);
        if p == page(&base_mem, i) {
            continue;
        }
        let fill = if p.iter().all(|&b| b == 0) {
            Fill::Zero
        } else if let Some(&src) = seen.get(&p) {
            Fill::Copy(src)
        } else {
            seen.insert(p.clone(), i);
            cur.data.extend_from_slice(&p);
            Fill::Data
        };
        match cur.runs.last_mut() {
            // Copy runs are kept to one page: their sources need not be consecutive.
            Some(r)
                if r.first + u64::from(r.count) == i
                    && r.fill == fill
                    && !matches!(fill, Fill::Copy(_)) =>
            {
                r.count += 1
            }
            _ => cur.runs.push(PageRun::new(i, 1, fill)),
        }
        in_batch += 1;
        if in_batch == BATCH_PAGES {
            batches.push(std::mem::replace(
                &mut cur,
                Pages {
                    runs: Vec::new(),
                    data: Vec::new(),
                },
            ));
            in_batch = 0;
        }
    }
    cur.runs.push(PageRun::new(unchanged, 1, Fill::Base));
    batches.push(cur);
    assert!(
        batches.len() > 4,
        "the δ makes several batches: {}",
        batches.len()
    );
    let state = vmm::snapshot::read_state(snap).unwrap();
    let blocks = vmm::snapshot::read_disk_delta(snap, &state).unwrap();
    assert!(!blocks.is_empty(), "the VM wrote its disk");
    let mut disk: Vec<(u64, Vec<u8>)> = blocks
        .iter()
        .map(|(n, _)| (*n, vec![0xdd; DISK_BLOCK]))
        .collect();
    disk.extend(blocks);
    Stream {
        start: Start {
            mem_mib: m.mem_mib,
            vcpus: state.vcpus.len() as u32,
            disk_bytes: m.disk_bytes.unwrap(),
        },
        batches,
        disk,
        state: std::fs::read(snap.join(STATE)).unwrap(),
    }
}

/// The test sender: raw frames on one connection, its own sequence numbers.
struct Sender {
    conn: TcpStream,
    answers: FrameReader<TcpStream>,
    seq: u32,
}

impl Sender {
    fn connect(addr: SocketAddr) -> Sender {
        let conn = TcpStream::connect_timeout(&addr, T).expect("connect to the receiver");
        conn.set_read_timeout(Some(T)).unwrap();
        conn.set_write_timeout(Some(T)).unwrap();
        Sender {
            answers: FrameReader::new(conn.try_clone().unwrap()),
            conn,
            seq: 0,
        }
    }

    fn raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_all(bytes)
    }

    fn preamble(&mut self, base_id: [u8; 32], token: [u8; 32]) {
        self.raw(&Preamble { base_id, token }.emit()).unwrap();
    }

    /// The next frame's bytes (its sequence number taken).
    fn frame(&mut self, msg: &Message) -> Vec<u8> {
        let f = encode_frame(self.seq, msg, Codec::Zstd(1)).unwrap();
        self.seq += 1;
        f
    }

    fn send(&mut self, msg: &Message) {
        let f = self.frame(msg);
        self.raw(&f).unwrap();
    }

    /// The receiver's next answer.
    fn answer(&mut self) -> Message {
        self.answers.read().expect("an answer from the receiver")
    }

    /// The receiver's next answer, which must be `Refuse`.
    fn refusal(&mut self) -> Refusal {
        match self.answer() {
            Message::Refuse(f) => f,
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    /// The receiver's next answer, which must be `Failed`.
    fn failure(&mut self) -> Refusal {
        match self.answer() {
            Message::Failed(f) => f,
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// Preamble and Start of `images()`'s stream; the receiver must accept.
    fn accepted(addr: SocketAddr) -> Sender {
        let img = images();
        let mut s = Sender::connect(addr);
        s.preamble(img.base_id, TOKEN);
        s.send(&Message::Start(img.stream.start.clone()));
        assert_eq!(s.answer(), Message::Accept);
        s
    }

    /// Every frame after Start, in order.
    fn rest_of_stream(&self) -> Vec<Message> {
        let st = &images().stream;
        let mut out: Vec<Message> = st.batches.iter().cloned().map(Message::Pages).collect();
        out.extend(st.disk.chunks(3).map(|c| Message::Disk(c.to_vec())));
        out.push(Message::State(st.state.clone()));
        out.push(Message::Complete(Complete {
            page_batches: st.batches.len() as u64,
            disk_blocks: st.disk.len() as u64,
        }));
        out
    }
}

/// A `vmm receive` with its report channel.
struct Receiver {
    vm: Vmm,
    report: UnixStream,
    /// Where it listens (from `Listening`).
    addr: SocketAddr,
    sock: PathBuf,
    delta: PathBuf,
}

/// Starts `vmm receive --base base` with the token `token` in its environment (none: no
/// token), `--api-sock` and `--disk-delta` in `s`, and `extra` options; waits for
/// `Listening`.
fn receiver(s: &Scratch, base: &Path, token: Option<[u8; 32]>, extra: &[&str]) -> Receiver {
    let (mut report, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let (sock, delta) = (s.path("vm.sock"), s.path("disk.delta"));
    let mut cmd = Command::new(cloudlet_tests::vmm_bin());
    cmd.args(["receive", "--base", arg(base), "--listen", "127.0.0.1:0"])
        .args(["--api-sock", arg(&sock), "--disk-delta", arg(&delta)])
        .args(["--report-fd", &fd.to_string(), "--no-stdin"])
        .args(extra)
        .env_remove("VMM_HANDOFF_TOKEN");
    if let Some(t) = token {
        cmd.env("VMM_HANDOFF_TOKEN", hex(&t));
    }
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
    let mut vm = Vmm::spawn_cmd(&mut cmd);
    drop(theirs);
    report.set_read_timeout(Some(T)).unwrap();
    let addr = match read_frame::<Report>(&mut report) {
        Ok(Ok(Report::Listening { addr })) => addr,
        other => {
            let fin = vm.finish(QUICK);
            panic!("expected Listening, got {other:?}; {fin:?}")
        }
    };
    assert_ne!(addr.port(), 0, "the bound port is reported");
    Receiver {
        vm,
        report,
        addr,
        sock,
        delta,
    }
}

/// A `vmm receive` of `images()`'s base expecting [`TOKEN`], its files in a new scratch
/// directory `name`, with `extra` options.
fn receiving(name: &str, extra: &[&str]) -> (Scratch, Receiver) {
    let s = Scratch::new(name);
    let r = receiver(&s, &images().base, Some(TOKEN), extra);
    (s, r)
}

/// [`receiving`], and a sender it accepted.
fn accepted(name: &str, extra: &[&str]) -> (Scratch, Receiver, Sender) {
    let (s, r) = receiving(name, extra);
    let src = Sender::accepted(r.addr);
    (s, r, src)
}

/// The preamble of `images()`'s base with [`TOKEN`].
fn our_preamble() -> [u8; PREAMBLE_LEN] {
    Preamble {
        base_id: images().base_id,
        token: TOKEN,
    }
    .emit()
}

impl Receiver {
    /// The receiver must fail: `Failed` on its report channel with `needle` in its chain,
    /// exit status 1 within [`QUICK`], `needle` on stderr, no file left, its port closed.
    fn fails_with(mut self, needle: &str) -> Finished {
        let t0 = Instant::now();
        let failed = match read_frame::<Report>(&mut self.report) {
            Ok(Ok(Report::Failed(f))) => f,
            other => panic!("expected Failed, got {other:?}"),
        };
        let fin = self.vm.finish(QUICK);
        assert!(t0.elapsed() < QUICK);
        assert_eq!(fin.code(), 1, "{fin:?}");
        let chain = failed.chain.join(": ");
        assert!(chain.contains(needle), "expected {needle:?} in {chain:?}");
        assert!(
            fin.stderr.contains(needle),
            "expected {needle:?} in {}",
            fin.stderr
        );
        assert!(!fin.stderr.contains("panicked"), "{}", fin.stderr);
        assert!(!self.sock.exists(), "no control socket is left");
        assert!(!self.delta.exists(), "no disk δ file is left");
        let mut rest = Vec::new();
        self.report.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "end of file after Failed: {rest:?}");
        assert!(
            TcpStream::connect(self.addr).is_err(),
            "the handoff port is closed"
        );
        fin
    }
}

#[test]
fn a_streamed_vm_resumes_with_its_memory_and_disk_and_serves() {
    let fwd = format!("127.0.0.1:0={GUEST_SERVICE}");
    let (_s, mut r, mut src) = accepted("handoff-ok", &["--forward", &fwd, "-v"]);
    // One connection only: the listener closed once the source was accepted.
    assert!(
        TcpStream::connect(r.addr).is_err(),
        "a second connection is refused"
    );
    assert!(
        !r.delta.exists(),
        "nothing is created before the VM is restored"
    );
    for m in src.rest_of_stream() {
        src.send(&m);
    }
    let restore_us = match src.answer() {
        Message::Resumed(r) => r.restore_us,
        other => panic!("expected Resumed, got {other:?}"),
    };
    assert!(restore_us > 0 && restore_us < 5_000_000, "{restore_us} µs");
    // The source lets go of its VM: the target keeps it and says Ready.
    drop(src);
    let ready = match read_frame::<Report>(&mut r.report).unwrap().unwrap() {
        Report::Ready(ready) => ready,
        other => panic!("expected Ready, got {other:?}"),
    };
    assert_eq!(ready.forwards.len(), 1, "{ready:?}");
    let host = ready.forwards[0].host;
    let mut c = Client::connect_when_up(host, T, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("the received VM's service: {}", error_chain(&e)));
    // The overlay's disk write, the source VM's disk write, the base's table, the model the
    // overlay loaded (2 MiB: 262144 entries).
    assert_eq!(c.ask("get 7"), get_reply(7, 42));
    assert_eq!(c.ask("get 4000"), get_reply(4000, 9));
    assert_eq!(c.ask("get 8"), get_reply(8, table_value(8)));
    assert_eq!(c.ask("get 4999"), get_reply(4999, table_value(4999)));
    for i in [0u64, 5, 131_072, 262_143] {
        assert_eq!(c.ask(&format!("query {i}")), query_reply(i));
    }
    assert!(
        c.ask("query 262144").starts_with("err"),
        "the model is 2 MiB"
    );
    // It keeps working: a disk write on the target.
    assert_eq!(c.ask("put 9 99"), "ok put i=9 value=99");
    assert_eq!(c.ask("get 9"), get_reply(9, 99));
    drop(c);
    assert!(r.delta.exists(), "the disk δ lives in --disk-delta");
    let stop = run_vmm(["stop", "--api-sock", arg(&r.sock)], T);
    assert_eq!(stop.code(), 0, "{stop:?}");
    assert_eq!(
        read_frame::<Report>(&mut r.report).unwrap().unwrap(),
        Report::Exited { code: 0 }
    );
    let fin = r.vm.finish(T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(
        fin.stderr.contains("listening for a handoff on")
            && fin.stderr.contains("received a handoff"),
        "-v tells where it listened and what it received: {}",
        fin.stderr
    );
}

#[test]
fn the_token_is_required_and_never_on_the_command_line() {
    let img = images();
    let s = Scratch::new("handoff-notoken");
    let fin = run_vmm(
        [
            "receive",
            "--base",
            arg(&img.base),
            "--listen",
            "127.0.0.1:0",
            "--timeout-ms",
            "100",
        ],
        QUICK,
    );
    assert_eq!(fin.code(), 1, "{fin:?}");
    assert!(
        fin.stderr.contains("VMM_HANDOFF_TOKEN is not set"),
        "{}",
        fin.stderr
    );
    let help = run_vmm(["receive", "--help"], QUICK);
    assert_eq!(help.code(), 0);
    let text = help.stdout.join("\n");
    assert!(text.contains("VMM_HANDOFF_TOKEN"), "{text}");
    assert!(!text.contains("--token"), "{text}");
    drop(s);
}

#[test]
fn a_foreign_base_is_refused() {
    let img = images();
    let s = Scratch::new("handoff-foreign");
    let r = receiver(&s, &img.other_base, Some(TOKEN), &[]);
    let mut src = Sender::connect(r.addr);
    src.preamble(img.base_id, TOKEN);
    let f = src.refusal();
    assert_eq!(f.kind, RefuseKind::ForeignBase, "{f:?}");
    assert!(f.reason.contains(&hex(&img.base_id)[..12]), "{f:?}");
    r.fails_with("is not the base at");
}

#[test]
fn a_wrong_token_is_refused() {
    let (_s, r) = receiving("handoff-token", &[]);
    let mut src = Sender::connect(r.addr);
    let mut wrong = TOKEN;
    wrong[31] ^= 1;
    src.preamble(images().base_id, wrong);
    let f = src.refusal();
    assert_eq!(f.kind, RefuseKind::Token, "{f:?}");
    r.fails_with("session token");
}

#[test]
fn another_stream_version_is_refused() {
    let (_s, r) = receiving("handoff-version", &[]);
    let mut src = Sender::connect(r.addr);
    let mut p = our_preamble();
    p[8] = 2;
    assert_eq!(p.len(), PREAMBLE_LEN);
    src.raw(&p).unwrap();
    src.refusal();
    r.fails_with("version 2 is not supported");
}

#[test]
fn a_vm_of_another_shape_is_refused() {
    let (_s, r) = receiving("handoff-shape", &[]);
    let mut src = Sender::connect(r.addr);
    src.raw(&our_preamble()).unwrap();
    let mut start = images().stream.start.clone();
    start.mem_mib *= 2;
    src.send(&Message::Start(start));
    let f = src.refusal();
    assert_eq!(f.kind, RefuseKind::Shape, "{f:?}");
    r.fails_with("MiB of RAM");
}

/// The stream cut after `frames` frames (and, with `half`, half of the next): the receiver
/// ends, no VM runs and nothing is left.
fn cut_after(name: &str, frames: usize, half: bool) {
    let (_s, r, mut src) = accepted(name, &[]);
    let rest = src.rest_of_stream();
    for m in &rest[..frames] {
        src.send(m);
    }
    if half {
        let f = src.frame(&rest[frames]);
        src.raw(&f[..f.len() / 2]).unwrap();
    }
    drop(src);
    r.fails_with("handoff connection I/O failed");
}

#[test]
fn a_truncated_stream_leaves_nothing() {
    // Before the first byte, and inside the preamble.
    for (name, bytes) in [("handoff-cut-0", 0), ("handoff-cut-pre", PREAMBLE_LEN / 2)] {
        let (_s, r) = receiving(name, &[]);
        let mut src = Sender::connect(r.addr);
        src.raw(&our_preamble()[..bytes]).unwrap();
        drop(src);
        r.fails_with("handoff connection I/O failed");
    }
    cut_after("handoff-cut-delta", 2, false);
    cut_after("handoff-cut-frame", 3, true);
    // Everything but Complete.
    let all = Sender::accepted_len();
    cut_after("handoff-cut-end", all - 1, false);
}

impl Sender {
    /// Frames after Start in the whole stream.
    fn accepted_len() -> usize {
        let st = &images().stream;
        st.batches.len() + st.disk.chunks(3).len() + 2
    }
}

#[test]
fn a_corrupted_frame_is_refused() {
    let (_s, r, mut src) = accepted("handoff-flip", &[]);
    let rest = src.rest_of_stream();
    src.send(&rest[0]);
    let mut f = src.frame(&rest[1]);
    let n = f.len();
    f[n / 2] ^= 0x04;
    src.raw(&f).unwrap();
    let f = src.failure();
    assert!(f.reason.contains("checksum"), "{f:?}");
    r.fails_with("checksum mismatch");
}

#[test]
fn a_replayed_frame_is_refused() {
    let (_s, r, mut src) = accepted("handoff-replay", &[]);
    let rest = src.rest_of_stream();
    let f = src.frame(&rest[0]);
    src.raw(&f).unwrap();
    src.raw(&f).unwrap();
    src.failure();
    r.fails_with("arrived where frame 2 was due");
}

#[test]
fn totals_that_disagree_are_refused() {
    let (_s, r, mut src) = accepted("handoff-totals", &[]);
    let mut rest = src.rest_of_stream();
    // One batch dropped on the way (its sequence number skipped cleanly).
    rest.remove(1);
    for m in &rest {
        src.send(m);
    }
    src.failure();
    r.fails_with("page batches");
}

#[test]
fn an_abandoned_handoff_leaves_nothing() {
    let (_s, r, mut src) = accepted("handoff-abandon", &[]);
    let rest = src.rest_of_stream();
    for m in &rest[..3] {
        src.send(m);
    }
    src.send(&Message::Abandon("the user walked back".into()));
    r.fails_with("the source abandoned the handoff: the user walked back");
}

#[test]
fn a_stalled_or_absent_source_times_out() {
    let (_s, r, mut src) = accepted("handoff-stall", &["--timeout-ms", "1500"]);
    let first = src.rest_of_stream().remove(0);
    src.send(&first);
    r.fails_with("the source sent nothing for 1500 ms");
    drop(src);
    let (_s, r) = receiving("handoff-absent", &["--timeout-ms", "1500"]);
    r.fails_with("no source connected within 1500 ms");
}

/// The restore itself fails after a complete stream (the forward's host port is taken): the
/// source is told, the disk δ file the restore had created is removed, no VM runs.
#[test]
fn a_failed_restore_tells_the_source_and_leaves_nothing() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let fwd = format!("{}={GUEST_SERVICE}", taken.local_addr().unwrap());
    let (_s, r, mut src) = accepted("handoff-restore-fails", &["--forward", &fwd]);
    for m in src.rest_of_stream() {
        src.send(&m);
    }
    let f = src.failure();
    assert!(f.reason.contains("already in use"), "{f:?}");
    r.fails_with("failed to restore the handed-off VM");
}

/// The target resumed the VM and said so, but the source did not take it as done (it sends
/// Abandon: `Resumed` came too late), or never closes: the VM stops here, nothing is left.
#[test]
fn a_vm_the_source_does_not_release_is_stopped_here() {
    for (name, abandon) in [("handoff-kept", true), ("handoff-held", false)] {
        let (_s, r, mut src) = accepted(name, &["--timeout-ms", "1500"]);
        for m in src.rest_of_stream() {
            src.send(&m);
        }
        assert!(matches!(src.answer(), Message::Resumed(_)));
        if abandon {
            src.send(&Message::Abandon("no Resumed within the deadline".into()));
            r.fails_with("the source kept it");
        } else {
            r.fails_with("did not release the VM within 1500 ms");
        }
    }
}
