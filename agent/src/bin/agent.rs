//! `agent`: the cloudlet appliance daemon, and the commands that stage its data.

use std::path::PathBuf;

use agent::auth::{random_secret, read_secret_file, PeerStore, TOKEN_ENV};
use agent::board::Board;
use agent::daemon::{default_vmm, Options};
use agent::devices::DeviceStore;
use agent::store::Store;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// The cloudlet appliance agent.
///
/// Announces the appliance over mDNS (_cloudlet._tcp), serves the client API (/v1/...,
/// described at /v1/openapi.json) and the web manager (/), and synthesises service VMs with
/// `vmm synthesize` on request. Without a subcommand it runs the daemon.
///
/// The operator token is never given on the command line: it is the environment variable
/// CLOUDLET_TOKEN, or the file --token-file names (mode 0600), or DATA_DIR/operator.token,
/// which the agent makes (mode 0600, random) on first start.
///
/// Examples:
///   agent --board dev --data-dir /tmp/cl              # run with the embedded dev board
///   agent stage-base micro --from base/ --data-dir /tmp/cl
///   agent stage-service model --overlay app.overlay --data-dir /tmp/cl
///   agent add-peer 0123456789ab --name hall-b --fingerprint 3f2a… --data-dir /tmp/cl   # prints a new secret
///   agent devices --data-dir /tmp/cl                  # the paired devices
///   agent revoke phone-1 --data-dir /tmp/cl           # revoke one (401 from its next request)
///   agent pair --window 5m --data-dir /tmp/cl          # let phones pair for 5 minutes
#[derive(Parser, Debug)]
#[command(name = "agent", version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// The vmm binary (default: `vmm` next to this executable).
    #[arg(long, global = true)]
    vmm: Option<PathBuf>,
    /// The image-builder binary, which builds service versions on the appliance (default:
    /// `image-builder` next to this executable).
    #[arg(long)]
    image_builder: Option<PathBuf>,
    /// Stop every instance when the agent exits (by default they keep running and the next
    /// agent re-adopts them).
    #[arg(long)]
    stop_on_exit: bool,
    /// Keep no warm standbys. By default, after each start of a service the agent synthesises
    /// the next instance of it ahead of need (on the service's shared RAM image), checks it
    /// with one `health` request and keeps it idle, so the next start only hands it out; a
    /// standby holds a slot of the board's limits and gives it up to any start that needs it.
    #[arg(long)]
    no_warm_standby: bool,
    /// DEBUGGING ONLY: start vmms unjailed (as root, in the agent's namespaces, no user of
    /// their own). By default every vmm runs as a user of its own in mount, pid and IPC
    /// namespaces of its own whose root holds only its instance directory, the base and
    /// overlay it reads (read-only) and its device nodes. Seccomp filters, --confine and the
    /// cgroup limits stay on.
    #[arg(long)]
    no_jail: bool,
    /// DEBUGGING ONLY: no cgroups (the board's cpus and memory are then only accounted by
    /// the agent, not enforced by the kernel; by default each VM runs in a cgroup of its own
    /// inside the appliance's).
    #[arg(long)]
    no_cgroups: bool,
    /// Read the kernel command line and boot entries from DIR/cmdline and DIR/entries/
    /// instead of /proc/cmdline and the ESP (tests of updates off an appliance image).
    #[arg(long, hide = true, value_name = "DIR")]
    boot_info_dir: Option<PathBuf>,
    /// Log filter level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// A shipped board config by name (dev, minipc-4c); dev is the default.
    #[arg(long, global = true, conflicts_with = "config")]
    board: Option<String>,
    /// A board config file (TOML, see board-configs/).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Override the board's data directory.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Override the board's API port (0 = pick a free one).
    #[arg(long, global = true)]
    port: Option<u16>,
    /// A file holding the operator token (mode 0600; default DATA_DIR/operator.token, made
    /// on first start). The environment variable CLOUDLET_TOKEN takes precedence.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Turn mDNS discovery off whatever the board says.
    #[arg(long, global = true)]
    no_discovery: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check a board config and print what it means.
    CheckConfig,
    /// Copy a base image directory (from `image-builder base`) into DATA/bases/NAME.
    StageBase {
        /// Base name.
        name: String,
        /// The base directory.
        #[arg(long)]
        from: PathBuf,
    },
    /// Verify an overlay (it must apply to a staged base) and install it as service NAME.
    StageService {
        /// Service name.
        name: String,
        /// The overlay file (from `image-builder overlay`).
        #[arg(long)]
        overlay: PathBuf,
        /// A description for the catalogue.
        #[arg(long)]
        description: Option<String>,
    },
    /// Trust appliance ID (12 hex digits, its `GET /v1/system` id) for VM handoff, in both
    /// directions, with a shared secret: run it on both appliances, each with the other's
    /// id and the same secret. Without --secret-file a new one is made and printed.
    AddPeer {
        /// The other appliance's id.
        id: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// A file (mode 0600) holding the shared secret (at least 16 characters); a secret
        /// is made when absent. Never on the command line itself.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// The other appliance's certificate fingerprint (its `GET /v1/system` →
        /// `fingerprint`, or its start-up line): needed to hand off to it over HTTPS, which
        /// is pinned to it.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// List the paired devices (from DATA/devices.json).
    Devices,
    /// Revoke a paired device's credential: it gets 401 from its next request on, also
    /// while the agent runs.
    Revoke {
        /// The device id (as `agent devices` shows it).
        id: String,
    },
    /// Open the running agent's pairing window (through its API, with the operator token):
    /// for its duration phones pair over USB, and one device may claim a credential with the
    /// QR code printed here. Prints the confirmation code a pairing phone shows too.
    Pair {
        /// How long: "300", "90s", "5m", "1h" (at most 1 h).
        #[arg(long, default_value = "5m", conflicts_with = "close")]
        window: String,
        /// Close the window instead.
        #[arg(long)]
        close: bool,
    },
    /// Add a client app (a file phones may download) to the app store.
    StageApp {
        /// App name.
        name: String,
        /// The file.
        #[arg(long)]
        file: PathBuf,
        /// Version string.
        #[arg(long, default_value = "1.0")]
        version: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// The service the app uses.
        #[arg(long)]
        service: Option<String>,
    },
}

