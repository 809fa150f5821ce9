//! The micro guest's virtio devices end to end: its TCP service reached from the host through
//! the VMM's user-mode network (`--forward`) and through a TAP device in a network namespace
//! the test creates, its disk table read and written through virtio-blk over a copy-on-write
//! δ (in a file, read-only, carried in a snapshot), whole disk ranges read with `scan` in
//! requests of 4 to 64 KiB, with every answer checked against values computed here.
//!
//! The host side of the protocol is `micro_service::client` and the expected answers come
//! from `micro_service::oracle`, which is written independently of the guest's code.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_tests::{
    error_chain, file_digest, micro_guest, run_vmm, vmm_snapshot, vmm_status, Ask, Scratch, Vmm,
};
use micro_service::client::{field, Client};
use micro_service::oracle::{get_reply, prime_count, table_image, table_value, word_sum};
use vmm::snapshot::DISK_DELTA_FILE;

/// Timeout for anything a VM does (boot, exit, a reply) on a loaded 2-core host.
const T: Duration = Duration::from_secs(30);
/// The guest's service address on the user-mode network.
const GUEST_SERVICE: &str = "10.0.2.15:80";

/// How long one attempt of [`connect_when_up`] waits for `health` before trying a new
/// connection (a reply takes well under a millisecond; this allows for a loaded host).
const ATTEMPT: Duration = Duration::from_secs(3);

/// Connects to the service at `addr` once it answers `health`, retrying with a new
/// connection (the forward or the guest's stack may not be up yet) until `T` has passed.
fn connect_when_up(addr: SocketAddr) -> Client {
    Client::connect_when_up(addr, T, ATTEMPT)
        .unwrap_or_else(|e| panic!("the guest service at {addr}: {}", error_chain(&e)))
}

/// A connection to `addr` (no `health` first); `what` names it when that fails.
fn open(addr: SocketAddr, what: &str) -> Client {
    Client::connect(addr, T).unwrap_or_else(|e| panic!("{what}: {}", error_chain(&e)))
}

/// A host TCP port that was free a moment ago (bound, read, released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").port()
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

    /// [`Guest::boot`] with `extra` and a control socket in `s`; returns the guest, the
    /// socket as an argument and the path its snapshot is to be written to.
    fn boot_with_api(s: &Scratch, extra: &[&str]) -> (Guest, String, PathBuf) {
        let k = path_arg(&s.path("vm.sock"));
        let mut args = extra.to_vec();
        args.extend(["--api-sock", &k]);
        let g = Guest::boot(&args);
        (g, k, s.path("snap"))
    }

    /// A connection to the service, once it answers.
    fn conn(&self) -> Client {
        connect_when_up(self.addr)
    }

    /// `vmm restore` of `snap` with the service forwarded from a free host port (no banner:
    /// a restored guest prints none).
    fn restore(snap: &Path) -> Guest {
        let port = free_port();
        let args = vec![
            "restore".into(),
            "--snapshot".into(),
            path_arg(snap),
            "--forward".into(),
            format!("127.0.0.1:{port}={GUEST_SERVICE}"),
        ];
        Guest::spawn(args, port, false)
    }

    /// Stops the VM over its control socket `sock` and checks the VMM exits with 0.
    fn stop(self, sock: &str) {
        let stop = run_vmm(["stop", "--api-sock", sock], T);
        assert_eq!(stop.code(), 0, "vmm stop: {stop:?}");
        let mut vmm = self.vmm;
        let fin = vmm.finish(T);
        assert_eq!(fin.code(), 0, "a stopped VM's vmm exits with 0: {fin:?}");
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
    assert_eq!(c.ask("health"), "ok health");
    assert_eq!(c.ask("echo hello host"), "ok echo hello host");
    for n in [10usize, 1000, 65_537, 1_000_000] {
        check_primes(&c.ask(&format!("primes {n}")), n);
    }
    let reply = c.ask("primes 1000000");
    assert_eq!(
        field(&reply, "count"),
        Some("78498"),
        "π(10^6) = 78498: {reply:?}"
    );
    let net = c.ask("net");
    assert_eq!(
        field(&net, "ip"),
        Some("10.0.2.15/24"),
        "the guest's default address on the user-mode network: {net:?}"
    );
    assert!(
        c.ask("frobnicate").starts_with("err unknown command"),
        "an unknown command is an error reply"
    );
    // The largest request the protocol allows comes back whole.
    let big = "b".repeat(1024 - "echo ".len());
    assert_eq!(c.ask(&format!("echo {big}")), format!("ok echo {big}"));
    // A longer one is refused and the connection ends; the service goes on.
    let reply = c.ask(&format!("echo {big}x"));
    assert!(
        reply.starts_with("err request too long"),
        "a request over 1024 bytes is refused: {reply:?}"
    );
    let mut c = g.conn();
    let stats = c.ask("stats");
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
        let mut c = open(g.addr, &format!("connection {i}"));
        let reply = c.ask(&format!("echo seq {i}"));
        assert_eq!(reply, format!("ok echo seq {i}"), "connection {i} of 100");
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
                let mut c = open(addr, &format!("client {t}"));
                for k in 0..20 {
                    let text = format!("echo client {t} request {k}");
                    assert_eq!(
                        c.ask(&text),
                        format!("ok {text}"),
                        "client {t}, request {k}"
                    );
                }
                let n = 1000 + 37 * t;
                let reply = c.ask(&format!("primes {n}"));
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
fn check_table(c: &mut Client, changed: &[(u64, u64)]) {
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
            c.ask(&format!("get {i}")),
            get_reply(i, want),
            "entry {i} of the table"
        );
    }
}

