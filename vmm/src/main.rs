//! `vmm`: boot a guest kernel under KVM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use format::control::{ApiRequest, ApiResponse, SynthesisTimes};
use vmm::config::{SerialOutput, VmConfig, DEFAULT_CMDLINE};
use vmm::control::{Control, ControlSocket, Reporter};
use vmm::exit::ExitReason;
use vmm::loader::{BootProtocol, KernelConfig};

/// A minimal KVM virtual machine monitor for the cloudlet appliance.
///
/// Exit status: the guest's power-off code (0–255) when it powers off through port 0x501;
/// 0 when it resets; 124 when it crashes (triple fault, instruction emulation failure, failed
/// VM entry — the registers are printed); 1 when the VMM itself fails (bad kernel, no KVM,
/// bad options); 128+N when stopped by signal N.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about)]
struct Cli {
    /// More logging on stderr (-v: timings and decisions, -vv: every unhandled exit).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel (ELF vmlinux, our micro guest, or bzImage) and run it until it stops.
    ///
    /// Example: vmm run --kernel micro-guest --cmdline 'micro.run=primes:1000000,poweroff:0'
    Run(RunArgs),
    /// Restore a snapshot (made by `vmm snapshot`) and run it until it stops.
    ///
    /// Example: vmm restore --snapshot /var/lib/cloudlet/snap
    Restore(RestoreArgs),
    /// Synthesise a service VM from a base image and an application overlay, and run it.
    ///
    /// Everything is checked before any vCPU runs (manifest, overlay index, every chunk's
    /// checksum, machine state); the base is never modified. By default the vCPUs start before
    /// the overlay is applied and its pages are filled on first touch (see --eager). With -v,
    /// prints where the time went.
    ///
    /// Example: vmm synthesize --base bases/micro --overlay apps/model.overlay
    Synthesize(SynthesizeArgs),
    /// Receive a running VM handed off by another appliance's vmm, and run it.
    ///
    /// Listens on --listen for exactly one connection (the listener closes then: a second
    /// one is refused), with --timeout-ms to connect and for each read. The stream must carry
    /// the session token given in the environment variable VMM_HANDOFF_TOKEN (64 hex digits;
    /// never on the command line, which other users can read) and the content id of --base;
    /// the VM's RAM and disk size must be the base's. The VM's pages, disk δ and machine
    /// state are applied over the base's RAM (mapped privately: the base is never written)
    /// and the VM is restored and started only once the source said Complete and every check
    /// passed; the source is then told it runs here (Resumed), and the VM is kept once the
    /// source closed the connection (it released its copy). Abandon instead, or no close
    /// within --timeout-ms, means the source kept its VM: it is stopped here.
    ///
    /// On any failure (refusal, link cut, stalled or corrupt stream, the source abandoning,
    /// a failed restore) nothing is kept: no VM runs, no file is left (--disk-delta,
    /// --api-sock, --serial FILE are created only at the restore, and removed if it fails),
    /// and the vmm exits with status 1.
    ///
    /// On --report-fd: Listening{addr} once bound (port 0 resolved; printed with -v), then
    /// Ready{forwards} (once the source let go) or Failed{kind, chain}, then Exited.
    ///
    /// Example: VMM_HANDOFF_TOKEN=… vmm receive --base bases/micro --listen 0.0.0.0:7070
    ///          --forward 0.0.0.0:8080=10.0.2.15:80
    Receive(ReceiveArgs),
    /// Snapshot a running VM through its control socket (`vmm run --api-sock`).
    ///
    /// Writes DIR/state and DIR/memory; the VM resumes afterwards unless --stay-paused.
    Snapshot(SnapshotArgs),
    /// Pause a running VM's vCPUs.
    Pause(ApiArgs),
    /// Resume a paused VM.
    Resume(ApiArgs),
    /// Show whether a VM is running or paused, its vCPUs and memory.
    Status(ApiArgs),
    /// Stop a VM (its vmm exits with status 0).
    Stop(ApiArgs),
    /// Hand a synthesised VM off to the `vmm receive` listening at --to (see
    /// format::handoff): the VM keeps running while its δ and dirtied pages stream, pauses for
    /// the last ones, and runs on the target afterwards; its vmm here then exits with status
    /// 0. On any failure the VM goes on here with all its state and this command fails.
    ///
    /// The session token the target's agent issued comes from the environment variable
    /// VMM_HANDOFF_TOKEN (64 hex digits), never the command line.
    ///
    /// Example: VMM_HANDOFF_TOKEN=… vmm handoff --api-sock vm.sock --to 10.0.0.2:7000
    Handoff(HandoffArgs),
    /// Write a service's RAM image: the base's memory with the overlay applied, beside the
    /// overlay (OVERLAY.ram, sparse, and OVERLAY.ram.id saying what it was made from).
    ///
    /// Every later `vmm synthesize` of this base and this very overlay file maps the image
    /// copy-on-write instead of applying the overlay: its instances share the image's clean
    /// pages (the δ decompressed once, not once per instance) and the synthesis applies
    /// nothing. An image that no longer matches (a rewritten overlay, another base) is
    /// ignored by synthesis and written again here; one that matches is kept (--force writes
    /// it anyway). Every chunk is checked as it is applied; the files are renamed into place.
    ///
    /// Example: vmm ram-image --base bases/micro --overlay services/model/app.overlay
    RamImage(RamImageArgs),
}