/// "300", "90s", "5m", "1h" as seconds.
fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a duration (e.g. 300, 90s, 5m, 1h)"))?;
    Ok(n.saturating_mul(mult))
}

/// `agent pair`: talks to the agent running on this data directory, with the operator
/// token (`token_file`, CLOUDLET_TOKEN or DATA/operator.token), its certificate pinned when
/// it serves HTTPS.
fn pair(
    board: &Board,
    token_file: Option<&std::path::Path>,
    window: &str,
    close: bool,
) -> Result<()> {
    let url_file = board.data_dir.join("api.url");
    let urls = std::fs::read_to_string(&url_file).with_context(|| {
        format!(
            "no agent is running on {} (no {}): start it first",
            board.data_dir.display(),
            url_file.display()
        )
    })?;
    let url = urls.lines().next().unwrap_or_default().trim().to_string();
    let (token, _) =
        agent::auth::operator_token(std::env::var(TOKEN_ENV).ok(), token_file, &board.data_dir)?;
    let client = if url.starts_with("https://") {
        let cert = agent::tls::ApplianceCert::load_or_create(
            &board.data_dir,
            &std::fs::read_to_string(board.data_dir.join("agent.id"))?,
        )?;
        agent::client::Client::pinned(&url, Some(&token), cert.fingerprint())
    } else {
        agent::client::Client::new(&url, Some(&token))
    };
    let r = if close {
        client.raw("DELETE", "/v1/pairing/window", None, true)?
    } else {
        let body = serde_json::json!({ "duration_s": parse_duration(window)? }).to_string();
        client.raw("POST", "/v1/pairing/window", Some(body.as_bytes()), true)?
    };
    let v = r.json();
    if r.status != 200 {
        anyhow::bail!(
            "the agent refused ({}): {} ({})",
            r.status,
            v["error"].as_str().unwrap_or(&r.body),
            v["hint"].as_str().unwrap_or("")
        );
    }
    let w: agent::pairing::WindowView =
        serde_json::from_value(v).context("unexpected answer from the agent")?;
    if !w.open {
        println!("pairing window closed");
        return Ok(());
    }
    let payload = w.qr_payload.unwrap_or_default();
    if let Ok(qr) = agent::pairing::QrPayload::parse(&payload) {
        if let Ok(t) = qr.text() {
            println!("{t}");
        }
    }
    println!(
        "pairing window open for {} s\n  confirmation code: {}\n  claim code:        {}\n  QR payload:        {payload}\nPlug a phone in (USB), or scan the QR code; the phone shows the same confirmation code.",
        w.expires_in_s,
        w.confirmation_code.unwrap_or_default(),
        w.claim_code.unwrap_or_default(),
    );
    Ok(())
}

