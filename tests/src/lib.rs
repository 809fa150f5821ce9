//! Shared helpers for the end-to-end tests: where the built artefacts are, a `vmm` process
//! driver with timeouts (a test never hangs on a stuck guest), the `vmm` control commands,
//! requests to the guest's service that panic with the reason ([`Ask`]), and builders for
//! tiny test kernels (raw ELF and bzImage files made byte by byte).
//!
//! The artefacts are built by `cargo xtask test` before the tests run; a test that cannot find
//! one fails and says how to build it.

pub mod netns;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The target directory of this test build (`target/debug` or `target/release`).
fn profile_dir() -> PathBuf {
    // The test binary runs from target/<profile>/deps/<name>.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps")
        .to_path_buf()
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: run the tests with `cargo xtask test`, which builds it first",
        path.display()
    );
    path
}

/// The `vmm` binary of this build profile.
pub fn vmm_bin() -> PathBuf {
    require(profile_dir().join("vmm"), "the vmm binary")
}

/// The `image-builder` binary of this build profile.
pub fn image_builder_bin() -> PathBuf {
    require(
        profile_dir().join("image-builder"),
        "the image-builder binary",
    )
}

/// Runs `image-builder` with `args` to completion.
pub fn run_image_builder<I, S>(args: I, timeout: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(image_builder_bin());
    cmd.args(args);
    let mut v = Vmm::spawn_cmd(&mut cmd);
    v.close_stdin();
    v.finish(timeout)
}

/// How long one `image-builder` run may take in the helpers below.
const IMAGE_BUILDER_TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch path as an argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

/// Runs `image-builder` with `args`, which must succeed.
pub fn image_builder(args: &[&str]) -> Finished {
    let fin = run_image_builder(args, IMAGE_BUILDER_TIMEOUT);
    assert_eq!(fin.code(), 0, "{fin:?}");
    fin
}

/// `image-builder base` of the micro guest with `mem` MiB and `extra` options into `out`.
pub fn make_base(out: &Path, mem: &str, extra: &[&str]) -> PathBuf {
    let kernel = micro_guest();
    let mut args = vec![
        "base",
        "--kernel",
        arg(&kernel),
        "--out",
        arg(out),
        "--mem",
        mem,
    ];
    args.extend_from_slice(extra);
    let fin = image_builder(&args);
    assert!(fin.stdout[0].starts_with("base "), "{fin:?}");
    out.to_owned()
}

/// `image-builder overlay` of `base` customised by `script` into `out`, with `extra`
/// options.
pub fn make_overlay(base: &Path, script: &str, out: &Path, extra: &[&str]) -> Finished {
    let mut args = vec![
        "overlay",
        "--base",
        arg(base),
        "--script",
        script,
        "--out",
        arg(out),
    ];
    args.extend_from_slice(extra);
    image_builder(&args)
}

/// Images a test binary makes once and shares between its tests, in a scratch directory
/// kept as long as the process runs.
pub struct Shared<T> {
    name: &'static str,
    cell: std::sync::OnceLock<(Scratch, T)>,
}

impl<T> Shared<T> {
    /// Images to be made in a scratch directory named after `name`.
    pub const fn new(name: &'static str) -> Self {
        Shared {
            name,
            cell: std::sync::OnceLock::new(),
        }
    }

    /// The images, made by `make` on first use.
    pub fn get(&self, make: impl FnOnce(&Scratch) -> T) -> &T {
        &self
            .cell
            .get_or_init(|| {
                let dir = Scratch::new(self.name);
                let images = make(&dir);
                (dir, images)
            })
            .1
    }
}

/// A service base (64 MiB, the 5000-entry disk table, a NIC) and an overlay that loads a
/// 4 MiB model and writes entry 7 (`put:7:42`): the handoff tests' VM, made once per test
/// binary.
pub struct ServiceImages {
    /// The base directory.
    pub base: PathBuf,
    /// The overlay file.
    pub overlay: PathBuf,
}

impl ServiceImages {
    /// `vmm synthesize` of these images with control socket `sock`, no serial output, and
    /// the guest's service forwarded from host address `forward`.
    pub fn synthesize_args(&self, sock: &str, forward: &str) -> Vec<String> {
        let mut a: Vec<String> = ["synthesize", "--base", arg(&self.base), "--overlay"]
            .map(String::from)
            .to_vec();
        a.push(arg(&self.overlay).into());
        for x in ["--api-sock", sock, "--serial", "null", "--forward"] {
            a.push(x.into());
        }
        a.push(format!("{forward}=10.0.2.15:80"));
        a
    }
}

