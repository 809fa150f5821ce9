//! Shared fixtures: images built once per test run, and an agent process per test with its
//! own data directory and board file (killed, with every vmm it started, when dropped).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agent::client::Client;

/// What `cargo xtask test` builds before the tests run: the micro guest (`micro-guest`) or a
/// binary of this test build beside `agent`. Panics, saying how to build it, when missing.
pub fn built(name: &str) -> PathBuf {
    let p = match name {
        "micro-guest" => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("agent/ is in the workspace")
            .join("target/guest/micro-guest"),
        bin => Path::new(env!("CARGO_BIN_EXE_agent")).with_file_name(bin),
    };
    assert!(
        p.exists(),
        "{name} not found at {}: run `cargo xtask test` (it builds the guest and every binary first)",
        p.display()
    );
    p
}

/// A scratch directory under /tmp (short paths: Unix sockets live in it), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory.
    pub fn new(name: &str) -> Scratch {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "clt-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }

    /// A path inside.
    pub fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 64 MiB base with a table disk and a NIC, and a `load:1` overlay for it.
pub struct Images {
    _dir: Scratch,
    /// Base directory.
    pub base: PathBuf,
    /// Overlay (1 MiB model).
    pub overlay: PathBuf,
    /// A client app file for the app store.
    pub app: PathBuf,
}

/// Entries in the test disk table.
pub const TABLE_ENTRIES: u64 = 5000;

/// The shared images (built on first use).
pub fn images() -> &'static Images {
    static I: OnceLock<Images> = OnceLock::new();
    I.get_or_init(|| {
        let dir = Scratch::new("images");
        let guest = built("micro-guest");
        let ib = built("image-builder");
        let disk = dir.path("table.img");
        std::fs::write(
            &disk,
            micro_service::oracle::table_image(TABLE_ENTRIES, 1 << 20),
        )
        .unwrap();
        let base = dir.path("base");
        let out = Command::new(&ib)
            .args(["base", "--kernel"])
            .arg(&guest)
            .arg("--out")
            .arg(&base)
            .args(["--mem", "64", "--net", "--disk"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(out.status.success(), "image-builder base: {out:?}");
        let overlay = dir.path("app.overlay");
        let out = Command::new(&ib)
            .args(["overlay", "--base"])
            .arg(&base)
            .args(["--script", "load:1", "--out"])
            .arg(&overlay)
            .output()
            .unwrap();
        assert!(out.status.success(), "image-builder overlay: {out:?}");
        let app = dir.path("model-client.apk");
        std::fs::write(&app, b"a client app for the model service\n").unwrap();
        Images {
            _dir: dir,
            base,
            overlay,
            app,
        }
    })
}

/// The operator token of every agent this test run starts (random per run).
pub fn operator_token() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(|| agent::auth::random_secret().unwrap())
}

/// A running agent.
pub struct AgentProc {
    /// Its scratch dir (board file, data dir, logs).
    pub dir: Scratch,
    /// The data directory.
    pub data: PathBuf,
    /// The board file.
    pub board: PathBuf,
    /// The process.
    pub child: Option<Child>,
    /// `http://IP:PORT` (loopback) or `https://IP:PORT`: the first line of `DATA/api.url`.
    pub url: String,
    /// Whether to pass --stop-on-exit.
    stop_on_exit: bool,
    /// The vmm to run (the built one when None).
    vmm: Option<PathBuf>,
    /// The network namespace it runs in (None: the test's own).
    ns: Option<String>,
    /// More arguments for the agent (e.g. `--no-warm-standby`, `--no-jail`).
    pub args: Vec<String>,
}

/// The dev board with `edits` applied (`(from, to)` text replacements).
pub fn board_text(edits: &[(&str, &str)]) -> String {
    let mut t = agent::board::DEV_TOML.to_string();
    for (a, b) in edits {
        assert!(t.contains(a), "board has no '{a}'");
        t = t.replace(a, b);
    }
    t
}

/// Runs an `agent` subcommand on the data directory `data`; panics when it fails.
pub fn run_agent_cmd(args: &[&str], data: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(out.status.success(), "agent {args:?}: {out:?}");
}

impl AgentProc {
    /// A data directory with base `micro`, service `model` and app `model-client` staged
    /// (through the `agent stage-*` commands), and an agent on it.
    pub fn start(name: &str, edits: &[(&str, &str)]) -> AgentProc {
        AgentProc::start_opts(name, edits, true)
    }

    /// As [`AgentProc::start`]; `stop_on_exit` false leaves instances running when the
    /// agent exits (for the re-adoption test).
    pub fn start_opts(name: &str, edits: &[(&str, &str)], stop_on_exit: bool) -> AgentProc {
        AgentProc::start_full(name, edits, stop_on_exit, None)
    }

    /// As [`AgentProc::start`], running `vmm` instead of the built vmm.
    pub fn start_with_vmm(name: &str, edits: &[(&str, &str)], vmm: &Path) -> AgentProc {
        AgentProc::start_full(name, edits, true, Some(vmm.to_path_buf()))
    }

    /// As [`AgentProc::start`], with `vmm` (when given) instead of the built vmm and `args`
    /// added to the agent's command line.
    pub fn start_args(
        name: &str,
        edits: &[(&str, &str)],
        vmm: Option<&Path>,
        args: &[&str],
    ) -> AgentProc {
        AgentProc::start_inner(
            name,
            edits,
            true,
            vmm.map(Path::to_path_buf),
            None,
            args.iter().map(|a| a.to_string()).collect(),
        )
    }

    /// As [`AgentProc::start`], run inside network namespace `ns` (`ip netns exec`).
    pub fn start_in(name: &str, edits: &[(&str, &str)], ns: &str) -> AgentProc {
        AgentProc::start_ns(name, edits, true, None, Some(ns.to_string()))
    }

    /// An agent with every option: `stop_on_exit`, and `vmm` instead of the built vmm.
    pub fn start_full(
        name: &str,
        edits: &[(&str, &str)],
        stop_on_exit: bool,
        vmm: Option<PathBuf>,
    ) -> AgentProc {
        AgentProc::start_ns(name, edits, stop_on_exit, vmm, None)
    }

    fn start_ns(
        name: &str,
        edits: &[(&str, &str)],
        stop_on_exit: bool,
        vmm: Option<PathBuf>,
        ns: Option<String>,
    ) -> AgentProc {
        AgentProc::start_inner(name, edits, stop_on_exit, vmm, ns, Vec::new())
    }

    fn start_inner(
        name: &str,
        edits: &[(&str, &str)],
        stop_on_exit: bool,
        vmm: Option<PathBuf>,
        ns: Option<String>,
        args: Vec<String>,
    ) -> AgentProc {
        let img = images();
        let dir = Scratch::new(name);
        let data = dir.path("data");
        let board = dir.path("board.toml");
        std::fs::write(&board, board_text(edits)).unwrap();
        run_agent_cmd(
            &["stage-base", "micro", "--from", img.base.to_str().unwrap()],
            &data,
        );
        run_agent_cmd(
            &[
                "stage-service",
                "model",
                "--overlay",
                img.overlay.to_str().unwrap(),
                "--description",
                "1 MiB model",
            ],
            &data,
        );
        run_agent_cmd(
            &[
                "stage-app",
                "model-client",
                "--file",
                img.app.to_str().unwrap(),
                "--service",
                "model",
            ],
            &data,
        );
        // Every agent of the run has the same operator token, as an operator of several
        // appliances would set them up (a handoff's source and target, a client following
        // a moved instance); the agent making its own is tested on its own.
        agent::auth::write_private(
            &data.join(agent::auth::OPERATOR_TOKEN_FILE),
            format!("{}\n", operator_token()).as_bytes(),
        )
        .unwrap();
        let mut a = AgentProc {
            dir,
            data,
            board,
            child: None,
            url: String::new(),
            stop_on_exit,
            vmm,
            ns,
            args,
        };
        a.spawn();
        a
    }

    /// (Re)starts the agent process on the same data directory.
    pub fn spawn(&mut self) {
        let addr_file = self.data.join("api.url");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("agent.log"))
            .unwrap();
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(env!("CARGO_BIN_EXE_agent"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_agent")),
        };
        // The operator token is the one in its data directory (see `token`), whatever the
        // environment of the test run holds.
        cmd.env_remove(agent::auth::TOKEN_ENV)
            .arg("--config")
            .arg(&self.board)
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if self.stop_on_exit {
            cmd.arg("--stop-on-exit");
        }
        if let Some(v) = &self.vmm {
            cmd.arg("--vmm").arg(v);
        }
        cmd.args(&self.args);
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = std::fs::read_to_string(&addr_file) {
                if let Some(first) = s.lines().next().filter(|l| !l.trim().is_empty()) {
                    self.url = first.trim().to_string();
                    break;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {st} at start:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asserts that nothing is left in the data directory's `tmp/` (uploads and builds clean
    /// up after themselves, failed ones included).
    pub fn tmp_is_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.data.join("tmp"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left in tmp/: {left:?}");
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("agent.log")).unwrap_or_default()
    }

    /// This appliance's id.
    pub fn id(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.id"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// SHA-256 of this appliance's TLS certificate (from its data directory).
    pub fn fingerprint(&self) -> String {
        let der = std::fs::read(self.data.join("tls/cert.der")).unwrap();
        agent::tls::fingerprint(&der)
    }

    /// Chromium's `--ignore-certificate-errors-spki-list` value trusting exactly this
    /// appliance's key.
    pub fn spki(&self) -> String {
        agent::tls::ApplianceCert::load_or_create(&self.data, &self.id())
            .unwrap()
            .spki_sha256_base64()
    }

    /// Trusts `other` for handoff with `secret` (in a private file), its certificate pinned
    /// (`agent add-peer`; the agent reads the store at once).
    pub fn trust(&self, other: &AgentProc, secret: &str) {
        let f = self.dir.path("peer.secret");
        agent::auth::write_private(&f, secret.as_bytes()).unwrap();
        run_agent_cmd(
            &[
                "add-peer",
                &other.id(),
                "--secret-file",
                f.to_str().unwrap(),
                "--fingerprint",
                &other.fingerprint(),
            ],
            &self.data,
        );
    }

    /// Instance records in the data directory, and whether anything else is under
    /// `instances/` (a directory without a record).
    pub fn instance_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("instances"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The file holding the operator token (mode 0600).
    pub fn token_file(&self) -> PathBuf {
        self.data.join(agent::auth::OPERATOR_TOKEN_FILE)
    }

    /// The operator token.
    pub fn token(&self) -> String {
        agent::auth::read_secret_file(&self.token_file()).unwrap()
    }

    /// A client with the operator token (the certificate pinned over HTTPS).
    pub fn client(&self) -> Client {
        self.client_with(Some(&self.token()))
    }

    /// Pairs device `id` directly in the data directory (as pairing does; the agent reads
    /// the store at every request) and returns a client with its credential.
    pub fn device(&self, id: &str, ttl: Duration) -> Client {
        let (secret, _) = agent::devices::DeviceStore::in_dir(&self.data)
            .issue(id, id, "test phone", ttl)
            .unwrap();
        self.client_with(Some(&secret))
    }

    /// A client without a token (its certificate pinned over HTTPS).
    pub fn anon(&self) -> Client {
        self.client_with(None)
    }

    /// A client with `token` (its certificate pinned over HTTPS).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        if self.url.starts_with("https://") {
            Client::pinned(&self.url, token, &self.fingerprint())
        } else {
            Client::new(&self.url, token)
        }
    }

    /// The API address ("IP:PORT").
    pub fn addr(&self) -> String {
        self.url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string()
    }

    /// Sends SIGTERM and waits for the exit (kills after 10 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Pids of vmm processes recorded in the data directory that are still alive.
    pub fn live_vmms(&self) -> Vec<u32> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.data.join("instances")) {
            for e in rd.flatten() {
                let Ok(t) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                let Ok(j) = serde_json::from_str::<serde_json::Value>(&t) else {
                    continue;
                };
                if let Some(pid) = j["pid"].as_u64() {
                    if agent::supervisor::pid_alive(pid as u32) {
                        v.push(pid as u32);
                    }
                }
            }
        }
        v
    }
}

impl AgentProc {
    /// The warm standbys in the data directory: (instance id, pid) of each whose vmm is alive
    /// (see `agent::warm`).
    pub fn standbys(&self) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.data.join("instances")) {
            for e in rd.flatten() {
                let pid_file = e.path().join(agent::warm::PID_FILE);
                let Ok(t) = std::fs::read_to_string(pid_file) else {
                    continue;
                };
                if let Ok(pid) = t.trim().parse::<u32>() {
                    if agent::supervisor::pid_alive(pid) {
                        v.push((e.file_name().to_string_lossy().into_owned(), pid));
                    }
                }
            }
        }
        v.sort();
        v
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.terminate();
        // Never leak a vmm, whatever the test did.
        let standbys = self.standbys().into_iter().map(|(_, pid)| pid);
        for pid in self.live_vmms().into_iter().chain(standbys) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Polls `f` every 20 ms until it returns Some, for at most `t`.
pub fn wait_for<T>(t: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + t;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {t:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns a child whose stdout lines arrive on a channel.
pub fn spawn_lines(cmd: &mut Command) -> (Child, Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    // Until the pipe closes or the receiver goes.
    std::thread::spawn(move || {
        let lines = BufReader::new(out).lines().map_while(Result::ok);
        lines.map(|l| tx.send(l)).take_while(Result::is_ok).count()
    });
    (child, rx)
}

/// Checks replies of a running instance against the reference values.
pub fn verify_guest(endpoint: &str) {
    use micro_service::client::{Client, DEFAULT_TIMEOUT};
    use micro_service::oracle::{get_reply, query_reply, table_value};
    let mut g = Client::connect(endpoint, DEFAULT_TIMEOUT).unwrap();
    g.expect("health", "ok health").unwrap();
    for i in [0u64, 5, 77_777, 131_071] {
        g.expect(&format!("query {i}"), &query_reply(i)).unwrap();
    }
    for i in [0u64, 7, TABLE_ENTRIES - 1] {
        g.expect(&format!("get {i}"), &get_reply(i, table_value(i)))
            .unwrap();
    }
}

/// A `/proc/PID/status` field's values.
pub fn proc_status(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Asserts, from outside, that the vmm `pid` of instance `id` of the agent on `data` runs in
/// its jail: a user of its own (not root), no_new_privs and seccomp, pid 1 of a pid namespace
/// of its own, mount and IPC namespaces of its own, a root holding only its own instance
/// directory of the agent's data and its device nodes, its instance directory its own, and
/// its own cgroup. Returns its user id.
pub fn assert_jailed(data: &Path, id: &str, pid: u32) -> u32 {
    let uids = proc_status(pid, "Uid:");
    let uid: u32 = uids[0].parse().unwrap();
    assert!(uid >= agent::jail::UID_BASE, "uid {uids:?}");
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    assert_eq!(proc_status(pid, "Gid:")[0], uids[0]);
    assert_eq!(proc_status(pid, "NoNewPrivs:"), ["1"]);
    assert_eq!(proc_status(pid, "Seccomp:"), ["2"]);
    assert_eq!(proc_status(pid, "CapEff:"), ["0000000000000000"]);
    // NSpid: its pid here, then in its own namespace: 1.
    let nspid = proc_status(pid, "NSpid:");
    assert_eq!(nspid.last().map(String::as_str), Some("1"), "{nspid:?}");
    for ns in ["mnt", "pid", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the test");
    }
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let data = data.canonicalize().unwrap();
    assert_eq!(names(&inside(&data.join("instances"))), [id]);
    // Of the agent's data: the bases, its own instance, the services (a synthesis reads its
    // overlay; a received VM does not).
    let top = names(&inside(&data));
    assert!(
        top == ["bases", "instances", "services"] || top == ["bases", "instances"],
        "{top:?}"
    );
    assert!(!inside(Path::new("/etc")).exists());
    assert!(!inside(&data.join("operator.token")).exists());
    let dev = names(&root.join("dev"));
    assert!(dev.contains(&"kvm".to_string()), "{dev:?}");
    assert!(
        dev.iter()
            .all(|d| ["kvm", "userfaultfd"].contains(&d.as_str())),
        "{dev:?}"
    );
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::metadata(data.join("instances").join(id)).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (uid, 0o700));
    // Every thread in the VM's cgroup (it joined while it had one).
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(cg) = std::fs::read_to_string(t.unwrap().path().join("cgroup")) else {
            continue; // the thread ended meanwhile
        };
        assert!(cg.contains(&format!("/vm-{id}")), "{cg}");
    }
    uid
}