/// Writes each `(i, v)` with `put i v` and checks the replies.
fn put_all(c: &mut Client, puts: &[(u64, u64)]) {
    for &(i, v) in puts {
        assert_eq!(
            c.ask(&format!("put {i} {v}")),
            format!("ok put i={i} value={v}")
        );
    }
}

/// The test table as a scratch disk image, its digest taken to check it is never written.
struct TableDisk {
    path: PathBuf,
    digest: u64,
}

impl TableDisk {
    /// Writes `table.img` in `s`.
    fn new(s: &Scratch) -> TableDisk {
        let path = s.write("table.img", &table_image(ENTRIES, DISK_BYTES));
        let digest = file_digest(&path);
        TableDisk { path, digest }
    }

    /// The image's path as an argument.
    fn arg(&self) -> String {
        path_arg(&self.path)
    }

    /// Checks the image still holds what was written.
    fn assert_unchanged(&self) {
        assert_eq!(
            file_digest(&self.path),
            self.digest,
            "the base image is never written"
        );
    }
}

#[test]
fn disk_get_reads_the_table_and_put_lands_in_the_delta_file() {
    let s = Scratch::new("guest-io-disk");
    let base = TableDisk::new(&s);
    let delta = s.path("disk.delta");
    let disk_args = [
        "--disk".to_string(),
        base.arg(),
        "--disk-delta".into(),
        path_arg(&delta),
    ];
    let args: Vec<&str> = disk_args.iter().map(String::as_str).collect();

    let g = Guest::boot(&args);
    let mut c = g.conn();
    assert_eq!(
        c.ask("disk"),
        format!(
            "ok disk sectors={} ro=0 magic=CLDTABLE entries={ENTRIES}",
            DISK_BYTES / 512
        ),
        "the guest sees the whole disk and the table header"
    );
    check_table(&mut c, &[]);
    let reply = c.ask(&format!("get {ENTRIES}"));
    assert!(
        reply.starts_with("err") && reply.contains("beyond"),
        "an entry past the table is an error: {reply:?}"
    );
    let delta_len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let empty = delta_len(&delta);
    let puts = [(7u64, 4242u64), (100_003, u64::MAX), (ENTRIES - 1, 0)];
    put_all(&mut c, &puts);
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
    base.assert_unchanged();

    // A second VM on the same base and the same δ file sees the writes.
    let g = Guest::boot(&args);
    let mut c = g.conn();
    check_table(&mut c, &puts);
    drop(c);
    g.poweroff();
    base.assert_unchanged();
}