/// The [`ServiceImages`] of this test binary (made on first use).
pub fn service_images() -> &'static ServiceImages {
    static IMAGES: Shared<ServiceImages> = Shared::new("service-images");
    IMAGES.get(|dir| {
        let table = dir.write(
            "table.img",
            &micro_service::oracle::table_image(5000, 1 << 20),
        );
        let base = make_base(&dir.path("base"), "64", &["--disk", arg(&table), "--net"]);
        let overlay = dir.path("app.overlay");
        let fin = make_overlay(&base, "load:4,put:7:42", &overlay, &[]);
        assert_eq!(fin.code(), 0, "{fin:?}");
        ServiceImages { base, overlay }
    })
}

/// FNV-1a digest of a file's bytes.
pub fn file_digest(p: &Path) -> u64 {
    std::fs::read(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// The micro guest ELF built by `cargo xtask guest`.
pub fn micro_guest() -> PathBuf {
    require(
        workspace_root().join("target/guest/micro-guest"),
        "the micro guest",
    )
}

/// Debian's cloud kernel bzImage fetched by `cargo xtask fetch-linux`.
pub fn debian_bzimage() -> PathBuf {
    require(
        workspace_root().join("target/linux/vmlinuz"),
        "Debian's cloud kernel (cargo xtask fetch-linux)",
    )
}

/// The Linux service-VM base's parts made by `cargo xtask linux-base`: the kernel (ELF
/// vmlinux), the root filesystem image and the command line it boots with.
pub fn linux_base() -> (PathBuf, PathBuf, String) {
    let dir = workspace_root().join("target/linux-base");
    let what = "the Linux base (cargo xtask linux-base)";
    let cmdline = std::fs::read_to_string(require(dir.join("cmdline"), what)).expect("cmdline");
    (
        require(dir.join("vmlinux"), what),
        require(dir.join("rootfs.ext4"), what),
        cmdline,
    )
}

/// The Linux base's init and sample service (`cloudlet-init`) of this build profile, for
/// running on the host.
pub fn cloudlet_init_bin() -> PathBuf {
    require(
        profile_dir().join("cloudlet-init"),
        "the cloudlet-init binary",
    )
}

/// A fresh scratch directory under the target directory, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates `target/test-scratch/<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = workspace_root().join("target/test-scratch").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `vmm` whose stdout lines are collected on a thread; killed when dropped.
pub struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
}

/// What a finished `vmm` left behind.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Stdout lines.
    pub stdout: Vec<String>,
    /// Stderr text.
    pub stderr: String,
}

impl Finished {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("vmm was killed by a signal: {self:?}"))
    }
}

