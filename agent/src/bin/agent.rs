//! `agent`: the cloudlet appliance daemon, and the commands that stage its data.

use std::path::PathBuf;

use agent::auth::{random_secret, PeerStore};
use agent::board::Board;
use agent::daemon::{default_vmm, Options};
use agent::store::Store;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

/// The cloudlet appliance agent.
///
/// Announces the appliance over mDNS (_cloudlet._tcp), serves the client API (/v1/...,
/// described at /v1/openapi.json) and the web manager (/), and synthesises service VMs with
/// `vmm synthesize` on request. Without a subcommand it runs the daemon.
///
/// Examples:
///   agent --board dev --data-dir /tmp/cl              # run with the embedded dev board
///   agent stage-base micro --from base/ --data-dir /tmp/cl
///   agent stage-service model --overlay app.overlay --data-dir /tmp/cl
///   agent add-peer 0123456789ab --name hall-b --fingerprint 3f2a… --data-dir /tmp/cl   # prints a new secret
#[derive(Parser, Debug)]
#[command(name = "agent", version, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// The vmm binary (default: `vmm` next to this executable).
    #[arg(long, global = true)]
    vmm: Option<PathBuf>,
    /// Stop every instance when the agent exits (by default they keep running and the next
    /// agent re-adopts them).
    #[arg(long)]
    stop_on_exit: bool,
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
    /// Override the board's API token.
    #[arg(long, global = true)]
    token: Option<String>,
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
    /// id and the same secret. Without --secret a new one is made and printed.
    AddPeer {
        /// The other appliance's id.
        id: String,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// The shared secret (at least 16 characters); made when absent.
        #[arg(long)]
        secret: Option<String>,
        /// The other appliance's certificate fingerprint (its `GET /v1/system` →
        /// `fingerprint`, or its start-up line): needed to hand off to it over HTTPS, which
        /// is pinned to it.
        #[arg(long)]
        fingerprint: Option<String>,
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
    if let Some(t) = &c.token {
        b.token = t.clone();
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
                stop_on_exit: cli.stop_on_exit,
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
            secret,
            fingerprint,
        }) => {
            let s = store()?;
            let secret = match secret {
                Some(s) => s,
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
                "appliance {} ({}) is trusted for handoff{}; this appliance is {}. On {}, run:\n  agent add-peer {} --secret {} --fingerprint {}",
                p.id,
                if p.name.is_empty() { "-" } else { &p.name },
                if p.fingerprint.is_some() {
                    " (its certificate pinned)"
                } else {
                    " over plain HTTP only (no --fingerprint)"
                },
                s.id(),
                p.id,
                s.id(),
                p.secret,
                mine.fingerprint()
            );
            Ok(())
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