fn load_board(c: &ConfigArgs) -> Result<Board> {
    let mut b = match (&c.config, &c.board) {
        (Some(p), _) => Board::load(p)?,
        (None, Some(n)) => Board::shipped(n)?,
        (None, None) => Board::shipped("dev")?,
    };
    if let Some(d) = &c.data_dir {
        b.data_dir = d.clone();
    }
    if let Some(p) = c.port {
        b.port = p;
    }
    if c.no_discovery {
        b.discovery = false;
    }
    Ok(b)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let level = cli
        .log
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let board = load_board(&cli.cfg)?;
    let store = || {
        Store::open(&board.data_dir).with_context(|| {
            format!(
                "cannot open the data directory {}",
                board.data_dir.display()
            )
        })
    };
    match cli.cmd {
        None => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(8)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(agent::daemon::run(Options {
                board,
                vmm: cli.vmm.unwrap_or_else(default_vmm),
                image_builder: cli
                    .image_builder
                    .unwrap_or_else(agent::daemon::default_image_builder),
                stop_on_exit: cli.stop_on_exit,
                warm: !cli.no_warm_standby,
                jail: !cli.no_jail,
                cgroups: !cli.no_cgroups,
                token_file: cli.cfg.token_file.clone(),
                boot: cli
                    .boot_info_dir
                    .as_deref()
                    .map(agent::update::BootSource::in_dir)
                    .unwrap_or_default(),
            }))
        }
        Some(Cmd::CheckConfig) => {
            println!("{} ({}): {}", board.name, board.source, board.description);
            println!(
                "  service VMs: {} CPUs, {} MiB, at most {}, network {:?}",
                board.cpus, board.memory_mib, board.max_vms, board.network
            );
            println!(
                "  api: {:?} port {}, uploads up to {} MiB; discovery {}",
                board.listen,
                board.port,
                board.max_upload_bytes >> 20,
                if board.discovery { "on" } else { "off" }
            );
            println!("  data: {}", board.data_dir.display());
            println!(
                "  operator token: {}",
                match &cli.cfg.token_file {
                    _ if std::env::var_os(TOKEN_ENV).is_some() => format!("${TOKEN_ENV}"),
                    Some(f) => f.display().to_string(),
                    None => board
                        .data_dir
                        .join(agent::auth::OPERATOR_TOKEN_FILE)
                        .display()
                        .to_string(),
                }
            );
            Ok(())
        }
        Some(Cmd::StageBase { name, from }) => {
            let b = store()?.stage_base(&name, &from)?;
            println!("base {} staged: id {}, {} MiB RAM", b.name, b.id, b.mem_mib);
            Ok(())
        }
        Some(Cmd::StageService {
            name,
            overlay,
            description,
        }) => {
            let s = store()?.install_service(&name, &overlay, description.as_deref(), true)?;
            println!(
                "service {} staged: base {}, overlay {} bytes, sha256 {}",
                s.name, s.base, s.overlay_bytes, s.overlay_sha256
            );
            Ok(())
        }
        Some(Cmd::AddPeer {
            id,
            name,
            secret_file,
            fingerprint,
        }) => {
            let s = store()?;
            let made = secret_file.is_none();
            let secret = match &secret_file {
                Some(f) => read_secret_file(f)?,
                None => random_secret()?,
            };
            let p = PeerStore::in_dir(s.root()).add_pinned(
                &id,
                &name,
                &secret,
                fingerprint.as_deref(),
            )?;
            let mine = agent::tls::ApplianceCert::load_or_create(s.root(), s.id())?;
            println!(
                "appliance {} ({}) is trusted for handoff{}; this appliance is {}, its certificate {}.",
                p.id,
                if p.name.is_empty() { "-" } else { &p.name },
                if p.fingerprint.is_some() {
                    " (its certificate pinned)"
                } else {
                    " over plain HTTP only (no --fingerprint)"
                },
                s.id(),
                mine.fingerprint()
            );
            if made {
                println!(
                    "The shared secret: {}\nOn {}, put it in a file only its owner may read (chmod 600 FILE) and run:\n  agent add-peer {} --secret-file FILE --fingerprint {}",
                    p.secret,
                    p.id,
                    s.id(),
                    mine.fingerprint()
                );
            }
            Ok(())
        }
        Some(Cmd::Devices) => {
            let s = store()?;
            for d in DeviceStore::in_dir(s.root()).list()? {
                println!(
                    "{:<24} {:<8} {:<20} {:<20} issued {} expires {}",
                    d.id, d.status, d.name, d.model, d.issued_unix, d.expires_unix
                );
            }
            Ok(())
        }
        Some(Cmd::Revoke { id }) => {
            let s = store()?;
            let d = DeviceStore::in_dir(s.root()).revoke(&id, "operator (agent revoke)")?;
            println!(
                "device {} ({}) is revoked; a running agent stops its instances within {} s",
                d.id,
                d.name,
                agent::revocation::SWEEP_EVERY.as_secs()
            );
            Ok(())
        }
        Some(Cmd::Pair { window, close }) => {
            pair(&board, cli.cfg.token_file.as_deref(), &window, close)
        }
        Some(Cmd::StageApp {
            name,
            file,
            version,
            description,
            service,
        }) => {
            let a = store()?.stage_app(&name, &file, &version, &description, service.as_deref())?;
            println!(
                "app {} {} staged: {} bytes, sha256 {}",
                a.name, a.version, a.bytes, a.sha256
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn pairing_window_durations() {
        assert_eq!(parse_duration("300").unwrap(), 300);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("5m").unwrap(), 300);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }
}