impl Vmm {
    /// Starts `vmm` with `args`, stdin piped.
    pub fn spawn<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_cmd(Command::new(vmm_bin()).args(args))
    }

    /// Starts a prepared command (stdio is set here).
    /// Spawns `cmd` (a vmm command line) with a report channel: one end of a socket pair,
    /// inherited by the child alone as `--report-fd N` (appended); returns the vmm and the
    /// other end, reading with timeout `t`.
    pub fn spawn_reporting(
        cmd: &mut Command,
        t: Duration,
    ) -> (Self, std::os::unix::net::UnixStream) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let fd = theirs.as_raw_fd();
        cmd.args(["--report-fd", &fd.to_string()]);
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the child's copy of
        // `fd` only, so no other process spawned meanwhile inherits it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let vm = Vmm::spawn_cmd(cmd);
        drop(theirs);
        ours.set_read_timeout(Some(t)).expect("a read timeout");
        (vm, ours)
    }

    pub fn spawn_cmd(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Vmm {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stderr: Some(stderr),
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a stdout line satisfying `pred` and returns it.
    pub fn expect_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no matching line within {timeout:?}; saw {:?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let fin = self.finish(Duration::from_secs(5));
                    panic!(
                        "vmm ended before the expected line: {fin:?}; saw {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Writes `text` to the guest's serial input.
    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(text.as_bytes())
            .expect("write to vmm stdin");
        stdin.flush().expect("flush vmm stdin");
    }

    /// Asks the guest for `stats` and then to power off with `code` (both on its console);
    /// checks the exit status and returns the `ok stats` line and what the VMM left.
    pub fn stats_and_poweroff(&mut self, code: u8, timeout: Duration) -> (String, Finished) {
        self.send(&format!("stats\npoweroff {code}\n"));
        let stats = self.expect_line(timeout, |l| l.starts_with("ok stats"));
        let fin = self.finish(timeout);
        assert_eq!(fin.code(), i32::from(code), "{fin:?}");
        (stats, fin)
    }

    /// Closes stdin.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to end (killing it after) and collects output.
    pub fn finish(&mut self, timeout: Duration) -> Finished {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait vmm") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let s = self.child.wait().expect("wait killed vmm");
                let mut stdout = std::mem::take(&mut self.seen);
                stdout.extend(self.lines.try_iter());
                panic!("vmm did not exit within {timeout:?} (killed: {s}); stdout {stdout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let mut stdout = std::mem::take(&mut self.seen);
        // The reader thread ends at EOF, shortly after exit.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            stdout.push(l);
        }
        Finished {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vmm` with `args` to completion (at most `timeout`), stdin closed.
pub fn run_vmm<I, S>(args: I, timeout: Duration) -> Finished
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut v = Vmm::spawn(args);
    v.close_stdin();
    v.finish(timeout)
}

/// `vmm snapshot` of the VM behind control socket `sock` into `out` (left paused if
/// `stay_paused`); panics unless it succeeds.
pub fn vmm_snapshot(sock: &str, out: &Path, stay_paused: bool, timeout: Duration) -> Finished {
    let out = out.display().to_string();
    let mut args = vec!["snapshot", "--api-sock", sock, "--out", &out];
    if stay_paused {
        args.push("--stay-paused");
    }
    let fin = run_vmm(args, timeout);
    assert_eq!(fin.code(), 0, "vmm snapshot: {fin:?}");
    fin
}

/// The first line of `vmm status` for the VM behind control socket `sock` (`running …`,
/// `paused …`).
pub fn vmm_status(sock: &str, timeout: Duration) -> String {
    let fin = run_vmm(["status", "--api-sock", sock], timeout);
    fin.stdout
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("vmm status printed nothing: {fin:?}"))
}

/// An error and its causes, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let causes = std::iter::successors(Some(e), |e| e.source());
    causes.map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
}

/// Requests to the guest's service for tests: a transport failure panics, naming the request
/// and the cause.
pub trait Ask {
    /// Sends `request` and returns its reply.
    fn ask(&mut self, request: &str) -> String;
}

impl Ask for micro_service::client::Client {
    fn ask(&mut self, request: &str) -> String {
        self.request(request)
            .unwrap_or_else(|e| panic!("request {request:?} failed: {}", error_chain(&e)))
    }
}

/// Load address of the tiny test kernels.
pub const TINY_BASE: u64 = 0x10_0000;

/// A minimal x86-64 ELF executable: one PT_LOAD segment at 1 MiB holding `code` (entry at its
/// first byte) and `memsz` bytes of memory (≥ `code.len()`).
pub fn tiny_elf_with_memsz(code: &[u8], memsz: u64) -> Vec<u8> {
    const OFF: usize = 0x1000;
    let mut img = Vec::new();
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    img.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    img.extend_from_slice(&[0; 8]);
    img.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    img.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    img.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    img.extend_from_slice(&TINY_BASE.to_le_bytes()); // e_entry
    img.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    img.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    img.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        img.extend_from_slice(&v.to_le_bytes());
    }
    // Program header: PT_LOAD, R+X.
    img.extend_from_slice(&1u32.to_le_bytes());
    img.extend_from_slice(&5u32.to_le_bytes());
    for v in [
        OFF as u64,
        TINY_BASE,
        TINY_BASE,
        code.len() as u64,
        memsz.max(code.len() as u64),
        0x1000,
    ] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    img.resize(OFF, 0);
    img.extend_from_slice(code);
    img
}

/// [`tiny_elf_with_memsz`] with memory size = code size.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    tiny_elf_with_memsz(code, code.len() as u64)
}

/// Machine code (64-bit, CPL0) that writes `text` to COM1 and powers off with `code`.
pub fn print_and_exit(text: &[u8], code: u8) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c.extend_from_slice(&[0x66, 0xba, 0x01, 0x05, 0xb0, code, 0xee]); // mov dx,0x501; mov al,code; out
    c.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    c
}

/// Fields of the synthetic bzImage, checked by the loader tests.
pub mod bz {
    /// Setup sectors after the boot sector.
    pub const SETUP_SECTS: u8 = 4;
    /// Boot protocol version 2.15.
    pub const VERSION: u16 = 0x020f;
    /// Highest initrd address the "kernel" accepts.
    pub const INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
    /// Kernel alignment.
    pub const KERNEL_ALIGNMENT: u32 = 0x20_0000;
}

/// A synthetic bzImage: boot sector + setup sectors with a real setup header ("HdrS",
/// protocol 2.15, LOADED_HIGH, XLF_KERNEL_64) followed by `payload` as the protected-mode
/// kernel.
pub fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_len = (usize::from(bz::SETUP_SECTS) + 1) * 512;
    let mut img = vec![0u8; setup_len];
    img[0x1f1] = bz::SETUP_SECTS;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes()); // boot_flag
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&bz::VERSION.to_le_bytes());
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&bz::INITRD_ADDR_MAX.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&bz::KERNEL_ALIGNMENT.to_le_bytes());
    img[0x234] = 1; // relocatable_kernel
    img[0x236..0x238].copy_from_slice(&0x0001u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img.extend_from_slice(payload);
    img
}
