//! The micro guest's virtio devices end to end: its TCP service reached from the host through
//! the VMM's user-mode network (`--forward`) and through a TAP device in a network namespace
//! the test creates, its disk table read and written through virtio-blk over a copy-on-write
//! δ (in a file, read-only, carried in a snapshot), whole disk ranges read with `scan` in
//! requests of 4 to 64 KiB, with every answer checked against values computed here.
//!
//! The wire protocol (docs/micro-guest.md, rootfs/service/src/frame.rs) is implemented here
//! independently: a `u32` little-endian length, then that many bytes of UTF-8, both ways.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_tests::{file_digest, micro_guest, run_vmm, Scratch, Vmm};
use vmm::snapshot::DISK_DELTA_FILE;

/// Timeout for anything a VM does (boot, exit, a reply) on a loaded 2-core host.
const T: Duration = Duration::from_secs(30);
/// The guest's service address on the user-mode network.
const GUEST_SERVICE: &str = "10.0.2.15:80";

// ---------------------------------------------------------------------------------------
// Reference values, computed independently of the guest.

/// Number of primes ≤ `n` (sieve of Eratosthenes).
fn prime_count(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let mut composite = vec![false; n + 1];
    let mut count = 0;
    for i in 2..=n {
        if !composite[i] {
            count += 1;
            let mut j = i * i;
            while j <= n {
                composite[j] = true;
                j += i;
            }
        }
    }
    count
}

/// The value this file's table images hold in entry `i` (the same as
/// `microclient.py mkdisk`).
fn table_value(i: u64) -> u64 {
    (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A disk image of `size` bytes holding a table of `entries` entries (format of
/// rootfs/service/src/table.rs): sector 0 = `CLDTABLE`, u32 version 1, u32 0, u64 count;
/// entry `i` is a little-endian u64 at byte 512 + 8 i.
fn table_image(entries: u64, size: usize) -> Vec<u8> {
    let mut img = vec![0u8; size];
    img[..8].copy_from_slice(b"CLDTABLE");
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[16..24].copy_from_slice(&entries.to_le_bytes());
    for i in 0..entries {
        let at = 512 + 8 * i as usize;
        img[at..at + 8].copy_from_slice(&table_value(i).to_le_bytes());
    }
    img
}

// ---------------------------------------------------------------------------------------
// The client side of the protocol.

/// One connection to the guest's service.
struct Conn(TcpStream);

impl Conn {
    /// Connects to `addr` with generous timeouts on every read and write.
    fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(T))?;
        s.set_write_timeout(Some(T))?;
        s.set_nodelay(true)?;
        Ok(Conn(s))
    }

    /// Sends one request frame.
    fn send(&mut self, text: &str) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(4 + text.len());
        frame.extend_from_slice(&(text.len() as u32).to_le_bytes());
        frame.extend_from_slice(text.as_bytes());
        self.0.write_all(&frame)
    }

    /// Reads one reply frame.
    fn recv(&mut self) -> std::io::Result<String> {
        let mut head = [0u8; 4];
        self.0.read_exact(&mut head)?;
        let len = u32::from_le_bytes(head) as usize;
        if len > 64 * 1024 {
            return Err(std::io::Error::other(format!(
                "reply announces {len} bytes, far beyond the protocol's limit"
            )));
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body)?;
        String::from_utf8(body).map_err(std::io::Error::other)
    }

    /// One request and its reply.
    fn try_request(&mut self, text: &str) -> std::io::Result<String> {
        self.send(text)?;
        self.recv()
    }

    /// One request and its reply; panics (saying which request) on a transport error.
    fn request(&mut self, text: &str) -> String {
        self.try_request(text)
            .unwrap_or_else(|e| panic!("request {text:?} failed: {e}"))
    }
}

/// How long one attempt of [`connect_when_up`] waits for `health` before trying a new
/// connection (a reply takes well under a millisecond; this allows for a loaded host).
const ATTEMPT: Duration = Duration::from_secs(3);