#[derive(clap::Args, Debug)]
struct RamImageArgs {
    /// Base image directory.
    #[arg(long, value_name = "DIR")]
    base: PathBuf,
    /// Application overlay.
    #[arg(long, value_name = "FILE")]
    overlay: PathBuf,
    /// Decompression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the image even when the one there is up to date.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args, Debug)]
struct HandoffArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The target vmm's listening address.
    #[arg(long, value_name = "IP:PORT")]
    to: String,
    /// The pause to aim for, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    downtime_ms: u32,
}

/// The environment variable that carries a handoff's session token.
const TOKEN_ENV: &str = "VMM_HANDOFF_TOKEN";

fn parse_token(hex: &str) -> anyhow::Result<[u8; 32]> {
    let hex = hex.trim();
    anyhow::ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{TOKEN_ENV} must be 64 hex digits"
    );
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

fn handoff(a: HandoffArgs) -> anyhow::Result<ExitReason> {
    let token = std::env::var(TOKEN_ENV)
        .with_context(|| format!("set {TOKEN_ENV} to the target's session token"))?;
    let req = ApiRequest::Handoff {
        to: a.to,
        token: parse_token(&token)?,
        downtime_ms: a.downtime_ms,
    };
    // A handoff over a slow link takes longer than a control request's usual timeout: wait
    // for its answer without one (the vmm answers when it has ended, either way).
    let reach = || -> Result<ApiResponse, format::control::ApiError> {
        let mut s = std::os::unix::net::UnixStream::connect(&a.api_sock)?;
        s.set_write_timeout(Some(format::control::IO_TIMEOUT))?;
        format::control::write_frame(&mut s, &req)?;
        format::control::read_frame(&mut s)?.map_err(format::control::ApiError::Version)
    };
    let resp = reach().with_context(|| {
        format!(
            "cannot reach the vmm at '{}' (is it running with --api-sock?)",
            a.api_sock.display()
        )
    })?;
    print_response(&req, resp)
}

#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
}

#[derive(clap::Args, Debug)]
struct SnapshotArgs {
    /// The VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Snapshot directory (created if needed; an existing snapshot there is replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Leave the VM paused after the snapshot.
    #[arg(long)]
    stay_paused: bool,
}

#[derive(clap::Args, Debug)]
struct SynthesizeArgs {
    /// Base image directory (from `image-builder base`).
    #[arg(long, value_name = "DIR")]
    base: PathBuf,
    /// Application overlay (from `image-builder overlay`).
    #[arg(long, value_name = "FILE")]
    overlay: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
    /// Start with the vCPUs paused (resume with `vmm resume`).
    #[arg(long)]
    paused: bool,
    /// Decompression threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Apply the whole overlay before the vCPUs start. By default they start at once and the
    /// pages the overlay rewrites are filled on first touch (userfaultfd; needs root) while
    /// the rest is filled in the background.
    #[arg(long)]
    eager: bool,
    /// Test knob: delay the background fill by this many milliseconds.
    #[arg(long, hide = true, default_value_t = 0)]
    prefetch_delay_ms: u64,
}