#[test]
fn read_only_disk_refuses_put_and_changes_nothing() {
    let s = Scratch::new("guest-io-ro");
    let base = TableDisk::new(&s);
    let delta = s.path("disk.delta");
    let g = Guest::boot(&[
        "--disk",
        &base.arg(),
        "--disk-delta",
        &path_arg(&delta),
        "--disk-read-only",
    ]);
    let mut c = g.conn();
    let disk = c.ask("disk");
    assert_eq!(
        field(&disk, "ro"),
        Some("1"),
        "the guest sees a read-only disk: {disk:?}"
    );
    let delta_before = std::fs::read(&delta).unwrap_or_default();
    let reply = c.ask("put 7 4242");
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
    base.assert_unchanged();
}

/// The `scan` checksum of `sectors` sectors of `img` from `first`.
fn scan_sum(img: &[u8], first: usize, sectors: usize) -> u64 {
    word_sum(&img[first * 512..(first + sectors) * 512])
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
        let reply = c.ask(&format!("scan {first} {n} {k}"));
        let want = format!(
            "ok scan sectors={n} req_kib={k} sum={} us=",
            scan_sum(&img, first, n)
        );
        assert!(
            reply.starts_with(&want),
            "`scan {first} {n} {k}` answered {reply:?}, expected {want:?}…"
        );
    }
    let reply = c.ask(&format!("scan {} 2 4", sectors - 1));
    assert!(
        reply.starts_with("err") && reply.contains("beyond the end of the disk"),
        "a scan past the end is refused: {reply:?}"
    );
    let reply = c.ask("scan 0 8 6");
    assert!(
        reply.starts_with("err bad argument '6'"),
        "a request size that is not a multiple of 4 KiB is refused: {reply:?}"
    );
    let reply = c.ask("scan 0 8 128");
    assert!(
        reply.starts_with("err bad argument '128'"),
        "a request size above 64 KiB is refused: {reply:?}"
    );
    // A scan reads what a put wrote (through the δ) and leaves the table cache alone.
    check_table(&mut c, &[]);
    assert_eq!(c.ask("put 7 4242"), "ok put i=7 value=4242");
    img[512 + 8 * 7..512 + 8 * 8].copy_from_slice(&4242u64.to_le_bytes());
    let reply = c.ask("scan 0 64 64");
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
    let base = TableDisk::new(&s);
    let (g, k, snap) = Guest::boot_with_api(&s, &["--disk", &base.arg()]);
    let mut c = g.conn();
    let puts = [(3u64, 777u64), (150_000, 123_456_789)];
    put_all(&mut c, &puts);
    check_primes(&c.ask("primes 100000"), 100_000);
    assert_eq!(c.ask("echo before snapshot"), "ok echo before snapshot");

    // Without --stay-paused the VM goes on serving after its snapshot.
    vmm_snapshot(&k, &s.path("snap-running"), false, T);
    let status = vmm_status(&k, T);
    assert!(
        status.starts_with("running"),
        "without --stay-paused the VM resumes after the snapshot: {status:?}"
    );
    assert_eq!(c.ask("echo still here"), "ok echo still here");
    drop(c);

    vmm_snapshot(&k, &snap, true, T);
    let status = vmm_status(&k, T);
    assert!(
        status.starts_with("paused"),
        "--stay-paused leaves the VM paused: {status:?}"
    );
    assert!(
        snap.join(DISK_DELTA_FILE).exists(),
        "the snapshot carries the disk δ ({})",
        snap.join(DISK_DELTA_FILE).display()
    );
    g.stop(&k);
    let snap_delta = file_digest(&snap.join(DISK_DELTA_FILE));

    // Restore with the service on another host port; the disk comes from the snapshot.
    let restored = Guest::restore(&snap);
    // `connect_when_up` retries if the service is not up yet.
    let mut c = restored.conn();
    check_table(&mut c, &puts);
    assert_eq!(c.ask("echo after restore"), "ok echo after restore");
    check_primes(&c.ask("primes 1000000"), 1_000_000);
    // Writes after the restore go to the restored VM's δ, not to the snapshot or the base.
    assert_eq!(c.ask("put 4 9"), "ok put i=4 value=9");
    assert_eq!(c.ask("get 4"), "ok get i=4 value=9");
    drop(c);
    restored.poweroff();
    assert_eq!(
        file_digest(&snap.join(DISK_DELTA_FILE)),
        snap_delta,
        "the snapshot's δ is not written by the restored VM"
    );
    base.assert_unchanged();
}