/// Connects to the service at `addr` once it answers `health`, retrying with a new
/// connection (the forward or the guest's stack may not be up yet) until `T` has passed.
fn connect_when_up(addr: SocketAddr) -> Conn {
    let deadline = Instant::now() + T;
    loop {
        let attempt = Conn::open(addr).and_then(|mut c| {
            c.0.set_read_timeout(Some(ATTEMPT))?;
            let r = c.try_request("health")?;
            c.0.set_read_timeout(Some(T))?;
            Ok((c, r))
        });
        let last_err = match attempt {
            Ok((c, r)) if r == "ok health" => return c,
            Ok((_, r)) => panic!("the service at {addr} answered `health` with {r:?}"),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "the guest service at {addr} did not answer `health` within {T:?} (last error: {last_err})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A host TCP port that was free a moment ago (bound, read, released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
}

/// The value of `key=` in a reply.
fn field<'a>(reply: &'a str, key: &str) -> Option<&'a str> {
    reply
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The expected reply to `primes n`, checked field by field (the compute time varies).
fn check_primes(reply: &str, n: usize) {
    assert!(
        reply.starts_with("ok primes "),
        "`primes {n}` answered {reply:?}"
    );
    let want = prime_count(n).to_string();
    assert_eq!(
        field(reply, "N"),
        Some(n.to_string().as_str()),
        "N in {reply:?}"
    );
    assert_eq!(
        field(reply, "count"),
        Some(want.as_str()),
        "π({n}) is {want}; the guest said {reply:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Guests.

/// A micro guest under `vmm run` with a forwarded service port.
struct Guest {
    vmm: Vmm,
    addr: SocketAddr,
}

impl Guest {
    /// Boots the micro guest with `extra` arguments and `--forward` from a free host port to
    /// the service; waits for the banner.
    fn boot(extra: &[&str]) -> Guest {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            micro_guest().display().to_string(),
            "--mem".into(),
            "64".into(),
            "--forward".into(),
            format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Guest::spawn(args, port, true)
    }

    /// Starts `vmm` with `args` (which forward host `port`); waits for the banner if asked.
    fn spawn(args: Vec<String>, port: u16, banner: bool) -> Guest {
        let mut vmm = Vmm::spawn(&args);
        if banner {
            vmm.expect_line(T, |l| l.starts_with("micro-guest "));
        }
        Guest {
            vmm,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// A connection to the service, once it answers.
    fn conn(&self) -> Conn {
        connect_when_up(self.addr)
    }

    /// Powers the guest off through its serial console and checks the VMM exits with 0.
    fn poweroff(mut self) {
        self.vmm.send("poweroff 0\n");
        let fin = self.vmm.finish(T);
        assert_eq!(fin.code(), 0, "the guest powers off with code 0: {fin:?}");
    }
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------
// User-mode network.

#[test]
fn forwarded_port_serves_verified_replies() {
    let g = Guest::boot(&[]);
    let mut c = g.conn();
    assert_eq!(c.request("health"), "ok health");
    assert_eq!(c.request("echo hello host"), "ok echo hello host");
    for n in [10usize, 1000, 65_537, 1_000_000] {
        check_primes(&c.request(&format!("primes {n}")), n);
    }
    let reply = c.request("primes 1000000");
    assert_eq!(
        field(&reply, "count"),
        Some("78498"),
        "π(10^6) = 78498: {reply:?}"
    );
    let net = c.request("net");
    assert_eq!(
        field(&net, "ip"),
        Some("10.0.2.15/24"),
        "the guest's default address on the user-mode network: {net:?}"
    );
    assert!(
        c.request("frobnicate").starts_with("err unknown command"),
        "an unknown command is an error reply"
    );
    // The largest request the protocol allows comes back whole.
    let big = "b".repeat(1024 - "echo ".len());
    assert_eq!(c.request(&format!("echo {big}")), format!("ok echo {big}"));
    // A longer one is refused and the connection ends; the service goes on.
    let reply = c.request(&format!("echo {big}x"));
    assert!(
        reply.starts_with("err request too long"),
        "a request over 1024 bytes is refused: {reply:?}"
    );
    let mut c = g.conn();
    let stats = c.request("stats");
    assert!(
        field(&stats, "requests").is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n >= 10)),
        "stats counts the requests served: {stats:?}"
    );
    drop(c);
    g.poweroff();
}

#[test]
fn hundred_sequential_connections_all_answer() {
    let g = Guest::boot(&[]);
    drop(g.conn());
    for i in 0..100 {
        let mut c = Conn::open(g.addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let reply = c
            .try_request(&format!("echo seq {i}"))
            .unwrap_or_else(|e| panic!("connection {i} of 100 got no reply: {e}"));
        assert_eq!(reply, format!("ok echo seq {i}"), "connection {i}");
    }
    g.poweroff();
}

#[test]
fn sixteen_concurrent_connections_all_answer() {
    let g = Guest::boot(&[]);
    drop(g.conn());
    let addr = g.addr;
    let threads: Vec<_> = (0..16)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Conn::open(addr).unwrap_or_else(|e| panic!("client {t}: {e}"));
                for k in 0..20 {
                    let text = format!("echo client {t} request {k}");
                    let reply = c
                        .try_request(&text)
                        .unwrap_or_else(|e| panic!("client {t}, request {k}: {e}"));
                    assert_eq!(reply, format!("ok {text}"), "client {t}, request {k}");
                }
                let n = 1000 + 37 * t;
                let reply = c.request(&format!("primes {n}"));
                check_primes(&reply, n);
            })
        })
        .collect();
    for h in threads {
        if let Err(e) = h.join() {
            std::panic::resume_unwind(e);
        }
    }
    g.poweroff();
}

// ---------------------------------------------------------------------------------------
// Disk.

/// Entries in the test table (2 MiB disk: 4095 data sectors × 64 = 262 080 entries at most).
const ENTRIES: u64 = 200_000;
/// The test disk's size.
const DISK_BYTES: usize = 2 << 20;
/// Entries checked: both ends, sector and 4 KiB-block edges, the middle.
const PROBES: [u64; 8] = [0, 1, 63, 64, 511, 512, 100_003, ENTRIES - 1];

/// Checks `get i` for every probe against the image's values, except `changed` entries.
fn check_table(c: &mut Conn, changed: &[(u64, u64)]) {
    for i in PROBES
        .iter()
        .copied()
        .chain(changed.iter().map(|&(i, _)| i))
    {
        let want = changed
            .iter()
            .find(|&&(j, _)| j == i)
            .map_or(table_value(i), |&(_, v)| v);
        assert_eq!(
            c.request(&format!("get {i}")),
            format!("ok get i={i} value={want}"),
            "entry {i} of the table"
        );
    }
}

#[test]
fn disk_get_reads_the_table_and_put_lands_in_the_delta_file() {
    let s = Scratch::new("guest-io-disk");
    let base = s.write("table.img", &table_image(ENTRIES, DISK_BYTES));
    let delta = s.path("disk.delta");
    let before = file_digest(&base);
    let disk_args = [
        "--disk".to_string(),
        path_arg(&base),
        "--disk-delta".into(),
        path_arg(&delta),
    ];
    let args: Vec<&str> = disk_args.iter().map(String::as_str).collect();

    let g = Guest::boot(&args);
    let mut c = g.conn();
    assert_eq!(
        c.request("disk"),
        format!(
            "ok disk sectors={} ro=0 magic=CLDTABLE entries={ENTRIES}",
            DISK_BYTES / 512
        ),
        "the guest sees the whole disk and the table header"
    );
    check_table(&mut c, &[]);
    let reply = c.request(&format!("get {ENTRIES}"));
    assert!(
        reply.starts_with("err") && reply.contains("beyond"),
        "an entry past the table is an error: {reply:?}"
    );
    let delta_len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let empty = delta_len(&delta);
    let puts = [(7u64, 4242u64), (100_003, u64::MAX), (ENTRIES - 1, 0)];
    for (i, v) in puts {
        assert_eq!(
            c.request(&format!("put {i} {v}")),
            format!("ok put i={i} value={v}")
        );
    }
    check_table(&mut c, &puts);
    assert!(delta.exists(), "--disk-delta creates {}", delta.display());
    assert!(
        delta_len(&delta) > empty,
        "the δ file grows with the puts ({} bytes before, {} after)",
        empty,
        delta_len(&delta)
    );
    drop(c);
    g.poweroff();
    assert_eq!(
        file_digest(&base),
        before,
        "the base image is never written"
    );

    // A second VM on the same base and the same δ file sees the writes.
    let g = Guest::boot(&args);
    let mut c = g.conn();
    check_table(&mut c, &puts);
    drop(c);
    g.poweroff();
    assert_eq!(
        file_digest(&base),
        before,
        "the base image is never written"
    );
}

#[test]
fn read_only_disk_refuses_put_and_changes_nothing() {
    let s = Scratch::new("guest-io-ro");
    let base = s.write("table.img", &table_image(ENTRIES, DISK_BYTES));
    let delta = s.path("disk.delta");
    let before = file_digest(&base);
    let (b, d) = (path_arg(&base), path_arg(&delta));
    let g = Guest::boot(&["--disk", &b, "--disk-delta", &d, "--disk-read-only"]);
    let mut c = g.conn();
    let disk = c.request("disk");
    assert_eq!(
        field(&disk, "ro"),
        Some("1"),
        "the guest sees a read-only disk: {disk:?}"
    );
    let delta_before = std::fs::read(&delta).unwrap_or_default();
    let reply = c.request("put 7 4242");
    assert!(
        reply.starts_with("err") && reply.contains("read-only"),
        "a put on a read-only disk is an error reply: {reply:?}"
    );
    check_table(&mut c, &[]);
    drop(c);
    g.poweroff();
    assert_eq!(
        std::fs::read(&delta).unwrap_or_default(),
        delta_before,
        "the δ file is unchanged by a refused put"
    );
    assert_eq!(
        file_digest(&base),
        before,
        "the base image is never written"
    );
}

/// The `scan` checksum of `sectors` sectors of `img` from `first`: the wrapping sum of the
/// little-endian u64 words.
fn scan_sum(img: &[u8], first: usize, sectors: usize) -> u64 {
    img[first * 512..(first + sectors) * 512]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add)
}