#[derive(clap::Args, Debug)]
struct ReceiveArgs {
    /// Base image directory: the base the source's VM was made from (the stream names its
    /// content id).
    #[arg(long, value_name = "DIR")]
    base: PathBuf,
    /// Where to listen for the source, e.g. 0.0.0.0:7070 (port 0: any free port).
    #[arg(long, value_name = "IP:PORT")]
    listen: std::net::SocketAddr,
    /// How long to wait for the source to connect, and for each read of its stream, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    timeout_ms: u64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long, value_name = "DIR")]
    snapshot: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
    /// Start with the vCPUs paused (resume with `vmm resume`).
    #[arg(long)]
    paused: bool,
}

/// Options of every command that runs a VM.
#[derive(clap::Args, Debug)]
struct CommonArgs {
    /// Where the guest's serial console (COM1) goes: `stdout`, `null`, or a file path. A
    /// virtio console (`run --console`, or one in the snapshot) writes there too.
    #[arg(long, value_name = "stdout|null|FILE", default_value = "stdout")]
    serial: String,
    /// Do not connect standard input to the guest (its serial console, or its virtio console
    /// when it has one).
    #[arg(long)]
    no_stdin: bool,
    /// Serve the control API (pause, resume, snapshot, status, stop) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Report to a supervisor on this inherited file descriptor (e.g. one end of a socket
    /// pair): one frame once the VM runs and --api-sock and the forwards listen (synthesis
    /// timings, each forward's bound address: host port 0 is resolved), or why it could not
    /// start (the error's causes and a kind such as "address in use"); after that, one when
    /// the VM has stopped. The descriptor stays open until the vmm exits, so the supervisor
    /// sees end of file then. Frames: format::control. 0 (standard input) needs --no-stdin.
    #[arg(long, value_name = "FD")]
    report_fd: Option<i32>,
    /// KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,
    /// Run without the per-thread seccomp filters (for debugging: by default each vmm
    /// thread may make only the system calls it needs, and any other kills the vmm with
    /// SIGSYS).
    #[arg(long)]
    no_seccomp: bool,
    /// Confine what this vmm writes to DIR (the agent passes the instance's directory):
    /// --api-sock, --serial FILE and --disk-delta must lie inside it, and a control request
    /// for a snapshot outside it is refused. Paths are resolved first (`..`, symbolic links).
    #[arg(long, value_name = "DIR")]
    confine: Option<PathBuf>,
    /// Run jailed as user UID and group GID (needs root and --confine DIR, the instance's
    /// directory): before anything else the vmm enters its own mount, pid and IPC
    /// namespaces, whose root holds only DIR (read-write, handed to UID), what this command
    /// reads (the base, the overlay's directory, a disk: read-only) and its device nodes
    /// (/dev/kvm, /dev/userfaultfd, /dev/net/tun for --tap), then becomes UID:GID with no
    /// capability left. See vmm::jail.
    #[arg(long, value_name = "UID:GID", value_parser = parse_ids, requires = "confine")]
    jail: Option<(u32, u32)>,
    /// Join this cgroup first (by its cgroup.procs file, or its tasks file in cgroup v1: the
    /// vmm writes 0 there while it has one thread), so everything the VM allocates is charged
    /// there. Repeatable (one per cgroup v1 hierarchy).
    #[arg(long, value_name = "FILE")]
    cgroup: Vec<PathBuf>,
    /// A virtio disk on this raw image. The image is opened read-only and never written: the
    /// guest's writes go to a copy-on-write δ (in memory, or --disk-delta).
    #[arg(long, value_name = "FILE", help_heading = "Devices")]
    disk: Option<PathBuf>,
    /// A blank virtio disk of this many MiB (when there is no --disk).
    #[arg(long, value_name = "MIB", help_heading = "Devices")]
    disk_size_mib: Option<u64>,
    /// Keep the disk's δ in this file (created, or reused when it exists).
    #[arg(long, value_name = "FILE", help_heading = "Devices")]
    disk_delta: Option<PathBuf>,
    /// The guest may not write its disk.
    #[arg(long, help_heading = "Devices")]
    disk_read_only: bool,
    /// A virtio NIC with user-mode networking (no root needed): the VMM is the guest's
    /// gateway (10.0.2.2; the guest is 10.0.2.15) and NATs its outbound TCP and UDP.
    #[arg(long, help_heading = "Devices")]
    net: bool,
    /// Forward a host TCP port to the guest (implies --net), e.g.
    /// `127.0.0.1:8080=10.0.2.15:80`; host port 0 picks a free one (logged, and reported
    /// on --report-fd). Repeatable.
    #[arg(long, value_name = "HOST:PORT=GUEST:PORT", help_heading = "Devices")]
    forward: Vec<String>,
    /// A virtio NIC on this TAP device instead of user-mode networking (needs CAP_NET_ADMIN
    /// or a persistent TAP owned by the caller).
    #[arg(long, value_name = "NAME", help_heading = "Devices", conflicts_with_all = ["net", "forward"])]
    tap: Option<String>,
    /// The NIC's MAC address.
    #[arg(long, value_name = "MAC", help_heading = "Devices", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
}

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("'{s}' is not UID:GID (two numbers, e.g. 1500000001:1500000001)");
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    let (u, g) = (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
    if u == 0 || g == 0 {
        return Err(format!("'{s}': a jail runs as a user other than root"));
    }
    Ok((u, g))
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("'{s}' is not a MAC address like 52:54:00:12:34:56"));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("'{s}' is not a MAC address"))?;
    }
    Ok(mac)
}