/// Regression: the user-mode network used to number its connections to the guest from
/// source port 49152 in every VMM, so after `vmm restore` the first forwarded connection
/// reused the 4-tuple of a connection the restored guest still held from before the snapshot
/// and hung (~30 s). It now starts at a random port: the first new connection is answered.
#[test]
fn restored_vm_answers_the_first_connection_while_an_old_one_is_open() {
    let s = Scratch::new("guest-io-snap-open");
    let (g, k, snap) = Guest::boot_with_api(&s, &[]);
    let mut old = g.conn();
    assert_eq!(old.ask("echo open"), "ok echo open");
    vmm_snapshot(&k, &snap, true, T);
    g.stop(&k);
    drop(old);

    let restored = Guest::restore(&snap);
    // Retry only until the forward listens; then one connection must be served.
    let deadline = Instant::now() + T;
    let mut c = loop {
        match Client::connect(restored.addr, T) {
            Ok(c) => break c,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the restored VM's forward never listened: {}",
                error_chain(&e)
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    c.set_timeout(Duration::from_secs(10)).unwrap();
    let t0 = Instant::now();
    let reply = c.request("health");
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

/// Why an `ip` command failed.
#[derive(Debug, thiserror::Error)]
enum IpError {
    /// It did not run.
    #[error("cannot run `ip` (iproute2)")]
    Spawn(#[source] std::io::Error),
    /// It ran and failed.
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs `ip` with `args`.
fn ip(args: &[&str]) -> Result<(), IpError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(IpError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IpError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
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
        ip(&["netns", "add", name]).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
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
        ip(&all).unwrap_or_else(|e| panic!("{}", error_chain(&e)));
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
                let e = error_chain(&e);
                eprintln!("warning: could not delete TAP {tap} in {}: {e}", self.name);
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            let e = error_chain(&e);
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
    // The VMM opens the TAP inside the namespace (`ip netns exec` execs it, same pid),
    // jailed as the agent runs it (then the TAP is handed to the VM's user first).
    let inst = cloudlet_tests::Scratch::new("tap-jail");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(cloudlet_tests::vmm_bin())
        .args(["run", "--kernel"])
        .arg(micro_guest())
        .args(["--mem", "64", "--cmdline"])
        .arg(format!(
            "console=ttyS0 micro.ip={net}.2/24 micro.gw={net}.1"
        ))
        .args(["--tap", tap])
        .arg("--confine")
        .arg(inst.path("."))
        .args(["--jail", "1500999002:1500999002"]);
    let mut vmm = Vmm::spawn_cmd(&mut cmd);
    vmm.expect_line(T, |l| l.starts_with("micro-guest "));
    let addr: SocketAddr = format!("{net}.2:80").parse().expect("guest address");

    ns.run(|| {
        let mut c = connect_when_up(addr);
        let reply = c.ask("net");
        assert_eq!(
            field(&reply, "ip"),
            Some(format!("{net}.2/24").as_str()),
            "the guest takes its address from micro.ip: {reply:?}"
        );
        assert_eq!(c.ask("echo over tap"), "ok echo over tap");
        check_primes(&c.ask("primes 1000000"), 1_000_000);
        drop(c);
        for i in 0..20 {
            let mut c = open(addr, &format!("connection {i}"));
            assert_eq!(
                c.ask(&format!("echo tap {i}")),
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
                        let mut c = open(addr, &format!("client {t}"));
                        for k in 0..10 {
                            let text = format!("echo tap client {t} request {k}");
                            assert_eq!(c.ask(&text), format!("ok {text}"), "client {t}");
                        }
                        check_primes(&c.ask(&format!("primes {}", 1000 + t)), 1000 + t);
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
    let from_root =
        Client::connect(addr, Duration::from_secs(2)).and_then(|mut c| c.request(&probe));
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
        assert_eq!(c.ask("incr"), incr_reply(n));
    }
    // The counter is the guest's, not the connection's.
    let mut c = g.conn();
    for n in 3..5 {
        assert_eq!(c.ask("incr"), incr_reply(n));
    }
    assert_eq!(c.ask("count"), count_reply(5));

    // 8 MiB of base content below the dirtier's buffer, an 8 MiB model table at 16 MiB.
    assert!(c.ask("fill 8").starts_with(&format!(
        "ok fill mib=8 sum={} ",
        micro_service::oracle::fill_sum(8)
    )));
    assert!(c.ask("load 8").starts_with(&format!(
        "ok load mib=8 sum={} ",
        micro_service::oracle::model_sum(8)
    )));
    assert_eq!(c.ask("check"), check_reply(8, 8));

    // The dirtier at 2000 pages/s: requests are still answered promptly meanwhile.
    let t0 = Instant::now();
    assert_eq!(parse_dirty_reply(&c.ask("dirty 2000")), Some((2000, 0)));
    let mut lat = Vec::new();
    while t0.elapsed() < Duration::from_millis(1000) {
        let t = Instant::now();
        assert_eq!(c.ask("health"), "ok health");
        lat.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    assert!(
        p50 < Duration::from_millis(10),
        "requests answered in {p50:?} (p50) while the dirtier runs"
    );
    let (rate, pages) = parse_dirty_reply(&c.ask("dirty")).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(rate, 2000);
    assert!(
        (pages as f64) <= 2000.0 * secs + 1.0 && (pages as f64) >= 1000.0 * secs,
        "{pages} pages in {secs:.2} s at 2000 pages/s"
    );
    // Stopped, it writes no more.
    let (rate, stopped) = parse_dirty_reply(&c.ask("dirty 0")).unwrap();
    assert_eq!(rate, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(parse_dirty_reply(&c.ask("dirty")), Some((0, stopped)));
    // Its writes went to its own buffer: base content and model are intact.
    assert_eq!(c.ask("check"), check_reply(8, 8));
    // Regions in use are kept apart.
    assert!(c.ask("load 9").starts_with("err load 9: it would overlap"));
    assert!(c
        .ask("fill 100")
        .starts_with("err fill 100: not enough memory"));
    assert_eq!(c.ask("count"), count_reply(5));
    drop(c);
    g.poweroff();
}

#[test]
fn counter_content_and_dirtier_survive_snapshot_and_restore() {
    use micro_service::oracle::{check_reply, count_reply, incr_reply, parse_dirty_reply};
    let s = Scratch::new("guest-io-ram-state");
    let (g, k, snap) = Guest::boot_with_api(&s, &[]);
    let mut c = g.conn();
    for n in 0..4 {
        assert_eq!(c.ask("incr"), incr_reply(n));
    }
    assert!(c.ask("fill 8").starts_with("ok fill mib=8 "));
    assert!(c.ask("load 8").starts_with("ok load mib=8 "));
    assert!(c.ask("dirty 1000").starts_with("ok dirty rate=1000 "));
    std::thread::sleep(Duration::from_millis(100));
    drop(c);
    vmm_snapshot(&k, &snap, true, T);
    g.stop(&k);

    let restored = Guest::restore(&snap);
    let mut c = restored.conn();
    assert_eq!(c.ask("count"), count_reply(4));
    assert_eq!(c.ask("check"), check_reply(8, 8));
    // The dirtier goes on at its rate in the restored VM.
    let (rate, p0) = parse_dirty_reply(&c.ask("dirty")).unwrap();
    assert_eq!(rate, 1000);
    std::thread::sleep(Duration::from_millis(300));
    let (_, p1) = parse_dirty_reply(&c.ask("dirty")).unwrap();
    assert!(
        p1 >= p0 + 100,
        "{} pages in 300 ms at 1000 pages/s",
        p1 - p0
    );
    assert_eq!(c.ask("incr"), incr_reply(4));
    drop(c);
    restored.poweroff();
}