#[test]
fn disk_scan_reads_ranges_in_requests_of_any_allowed_size() {
    let s = Scratch::new("guest-io-scan");
    let mut img = table_image(ENTRIES, DISK_BYTES);
    let base = s.write("table.img", &img);
    let delta = s.path("disk.delta");
    let (b, d) = (path_arg(&base), path_arg(&delta));
    let mut g = Guest::boot(&["--disk", &b, "--disk-delta", &d]);
    let mut c = g.conn();
    let sectors = DISK_BYTES / 512;
    // Whole disk, parts, a short last request, the last sector alone.
    let ranges = [
        (0, sectors, 4),
        (0, sectors, 64),
        (1, sectors - 1, 12),
        (3, 1000, 32),
        (sectors - 96, 96, 64),
        (sectors - 1, 1, 4),
    ];
    for (first, n, k) in ranges {
        let reply = c.request(&format!("scan {first} {n} {k}"));
        let want = format!(
            "ok scan sectors={n} req_kib={k} sum={} us=",
            scan_sum(&img, first, n)
        );
        assert!(
            reply.starts_with(&want),
            "`scan {first} {n} {k}` answered {reply:?}, expected {want:?}…"
        );
    }
    let reply = c.request(&format!("scan {} 2 4", sectors - 1));
    assert!(
        reply.starts_with("err") && reply.contains("beyond the end of the disk"),
        "a scan past the end is refused: {reply:?}"
    );
    let reply = c.request("scan 0 8 6");
    assert!(
        reply.starts_with("err bad argument '6'"),
        "a request size that is not a multiple of 4 KiB is refused: {reply:?}"
    );
    let reply = c.request("scan 0 8 128");
    assert!(
        reply.starts_with("err bad argument '128'"),
        "a request size above 64 KiB is refused: {reply:?}"
    );
    // A scan reads what a put wrote (through the δ) and leaves the table cache alone.
    check_table(&mut c, &[]);
    assert_eq!(c.request("put 7 4242"), "ok put i=7 value=4242");
    img[512 + 8 * 7..512 + 8 * 8].copy_from_slice(&4242u64.to_le_bytes());
    let reply = c.request("scan 0 64 64");
    assert_eq!(
        field(&reply, "sum"),
        Some(scan_sum(&img, 0, 64).to_string().as_str()),
        "the scan sees the put: {reply:?}"
    );
    check_table(&mut c, &[(7, 4242)]);
    drop(c);
    // The serial console takes it too.
    g.vmm.send(&format!("scan 0 {sectors} 64\n"));
    let line = g
        .vmm
        .expect_line(T, |l| l.starts_with("ok scan") || l.starts_with("err"));
    assert_eq!(
        field(&line, "sum"),
        Some(scan_sum(&img, 0, sectors).to_string().as_str()),
        "the serial scan's checksum: {line:?}"
    );
    g.poweroff();
}