impl CommonArgs {
    /// The virtio devices the flags ask for.
    fn devices(&self) -> vmm::config::DevicesConfig {
        use vmm::config::{DiskConfig, NetBackendConfig, NetConfig, DEFAULT_MAC};
        let disk =
            (self.disk.is_some() || self.disk_size_mib.is_some() || self.disk_delta.is_some())
                .then(|| DiskConfig {
                    base: self.disk.clone(),
                    size: self.disk_size_mib.unwrap_or(0) << 20,
                    delta: self.disk_delta.clone(),
                    read_only: self.disk_read_only,
                });
        let backend = match (&self.tap, self.net || !self.forward.is_empty()) {
            (Some(t), _) => Some(NetBackendConfig::Tap(t.clone())),
            (None, true) => Some(NetBackendConfig::User {
                forwards: self.forward.clone(),
            }),
            (None, false) => None,
        };
        vmm::config::DevicesConfig {
            disk,
            net: backend.map(|backend| NetConfig {
                backend,
                mac: self.mac.unwrap_or(DEFAULT_MAC),
            }),
            // `run --console`; a restored VM has the console of its snapshot.
            console: false,
        }
    }

    fn serial(&self) -> SerialOutput {
        match self.serial.as_str() {
            "stdout" => SerialOutput::Stdout,
            "null" => SerialOutput::Null,
            path => SerialOutput::File(path.into()),
        }
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kernel image: an x86-64 ELF (entered through the Linux 64-bit boot protocol, or PVH
    /// with --boot pvh) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low memory.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB (memory beyond 3 GiB is placed above 4 GiB).
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    #[command(flatten)]
    common: CommonArgs,
    /// Give the guest a virtio console and connect standard input/output to it instead of the
    /// serial port (far fewer VM exits per byte)
    #[arg(long, help_heading = "Devices")]
    console: bool,
    /// Entry protocol: `linux` (64-bit boot protocol) or `pvh` (32-bit PVH entry from the
    /// ELF note, as QEMU and Firecracker use).
    #[arg(long, value_enum, default_value_t = Boot::Linux)]
    boot: Boot,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Boot {
    Linux,
    Pvh,
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<ExitReason> {
    let serial = args.common.serial();
    let kernel = KernelConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        protocol: match args.boot {
            Boot::Linux => BootProtocol::Linux,
            Boot::Pvh => BootProtocol::Pvh,
        },
    };
    let common = &args.common;
    let reads: Vec<PathBuf> = std::iter::once(kernel.kernel.clone())
        .chain(kernel.initrd.clone())
        .collect();
    launch(common, &reads, || {
        let mut cfg = VmConfig::new(kernel, args.mem, args.vcpus, serial, !common.no_stdin)?;
        cfg.kvm_path = common.kvm_device.clone();
        cfg.devices = common.devices();
        cfg.devices.console = args.console;
        let machine = vmm::builder::build_for_boot(&cfg).context("failed to start the VM")?;
        Ok((machine, None))
    })
}

/// Opens the report channel (`--report-fd`) and the control socket, builds the machine with
/// `build` (which may return synthesis timings), reports ready (or why it could not start)
/// and runs the machine until it stops. The socket is bound before the build, so that Ready
/// follows the vCPUs' start without waiting for it. `reads`: what the command reads (bound
/// read-only into a --jail).
fn launch(
    common: &CommonArgs,
    reads: &[PathBuf],
    build: impl FnOnce() -> anyhow::Result<(vmm::machine::Machine, Option<SynthesisTimes>)>,
) -> anyhow::Result<ExitReason> {
    let mut report = open_report(common)?;
    if let Err(e) = lock_down(common, reads) {
        return Err(report_failure(&mut report, e));
    }
    launch_with(common, report, build)
}

/// Joins --cgroup, sets the process's restrictions (no_new_privs, no core dumps, a
/// descriptor limit: see vmm::limits), enters --jail (see vmm::jail; `reads` are bound
/// read-only), checks the outputs against --confine, and turns the seccomp filters on
/// (unless --no-seccomp): each thread installs its own before the guest runs.
fn lock_down(common: &CommonArgs, reads: &[PathBuf]) -> anyhow::Result<()> {
    vmm::jail::join_cgroups(&common.cgroup)?;
    vmm::limits::restrict_process()?;
    if let (Some((uid, gid)), Some(dir)) = (common.jail, &common.confine) {
        let probe = vmm::jail::probe_list();
        let mut devices = vec![common.kvm_device.clone()];
        if std::path::Path::new(vmm::synthesis::uffd::DEVICE).exists() {
            devices.push(vmm::synthesis::uffd::DEVICE.into());
        }
        if common.tap.is_some() {
            devices.push("/dev/net/tun".into());
        }
        let t0 = std::time::Instant::now();
        let mut read_only = reads.to_vec();
        read_only.extend(common.disk.iter().cloned());
        vmm::jail::enter(&vmm::jail::JailSpec {
            uid,
            gid,
            dir: dir.clone(),
            read_only,
            devices,
            tap: common.tap.clone(),
        })
        .context("cannot enter the vmm's jail")?;
        tracing::debug!(
            us = t0.elapsed().as_micros() as u64,
            uid,
            "entered the jail"
        );
        if let Some(paths) = probe {
            vmm::jail::probe(&paths, dir);
        }
    }
    if let Some(c) = confinement(common)? {
        let serial = match common.serial() {
            SerialOutput::File(p) => Some(p),
            _ => None,
        };
        for p in [
            common.api_sock.as_ref(),
            serial.as_ref(),
            common.disk_delta.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            c.check(p)?;
        }
    }
    if !common.no_seccomp {
        vmm::seccomp::enable().context("cannot set up the seccomp filters")?;
    }
    Ok(())
}

/// The directory of --confine, if any.
fn confinement(common: &CommonArgs) -> anyhow::Result<Option<vmm::confine::Confine>> {
    Ok(common
        .confine
        .as_deref()
        .map(vmm::confine::Confine::new)
        .transpose()?)
}

/// Reports `e` on the report channel, if there is one; returns it.
fn report_failure(report: &mut Option<Reporter>, e: anyhow::Error) -> anyhow::Error {
    if let Some(r) = report {
        if let Err(re) = r.failed(e.as_ref()) {
            tracing::warn!("{re}");
        }
    }
    e
}

/// The report channel named by `--report-fd`, if any.
fn open_report(common: &CommonArgs) -> anyhow::Result<Option<Reporter>> {
    if common.report_fd == Some(0) && !common.no_stdin {
        anyhow::bail!("--report-fd 0 makes standard input the report channel: add --no-stdin");
    }
    Ok(common.report_fd.map(Reporter::from_fd).transpose()?)
}

/// [`launch`] with the report channel already open.
fn launch_with(
    common: &CommonArgs,
    mut report: Option<Reporter>,
    build: impl FnOnce() -> anyhow::Result<(vmm::machine::Machine, Option<SynthesisTimes>)>,
) -> anyhow::Result<ExitReason> {
    let confine = match confinement(common) {
        Ok(c) => c,
        Err(e) => return Err(report_failure(&mut report, e)),
    };
    let started = common
        .api_sock
        .as_deref()
        .map(ControlSocket::bind)
        .transpose()
        .map_err(anyhow::Error::from)
        .and_then(|socket| Ok((build()?, socket)));
    let ((machine, synthesis), mut socket) = match started {
        Ok(s) => s,
        Err(e) => return Err(report_failure(&mut report, e)),
    };
    if let (Some(s), Some(c)) = (&mut socket, confine) {
        s.confine_to(c);
    }
    if let Some(r) = &mut report {
        if let Err(e) = r.ready(synthesis, &machine.forwards()) {
            tracing::warn!("{e}");
        }
    }
    if std::env::var_os(vmm::limits::MEMORY_SELFTEST_ENV).is_some() {
        vmm::limits::exhaust_memory();
    }
    let mut control = Control { socket, report };
    machine
        .run(&mut control)
        .context("the VMM event loop failed")
}

/// The directory of an overlay file (its shared RAM image and verification record lie beside
/// it).
fn overlay_dir(overlay: &std::path::Path) -> PathBuf {
    match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn synthesize(args: SynthesizeArgs, verbose: bool) -> anyhow::Result<ExitReason> {
    let mut lazy_stats = None;
    let reads = [args.base.clone(), overlay_dir(&args.overlay)];
    let reason = launch(&args.common, &reads, || {
        let t0 = std::time::Instant::now();
        let cfg = vmm::builder::SynthesisConfig {
            base: args.base.clone(),
            overlay: args.overlay.clone(),
            serial: args.common.serial(),
            serial_input: !args.common.no_stdin,
            paused: args.paused,
            kvm_path: args.common.kvm_device.clone(),
            devices: args.common.devices(),
            threads: args.threads,
            lazy: !args.eager,
            prefetch_delay: std::time::Duration::from_millis(args.prefetch_delay_ms),
        };
        let (machine, t, restore) = vmm::builder::build_from_overlay(&cfg).with_context(|| {
            format!(
                "failed to synthesise a VM from base '{}' and overlay '{}'",
                args.base.display(),
                args.overlay.display()
            )
        })?;
        let total = t0.elapsed();
        lazy_stats = machine.lazy().map(|l| l.stats());
        if verbose {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "vmm: synthesised in {:.2} ms: check {:.2}, verify {:.2}{}, map {} {:.2}, {} {:.2} ({} chunks, {:.1} MiB), restore+start {:.2}",
                ms(total),
                ms(t.check),
                ms(t.verify),
                if t.verified_before { " (verified before)" } else { "" },
                if t.shared { "shared RAM image" } else { "base" },
                ms(t.map),
                if t.lazy { "lazy fill start" } else { "apply" },
                ms(t.apply),
                t.chunks,
                t.data_bytes as f64 / (1 << 20) as f64,
                ms(restore)
            );
        }
        let us = |d: std::time::Duration| d.as_micros() as u64;
        let times = SynthesisTimes {
            total_us: us(total),
            check_us: us(t.check),
            verify_us: us(t.verify),
            verified_before: t.verified_before,
            map_us: us(t.map),
            apply_us: us(t.apply),
            lazy: t.lazy,
            shared: t.shared,
            chunks: t.chunks as u64,
            data_bytes: t.data_bytes,
            restore_us: us(restore),
        };
        Ok((machine, Some(times)))
    });
    if let (true, Some(s)) = (verbose, lazy_stats) {
        use std::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "vmm: lazy fill: {} faults served in {:.2} ms ({} chunks), {} chunks prefetched, complete after {:.2} ms",
            s.faults.load(Relaxed),
            s.fault_us.load(Relaxed) as f64 / 1e3,
            s.fault_chunks.load(Relaxed),
            s.prefetch_chunks.load(Relaxed),
            s.complete_us.load(Relaxed) as f64 / 1e3,
        );
    }
    reason
}

fn restore(args: RestoreArgs) -> anyhow::Result<ExitReason> {
    let cfg = vmm::builder::RestoreConfig {
        snapshot: args.snapshot.clone(),
        serial: args.common.serial(),
        serial_input: !args.common.no_stdin,
        paused: args.paused,
        kvm_path: args.common.kvm_device.clone(),
        devices: args.common.devices(),
    };
    launch(&args.common, std::slice::from_ref(&args.snapshot), || {
        let machine = vmm::builder::build_from_snapshot(&cfg).with_context(|| {
            format!(
                "failed to restore the snapshot in '{}'",
                args.snapshot.display()
            )
        })?;
        Ok((machine, None))
    })
}

/// The environment variable holding a handoff's session token.
const TOKEN_VAR: &str = "VMM_HANDOFF_TOKEN";

/// The session token from the environment: 32 bytes as 64 hex digits.
fn handoff_token() -> anyhow::Result<[u8; 32]> {
    let hex = std::env::var(TOKEN_VAR).map_err(|_| {
        anyhow::anyhow!(
            "{TOKEN_VAR} is not set: a handoff needs the session token (64 hex digits) in the \
             environment"
        )
    })?;
    let hex = hex.trim().as_bytes();
    let mut token = [0u8; 32];
    let digit = |c: u8| (c as char).to_digit(16);
    if hex.len() != 64 {
        anyhow::bail!("{TOKEN_VAR} is not 64 hex digits");
    }
    for (b, pair) in token.iter_mut().zip(hex.chunks_exact(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => *b = (h * 16 + l) as u8,
            _ => anyhow::bail!("{TOKEN_VAR} is not 64 hex digits"),
        }
    }
    Ok(token)
}

/// Files a received VM creates at its restore, removed unless the restore succeeded.
struct Leftovers {
    paths: Vec<PathBuf>,
    keep: bool,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !self.keep {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Checks that the files `vmm receive` would create do not exist yet (a failed handoff
/// removes them, and must not remove anyone else's).
fn receive_outputs(common: &CommonArgs) -> anyhow::Result<Leftovers> {
    let mut paths = Vec::new();
    for (p, what) in [
        (common.disk_delta.as_ref(), "--disk-delta"),
        (common.api_sock.as_ref(), "--api-sock"),
    ] {
        if let Some(p) = p {
            anyhow::ensure!(
                !p.exists(),
                "{what} '{}' exists: a received VM starts from what the source sent; choose a \
                 path that does not exist",
                p.display()
            );
            paths.push(p.clone());
        }
    }
    if let SerialOutput::File(p) = common.serial() {
        if !p.exists() {
            paths.push(p);
        }
    }
    Ok(Leftovers { paths, keep: false })
}

fn receive(args: ReceiveArgs, verbose: bool) -> anyhow::Result<ExitReason> {
    use vmm::handoff::receive::{ReceiveConfig, Received, Receiver};
    let mut report = open_report(&args.common)?;
    let mut leftovers = None;
    let received = (|| -> anyhow::Result<Received> {
        lock_down(&args.common, std::slice::from_ref(&args.base))?;
        let token = handoff_token()?;
        leftovers = Some(receive_outputs(&args.common)?);
        let receiver = Receiver::bind(ReceiveConfig {
            base: args.base.clone(),
            listen: args.listen,
            token,
            timeout: std::time::Duration::from_millis(args.timeout_ms),
            kvm_path: args.common.kvm_device.clone(),
        })?;
        let addr = receiver.local_addr();
        if verbose {
            eprintln!("vmm: listening for a handoff on {addr}");
        }
        if let Some(r) = &mut report {
            r.listening(addr)?;
        }
        Ok(receiver.receive()?)
    })()
    .context("failed to receive a handoff");
    let Received {
        incoming,
        link,
        stats,
    } = match received {
        Ok(r) => r,
        Err(e) => return Err(report_failure(&mut report, e)),
    };
    let mut leftovers = leftovers.expect("set before receiving");
    let completed = incoming.completed;
    let cfg = vmm::builder::HandoffConfig {
        serial: args.common.serial(),
        serial_input: !args.common.no_stdin,
        devices: args.common.devices(),
    };
    let kept = &mut leftovers.keep;
    launch_with(&args.common, report, move || {
        let mut machine = match vmm::builder::build_from_handoff(incoming, &cfg) {
            Ok(m) => m,
            Err(e) => {
                link.failed(&e);
                return Err(anyhow::Error::from(e).context("failed to restore the handed-off VM"));
            }
        };
        let restore = completed.elapsed();
        if let Err(e) = link.resumed(restore.as_micros() as u64) {
            machine.shutdown();
            return Err(anyhow::Error::from(e)
                .context("the VM ran here but the source kept it; stopped it here"));
        }
        *kept = true;
        if verbose {
            eprintln!(
                "vmm: received a handoff: {} pages in {} batches, {} disk blocks, {:.2} MiB in {:.1} ms; restored and running in {:.2} ms",
                stats.pages,
                stats.page_batches,
                stats.disk_blocks,
                stats.bytes as f64 / (1 << 20) as f64,
                stats.elapsed.as_secs_f64() * 1e3,
                restore.as_secs_f64() * 1e3
            );
        }
        tracing::debug!(
            restore_us = restore.as_micros() as u64,
            "handed-off VM running"
        );
        Ok((machine, None))
    })
}

fn snapshot(a: SnapshotArgs) -> anyhow::Result<ExitReason> {
    // The vmm may run in another directory: send an absolute path.
    let dir = std::path::absolute(&a.out).context("invalid --out path")?;
    control(
        &a.api_sock,
        ApiRequest::Snapshot {
            dir: dir.display().to_string(),
            resume: !a.stay_paused,
        },
    )
}

/// Sends one control request and prints the answer; fails on an error answer.
fn control(sock: &std::path::Path, req: ApiRequest) -> anyhow::Result<ExitReason> {
    let resp = format::control::request(sock, &req).with_context(|| {
        format!(
            "cannot reach the vmm at '{}' (is it running with --api-sock?)",
            sock.display()
        )
    })?;
    print_response(&req, resp)
}

/// Prints a control answer; fails on an error answer.
fn print_response(req: &ApiRequest, resp: ApiResponse) -> anyhow::Result<ExitReason> {
    let name = match req {
        ApiRequest::Handoff { to, .. } => format!("the handoff to {to}"),
        other => format!("{other:?}"),
    };
    match resp {
        ApiResponse::Error(msg) => anyhow::bail!("the vmm refused {name}: {msg}"),
        ApiResponse::Ok => println!("ok"),
        ApiResponse::Status { paused, vcpus, mem_mib } => println!(
            "{} vcpus={vcpus} mem_mib={mem_mib}",
            if paused { "paused" } else { "running" }
        ),
        ApiResponse::Snapshot { state_bytes, memory_bytes_written, paused_us } => println!(
            "snapshot written: state {state_bytes} B, memory {:.1} MiB non-zero, VM paused {:.2} ms",
            memory_bytes_written as f64 / (1 << 20) as f64,
            paused_us as f64 / 1e3
        ),
        ApiResponse::HandedOff(s) => println!(
            "handed off: {} rounds, {:.2} MiB, downtime {:.2} ms, total {:.1} ms",
            s.rounds,
            s.bytes as f64 / (1 << 20) as f64,
            s.downtime_us as f64 / 1e3,
            s.total_us as f64 / 1e3
        ),
    }
    Ok(ExitReason::Stopped)
}

fn ram_image(a: RamImageArgs) -> anyhow::Result<ExitReason> {
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let w = vmm::synthesis::shared::write(&a.base, &a.overlay, threads, a.force).with_context(
        || {
            format!(
                "failed to write the RAM image of base '{}' and overlay '{}'",
                a.base.display(),
                a.overlay.display()
            )
        },
    )?;
    if w.up_to_date {
        println!(
            "RAM image {} is up to date (--force writes it again)",
            format::ram_image::image_path(&a.overlay).display()
        );
        return Ok(ExitReason::Stopped);
    }
    println!(
        "RAM image {}: {} MiB of RAM, {:.2} MiB of data, written in {:.0} ms",
        format::ram_image::image_path(&a.overlay).display(),
        w.ram_bytes >> 20,
        w.data_bytes as f64 / f64::from(1 << 20),
        w.took.as_secs_f64() * 1e3
    );
    Ok(ExitReason::Stopped)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Synthesize(args) => synthesize(args, cli.verbose > 0),
        Command::Receive(args) => receive(args, cli.verbose > 0),
        Command::Snapshot(a) => snapshot(a),
        Command::Pause(a) => control(&a.api_sock, ApiRequest::Pause),
        Command::Resume(a) => control(&a.api_sock, ApiRequest::Resume),
        Command::Status(a) => control(&a.api_sock, ApiRequest::Status),
        Command::Stop(a) => control(&a.api_sock, ApiRequest::Stop),
        Command::Handoff(a) => handoff(a),
        Command::RamImage(a) => ram_image(a),
    };
    match result {
        Ok(reason) => {
            match &reason {
                ExitReason::Crashed(msg) => eprintln!("vmm: guest crashed: {msg}"),
                ExitReason::Error(msg) => eprintln!("vmm: error while running the guest: {msg}"),
                other => tracing::debug!(?other, "VM stopped"),
            }
            ExitCode::from(reason.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