// ---------------------------------------------------------------------------------------
// Snapshot and restore with devices.

#[test]
fn restored_vm_serves_on_a_new_port_with_its_disk_delta() {
    let s = Scratch::new("guest-io-snap");
    let base = s.write("table.img", &table_image(ENTRIES, DISK_BYTES));
    let before = file_digest(&base);
    let sock = s.path("vm.sock");
    let snap = s.path("snap");
    let (b, k) = (path_arg(&base), path_arg(&sock));
    let g = Guest::boot(&["--disk", &b, "--api-sock", &k]);
    let mut c = g.conn();
    let puts = [(3u64, 777u64), (150_000, 123_456_789)];
    for (i, v) in puts {
        assert_eq!(
            c.request(&format!("put {i} {v}")),
            format!("ok put i={i} value={v}")
        );
    }
    check_primes(&c.request("primes 100000"), 100_000);
    assert_eq!(c.request("echo before snapshot"), "ok echo before snapshot");

    // Without --stay-paused the VM goes on serving after its snapshot.
    let out = run_vmm(
        [
            "snapshot",
            "--api-sock",
            &k,
            "--out",
            &path_arg(&s.path("snap-running")),
        ],
        T,
    );
    assert_eq!(out.code(), 0, "vmm snapshot: {out:?}");
    let status = run_vmm(["status", "--api-sock", &k], T);
    assert!(
        status
            .stdout
            .first()
            .is_some_and(|l| l.starts_with("running")),
        "without --stay-paused the VM resumes after the snapshot: {status:?}"
    );
    assert_eq!(c.request("echo still here"), "ok echo still here");
    drop(c);

    let out = run_vmm(
        [
            "snapshot",
            "--api-sock",
            &k,
            "--out",
            &path_arg(&snap),
            "--stay-paused",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "vmm snapshot: {out:?}");
    let status = run_vmm(["status", "--api-sock", &k], T);
    assert!(
        status
            .stdout
            .first()
            .is_some_and(|l| l.starts_with("paused")),
        "--stay-paused leaves the VM paused: {status:?}"
    );
    assert!(
        snap.join(DISK_DELTA_FILE).exists(),
        "the snapshot carries the disk δ ({})",
        snap.join(DISK_DELTA_FILE).display()
    );
    let stop = run_vmm(["stop", "--api-sock", &k], T);
    assert_eq!(stop.code(), 0, "vmm stop: {stop:?}");
    let mut vmm = g.vmm;
    let fin = vmm.finish(T);
    assert_eq!(fin.code(), 0, "a stopped VM's vmm exits with 0: {fin:?}");
    let snap_delta = file_digest(&snap.join(DISK_DELTA_FILE));

    // Restore with the service on another host port; the disk comes from the snapshot.
    let port = free_port();
    let restored = Guest::spawn(
        vec![
            "restore".into(),
            "--snapshot".into(),
            path_arg(&snap),
            "--forward".into(),
            format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        ],
        port,
        false,
    );
    // `connect_when_up` retries if the service is not up yet.
    let mut c = restored.conn();
    check_table(&mut c, &puts);
    assert_eq!(c.request("echo after restore"), "ok echo after restore");
    check_primes(&c.request("primes 1000000"), 1_000_000);
    // Writes after the restore go to the restored VM's δ, not to the snapshot or the base.
    assert_eq!(c.request("put 4 9"), "ok put i=4 value=9");
    assert_eq!(c.request("get 4"), "ok get i=4 value=9");
    drop(c);
    restored.poweroff();
    assert_eq!(
        file_digest(&snap.join(DISK_DELTA_FILE)),
        snap_delta,
        "the snapshot's δ is not written by the restored VM"
    );
    assert_eq!(
        file_digest(&base),
        before,
        "the base image is never written"
    );
}

/// Regression: the user-mode network used to number its connections to the guest from
/// source port 49152 in every VMM, so after `vmm restore` the first forwarded connection
/// reused the 4-tuple of a connection the restored guest still held from before the snapshot
/// and hung (~30 s). It now starts at a random port: the first new connection is answered.
#[test]
fn restored_vm_answers_the_first_connection_while_an_old_one_is_open() {
    let s = Scratch::new("guest-io-snap-open");
    let sock = s.path("vm.sock");
    let snap = s.path("snap");
    let k = path_arg(&sock);
    let g = Guest::boot(&["--api-sock", &k]);
    let mut old = g.conn();
    assert_eq!(old.request("echo open"), "ok echo open");
    let out = run_vmm(
        [
            "snapshot",
            "--api-sock",
            &k,
            "--out",
            &path_arg(&snap),
            "--stay-paused",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "vmm snapshot: {out:?}");
    let stop = run_vmm(["stop", "--api-sock", &k], T);
    assert_eq!(stop.code(), 0, "vmm stop: {stop:?}");
    let mut vmm = g.vmm;
    assert_eq!(vmm.finish(T).code(), 0);
    drop(old);

    let port = free_port();
    let restored = Guest::spawn(
        vec![
            "restore".into(),
            "--snapshot".into(),
            path_arg(&snap),
            "--forward".into(),
            format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        ],
        port,
        false,
    );
    // Retry only until the forward listens; then one connection must be served.
    let deadline = Instant::now() + T;
    let mut c = loop {
        match Conn::open(restored.addr) {
            Ok(c) => break c,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the restored VM's forward never listened: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    c.0.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let reply = c.try_request("health");
    assert!(
        matches!(reply.as_deref(), Ok("ok health")),
        "the first forwarded connection after a restore got {reply:?} after {:?}: the \
         user-mode network reused source port 49152, which the restored guest still holds \
         for a connection from before the snapshot",
        t0.elapsed()
    );
    drop(c);
    restored.poweroff();
}

// ---------------------------------------------------------------------------------------
// TAP backend, in a network namespace of the test's own.

/// Runs `ip` with `args`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace created for a test; deleted when dropped, with everything in it.
struct NetNs {
    name: String,
    /// TAP devices made in it (deleted explicitly before the namespace goes).
    taps: Vec<String>,
}

impl NetNs {
    /// Creates namespace `name` with its loopback up.
    fn create(name: &str) -> NetNs {
        // One of this name can only be left over from a killed run with this process id.
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name]).unwrap_or_else(|e| panic!("{e}"));
        // From here on the guard deletes the namespace, even if the next steps fail.
        let ns = NetNs {
            name: name.to_string(),
            taps: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args…`, panicking with the reason on failure.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Creates TAP `tap` in the namespace, gives it `cidr` and brings it up.
    fn add_tap(&mut self, tap: &str, cidr: &str) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        self.taps.push(tap.to_string());
        self.ip(&["addr", "add", cidr, "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
    }

    /// The namespace's file (what `setns` takes).
    fn path(&self) -> std::path::PathBuf {
        let run = Path::new("/run/netns").join(&self.name);
        if run.exists() {
            run
        } else {
            Path::new("/var/run/netns").join(&self.name)
        }
    }

    /// Moves the calling thread into the namespace (only this thread: `setns` changes the
    /// caller's namespace; threads it starts afterwards inherit it).
    fn enter(&self) {
        use std::os::fd::AsRawFd;
        let path = self.path();
        let f =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: `f` is an open namespace file for the whole call; setns only changes the
        // calling thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }

    /// Runs `f` on a new thread inside the namespace and returns its result (a panic there
    /// is a panic here).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                self.enter();
                f()
            });
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for tap in &self.taps {
            if let Err(e) = ip(&["-n", &self.name, "link", "del", tap]) {
                eprintln!("warning: could not delete TAP {tap} in {}: {e}", self.name);
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// Why the TAP test cannot run here, if it cannot.
fn tap_unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and TAP devices need CAP_NET_ADMIN)");
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is missing");
    }
    None
}

#[test]
fn tap_backend_serves_a_client_in_its_own_network_namespace() {
    if let Some(why) = tap_unavailable() {
        eprintln!("SKIPPED tap_backend_serves_a_client_in_its_own_network_namespace: {why}");
        return;
    }
    // Names and a /24 of our own, derived from the process id: concurrent runs differ.
    let pid = std::process::id();
    let tap = "tgio0";
    let net = format!("10.{}.{}", 200 + (pid >> 8) % 50, pid & 0xff);
    let mut ns = NetNs::create(&format!("cloudlet-gio-{pid}"));
    ns.add_tap(tap, &format!("{net}.1/24"));
    // The VMM opens the TAP inside the namespace (`ip netns exec` execs it, same pid).
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(cloudlet_tests::vmm_bin())
        .args(["run", "--kernel"])
        .arg(micro_guest())
        .args(["--mem", "64", "--cmdline"])
        .arg(format!(
            "console=ttyS0 micro.ip={net}.2/24 micro.gw={net}.1"
        ))
        .args(["--tap", tap]);
    let mut vmm = Vmm::spawn_cmd(&mut cmd);
    vmm.expect_line(T, |l| l.starts_with("micro-guest "));
    let addr: SocketAddr = format!("{net}.2:80").parse().expect("guest address");

    ns.run(|| {
        let mut c = connect_when_up(addr);
        let reply = c.request("net");
        assert_eq!(
            field(&reply, "ip"),
            Some(format!("{net}.2/24").as_str()),
            "the guest takes its address from micro.ip: {reply:?}"
        );
        assert_eq!(c.request("echo over tap"), "ok echo over tap");
        check_primes(&c.request("primes 1000000"), 1_000_000);
        drop(c);
        for i in 0..20 {
            let mut c = Conn::open(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(
                c.request(&format!("echo tap {i}")),
                format!("ok echo tap {i}"),
                "connection {i} over the TAP"
            );
        }
        // Threads started here are in the namespace too; each enters it anyway, so the
        // test does not depend on that inheritance.
        std::thread::scope(|s| {
            let ns = &ns;
            let handles: Vec<_> = (0..8)
                .map(|t| {
                    s.spawn(move || {
                        ns.enter();
                        let mut c = Conn::open(addr).unwrap_or_else(|e| panic!("client {t}: {e}"));
                        for k in 0..10 {
                            let text = format!("echo tap client {t} request {k}");
                            assert_eq!(c.request(&text), format!("ok {text}"), "client {t}");
                        }
                        check_primes(&c.request(&format!("primes {}", 1000 + t)), 1000 + t);
                    })
                })
                .collect();
            for h in handles {
                if let Err(e) = h.join() {
                    std::panic::resume_unwind(e);
                }
            }
        });
    });

    // Isolation: the root namespace holds no address of the namespace's subnet, and cannot
    // reach the guest while it serves in there.
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "to", &format!("{net}.0/24")])
        .output()
        .expect("run ip");
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "the root namespace has an address in {net}.0/24: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A connection alone proves nothing (this host's uplink accepts TCP connections to any
    // address and answers them with an HTTP error): the guest is reached only if it answers
    // the probe.
    let probe = format!("echo isolation probe {pid}");
    let from_root = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut c = Conn(s);
        c.try_request(&probe)
    });
    assert!(
        !matches!(&from_root, Ok(r) if r.starts_with("ok echo")),
        "the guest at {addr} must answer only inside namespace {}, but the root namespace \
         got {from_root:?}",
        ns.name
    );
    vmm.send("poweroff 0\n");
    let fin = vmm.finish(T);
    assert_eq!(fin.code(), 0, "the guest powers off with code 0: {fin:?}");
    drop(ns);
}

// ---------------------------------------------------------------------------------------
// The handoff scenario's RAM state: counter, base content, model table, page dirtier.

#[test]
fn counter_and_dirtier_work_over_tcp() {
    use micro_service::oracle::{check_reply, count_reply, incr_reply, parse_dirty_reply};
    // 64 MiB: model 16–24 MiB, base content 24–32 MiB, dirtier 32–64 MiB.
    let g = Guest::boot(&[]);
    let mut c = g.conn();
    for n in 0..3 {
        assert_eq!(c.request("incr"), incr_reply(n));
    }
    // The counter is the guest's, not the connection's.
    let mut c = g.conn();
    for n in 3..5 {
        assert_eq!(c.request("incr"), incr_reply(n));
    }
    assert_eq!(c.request("count"), count_reply(5));

    // 8 MiB of base content below the dirtier's buffer, an 8 MiB model table at 16 MiB.
    assert!(c.request("fill 8").starts_with(&format!(
        "ok fill mib=8 sum={} ",
        micro_service::oracle::fill_sum(8)
    )));
    assert!(c.request("load 8").starts_with(&format!(
        "ok load mib=8 sum={} ",
        micro_service::oracle::model_sum(8)
    )));
    assert_eq!(c.request("check"), check_reply(8, 8));

    // The dirtier at 2000 pages/s: requests are still answered promptly meanwhile.
    let t0 = Instant::now();
    assert_eq!(parse_dirty_reply(&c.request("dirty 2000")), Some((2000, 0)));
    let mut lat = Vec::new();
    while t0.elapsed() < Duration::from_millis(1000) {
        let t = Instant::now();
        assert_eq!(c.request("health"), "ok health");
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    assert!(
        p50 < Duration::from_millis(10),
        "requests answered in {p50:?} (p50) while the dirtier runs"
    );
    let (rate, pages) = parse_dirty_reply(&c.request("dirty")).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(rate, 2000);
    assert!(
        (pages as f64) <= 2000.0 * secs + 1.0 && (pages as f64) >= 1000.0 * secs,
        "{pages} pages in {secs:.2} s at 2000 pages/s"
    );
    // Stopped, it writes no more.
    let (rate, stopped) = parse_dirty_reply(&c.request("dirty 0")).unwrap();
    assert_eq!(rate, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(parse_dirty_reply(&c.request("dirty")), Some((0, stopped)));
    // Its writes went to its own buffer: base content and model are intact.
    assert_eq!(c.request("check"), check_reply(8, 8));
    // Regions in use are kept apart.
    assert!(c
        .request("load 9")
        .starts_with("err load 9: it would overlap"));
    assert!(c
        .request("fill 100")
        .starts_with("err fill 100: not enough memory"));
    assert_eq!(c.request("count"), count_reply(5));
    drop(c);
    g.poweroff();
}

#[test]
fn counter_content_and_dirtier_survive_snapshot_and_restore() {
    use micro_service::oracle::{check_reply, count_reply, incr_reply, parse_dirty_reply};
    let s = Scratch::new("guest-io-ram-state");
    let sock = s.path("vm.sock");
    let snap = s.path("snap");
    let k = path_arg(&sock);
    let g = Guest::boot(&["--api-sock", &k]);
    let mut c = g.conn();
    for n in 0..4 {
        assert_eq!(c.request("incr"), incr_reply(n));
    }
    assert!(c.request("fill 8").starts_with("ok fill mib=8 "));
    assert!(c.request("load 8").starts_with("ok load mib=8 "));
    assert!(c.request("dirty 1000").starts_with("ok dirty rate=1000 "));
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    let out = run_vmm(
        [
            "snapshot",
            "--api-sock",
            &k,
            "--out",
            &path_arg(&snap),
            "--stay-paused",
        ],
        T,
    );
    assert_eq!(out.code(), 0, "vmm snapshot: {out:?}");
    assert_eq!(run_vmm(["stop", "--api-sock", &k], T).code(), 0);
    let mut vmm = g.vmm;
    assert_eq!(vmm.finish(T).code(), 0);

    let port = free_port();
    let restored = Guest::spawn(
        vec![
            "restore".into(),
            "--snapshot".into(),
            path_arg(&snap),
            "--forward".into(),
            format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        ],
        port,
        false,
    );
    let mut c = restored.conn();
    assert_eq!(c.request("count"), count_reply(4));
    assert_eq!(c.request("check"), check_reply(8, 8));
    // The dirtier goes on at its rate in the restored VM.
    let (rate, p0) = parse_dirty_reply(&c.request("dirty")).unwrap();
    assert_eq!(rate, 1000);
    std::thread::sleep(Duration::from_millis(300));
    let (_, p1) = parse_dirty_reply(&c.request("dirty")).unwrap();
    assert!(
        p1 >= p0 + 100,
        "{} pages in 300 ms at 1000 pages/s",
        p1 - p0
    );
    assert_eq!(c.request("incr"), incr_reply(4));
    drop(c);
    restored.poweroff();
}
