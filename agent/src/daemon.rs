//! The agent daemon: wires the board, the data directory, the supervisor, the HTTP API and
//! discovery together, and shuts them down in order on SIGINT/SIGTERM.
//!
//! Start-up: open the data directory → load (or, the first time, make) the appliance
//! certificate (see [`crate::tls`]) → re-adopt or clean up instances left from a previous
//! run → bind the API → announce over mDNS.
//!
//! Every listen address gets HTTPS with the appliance certificate, except loopback ones,
//! which serve plain HTTP (for development on the appliance itself); a wildcard address
//! (`0.0.0.0`, `::`) reaches the LAN, so it is HTTPS too, loopback connections included. TLS
//! handshakes run each in a task of their own ([`TlsListener`]), so a client that connects
//! and stalls holds up nobody. The port (port 0 picks one) is the same for every address;
//! `DATA/api.addr` holds "IP:PORT" of the first address (a wildcard shown as 127.0.0.1),
//! `DATA/api.url` one URL per listen address (`http://…` or `https://…`, first line the
//! first address), and stdout says the same with the certificate's fingerprint. Shutdown: mDNS goodbye → stop serving → (with `stop_on_exit`) stop
//! every instance; otherwise instances keep running and the next agent re-adopts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::auth::{operator_token, Credentials, PeerStore, TokenSource, TokenStore, TOKEN_ENV};
use crate::board::Board;
use crate::devices::DeviceStore;
use crate::discovery::{Announcer, REFRESH};
use crate::http::{router, shown_ip, system_info, AppState};
use crate::metrics::Metrics;
use crate::pairing::{ApplianceFacts, Pairing};
use crate::store::{error_chain, Store};
use crate::supervisor::{Supervisor, SupervisorConfig, START_TIMEOUT};
use crate::tls::ApplianceCert;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes finished but not yet taken by the server.
const HANDSHAKE_BACKLOG: usize = 64;

/// Whether the API on `ip` is plain HTTP (loopback) rather than HTTPS (everything else,
/// wildcards included).
pub fn plain_http(ip: std::net::IpAddr) -> bool {
    ip.is_loopback()
}

/// The URL the API on `addr` is reached at (a wildcard shown as 127.0.0.1).
pub fn api_url(addr: SocketAddr) -> String {
    let scheme = if plain_http(addr.ip()) {
        "http"
    } else {
        "https"
    };
    format!(
        "{scheme}://{}",
        SocketAddr::new(shown_ip(addr.ip()), addr.port())
    )
}

/// A TCP listener whose connections are handed to the server once their TLS handshake is
/// done. Accepting and handshaking run on a task of their own, each handshake in its own
/// task with a [`HANDSHAKE_TIMEOUT`], so a slow or silent client stalls nobody.
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS with `config` on the connections of `l`.
    pub fn new(l: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = l.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let (tx, rx) = tokio::sync::mpsc::channel(HANDSHAKE_BACKLOG);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = l.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of descriptors and the like: wait instead of spinning.
                            tracing::warn!("accept failed on {local}: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => break,
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// How long a paired device's credential lasts.
pub const DEVICE_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The board (already loaded, with overrides applied).
    pub board: Board,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// The `image-builder` binary (builds of service versions, `crate::jobs`).
    pub image_builder: PathBuf,
    /// Stop every instance when the agent exits (otherwise they are re-adopted later).
    pub stop_on_exit: bool,
    /// Keep a warm standby per started service (`crate::warm`).
    pub warm: bool,
    /// Start every vmm jailed (`crate::jail`); false only to debug.
    pub jail: bool,
    /// Enforce the board's limits with cgroups (`crate::cgroup`); false only to debug.
    pub cgroups: bool,
    /// A file holding the operator token (mode 0600); see [`crate::auth::operator_token`].
    pub token_file: Option<PathBuf>,
    /// Where the booted slot and the boot entries are read (an A/B image's updates).
    pub boot: crate::update::BootSource,
}

/// The API URLs a phone is told when it pairs: each listen address's URL, a wildcard one
/// standing for every IPv4 address of this host's interfaces (HTTPS); loopback only when
/// nothing else is served.
pub fn pairing_urls(listen: &[std::net::IpAddr], port: u16) -> Vec<String> {
    let mut ips = Vec::new();
    for ip in listen {
        if ip.is_unspecified() {
            if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
                for a in addrs {
                    if let Some(v4) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                        ips.push(std::net::IpAddr::V4(v4.ip()));
                    }
                }
            }
        } else {
            ips.push(*ip);
        }
    }
    ips.sort();
    ips.dedup();
    let outside: Vec<_> = ips.iter().filter(|ip| !ip.is_loopback()).copied().collect();
    let chosen = if outside.is_empty() { ips } else { outside };
    chosen
        .into_iter()
        .map(|ip| api_url(SocketAddr::new(ip, port)))
        .collect()
}

/// The default vmm: next to this executable.
pub fn default_vmm() -> PathBuf {
    beside_exe("vmm")
}

/// The default image-builder: next to this executable.
pub fn default_image_builder() -> PathBuf {
    beside_exe("image-builder")
}

fn beside_exe(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The TXT record of the current state (see crate::discovery).
pub fn txt_record(st: &AppState, port: u16) -> BTreeMap<String, String> {
    let s = system_info(st);
    // A build's VM holds a slot and memory as an instance does.
    let free_vm = s
        .vm_memory_mib
        .saturating_sub(s.vm_memory_used_mib + s.build_memory_mib);
    let memfree = free_vm.min(s.mem_free_mib);
    let mut t = BTreeMap::new();
    t.insert("id".into(), s.id);
    t.insert("port".into(), port.to_string());
    t.insert("ver".into(), s.version);
    t.insert("api".into(), s.api);
    t.insert("board".into(), s.board);
    t.insert("cores".into(), s.vm_cpus.to_string());
    t.insert("load".into(), format!("{:.1}", s.load1));
    // Rounded to 16 MiB so the host's small fluctuations do not cause re-announcements.
    t.insert("memfree".into(), (memfree / 16 * 16).to_string());
    t.insert(
        "vms".into(),
        format!("{}/{}", s.instances + s.builds, s.max_vms),
    );
    t.insert("svcs".into(), s.services_digest);
    if !st.board.listen.iter().all(|ip| plain_http(*ip)) {
        t.insert("fp".into(), st.fingerprint.clone());
        // Whether loopback addresses are HTTPS too (a wildcard listen) or plain HTTP.
        let all = st.board.listen.iter().any(|ip| ip.is_unspecified());
        t.insert("tls".into(), if all { "all" } else { "lan" }.into());
    }
    t
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(opts: Options) -> Result<()> {
    let board = opts.board.clone();
    let store = Store::open(&board.data_dir).with_context(|| {
        format!(
            "cannot use the data directory {} (set storage.data_dir or --data-dir)",
            board.data_dir.display()
        )
    })?;
    let addr_file = store.root().join("api.addr");
    let url_file = store.root().join("api.url");
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(&url_file);
    let cert = ApplianceCert::load_or_create(store.root(), store.id())
        .context("cannot set up the appliance certificate")?;
    let tls_config = cert.server_config()?;
    let metrics = Arc::new(Metrics::default());
    let jail = if !opts.jail {
        tracing::warn!("--no-jail: vmms run as root in the agent's namespaces (debugging only)");
        false
    } else if !crate::jail::can_jail() {
        tracing::warn!("the agent is not root: vmms run unjailed, as the agent's user");
        false
    } else {
        tracing::info!(
            "jail: every vmm runs as a user of its own in its own mount, pid and IPC namespaces"
        );
        true
    };
    let cgroups = Arc::new(if opts.cgroups {
        crate::cgroup::Cgroups::setup(
            store.id(),
            crate::cgroup::Limits {
                cpus: board.cpus,
                memory_mib: board.memory_mib,
                max_vms: board.max_vms,
            },
        )
    } else {
        tracing::warn!("--no-cgroups: the board's cpus and memory are accounted, not enforced (debugging only)");
        crate::cgroup::Cgroups::none()
    });
    let sup = Supervisor::new(
        SupervisorConfig {
            vmm: opts.vmm.clone(),
            host_ip: board.listen[0],
            network: board.network.clone(),
            max_vms: board.max_vms,
            memory_mib: board.memory_mib,
            start_timeout: START_TIMEOUT,
            warm: opts.warm,
            jail,
            cgroups: cgroups.clone(),
        },
        store.clone(),
        metrics.clone(),
    );
    if !opts.vmm.exists() {
        tracing::warn!(
            "no vmm at {}: starts will fail until it is built (`cargo build --bins`) or --vmm names it",
            opts.vmm.display()
        );
    }
    sup.recover().await;
    let sampler = tokio::spawn(crate::history::sampler(sup.clone()));
    let (token, from) = operator_token(
        std::env::var(TOKEN_ENV).ok(),
        opts.token_file.as_deref(),
        store.root(),
    )
    .context("no operator token")?;
    match &from {
        TokenSource::Created(p) => println!(
            "made the operator token: {} (mode 0600; clients read it with --token-file or {TOKEN_ENV})",
            p.display()
        ),
        _ => tracing::info!("operator token from {from}"),
    }
    let peers = PeerStore::in_dir(store.root());
    let devices = DeviceStore::in_dir(store.root());
    // Pairing issues each phone its credential from the device store.
    let pairing = Arc::new(Pairing::new(
        ApplianceFacts {
            appliance_id: store.id().into(),
            wifi: crate::pairing::load_wifi(store.root()).unwrap_or_else(|e| {
                tracing::warn!("pairing hands out no Wi-Fi profile: {}", error_chain(&e));
                None
            }),
            ..Default::default()
        },
        Arc::new(devices.clone()),
    ));
    let creds = Credentials::default()
        .with(Arc::new(TokenStore::new(token, "operator")))
        .with(Arc::new(devices.clone()))
        .with(Arc::new(peers.clone()));
    // Bind every listen address on one port (the first bind picks it when port is 0).
    let mut listeners = Vec::new();
    let mut port = board.port;
    for ip in &board.listen {
        let sa = SocketAddr::new(*ip, port);
        let l = tokio::net::TcpListener::bind(sa).await.with_context(|| {
            format!(
                "cannot listen on {sa} (api.listen / api.port in {})",
                board.source
            )
        })?;
        port = l.local_addr()?.port();
        listeners.push(l);
    }
    let shown = SocketAddr::new(shown_ip(board.listen[0]), port);
    let urls: Vec<String> = board
        .listen
        .iter()
        .map(|ip| api_url(SocketAddr::new(*ip, port)))
        .collect();
    let state = Arc::new(AppState {
        board: board.clone(),
        store: store.clone(),
        sup: sup.clone(),
        metrics,
        jobs: crate::jobs::Jobs::new(opts.image_builder.clone(), sup.clone()),
        creds,
        peers,
        devices,
        pairing: pairing.clone(),
        started: Instant::now(),
        fingerprint: cert.fingerprint().to_string(),
        api_urls: urls.clone(),
        boot: crate::update::Boot::read(&opts.boot),
    });
    std::fs::write(&url_file, urls.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", url_file.display()))?;
    pairing.set_api(pairing_urls(&board.listen, port));
    pairing.set_fingerprint(
        crate::pairing::qr::unhex32(cert.fingerprint()).expect("a certificate's SHA-256 in hex"),
    );
    std::fs::write(&addr_file, format!("{shown}\n"))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    tracing::info!(board = %board.name, id = %store.id(), data = %store.root().display(), fingerprint = %cert.fingerprint(), "agent listening on {}", urls.join(", "));
    println!(
        "cloudlet agent {} (board {}) listening on {}; certificate SHA-256 {}",
        store.id(),
        board.name,
        urls.join(", "),
        cert.fingerprint()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = router(state.clone());
    let mut servers = Vec::new();
    for l in listeners {
        let app = app.clone();
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let plain = l.local_addr().map(|a| plain_http(a.ip())).unwrap_or(false);
        servers.push(if plain {
            tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop).await })
        } else {
            let l = TlsListener::new(l, tls_config.clone());
            tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop).await })
        });
    }

    // Discovery runs on its own task: re-announce when the TXT values change.
    let discovery = if board.discovery {
        let instance = format!("cloudlet-{}-{}", board.name, store.id());
        let st = state.clone();
        let txt = tokio::task::spawn_blocking(move || txt_record(&st, port)).await?;
        match Announcer::start(&instance, &board.listen, port, txt) {
            Ok(mut a) => {
                let st = state.clone();
                let mut changed = sup.subscribe();
                let mut rx = stop_rx.clone();
                Some(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(REFRESH) => {}
                            _ = changed.changed() => {}
                            _ = rx.wait_for(|s| *s) => break,
                        }
                        let st2 = st.clone();
                        let Ok(txt) =
                            tokio::task::spawn_blocking(move || txt_record(&st2, port)).await
                        else {
                            continue;
                        };
                        if let Err(e) = a.update(txt) {
                            tracing::warn!("mDNS re-announcement failed: {}", error_chain(&e));
                        }
                    }
                    tokio::task::spawn_blocking(move || a.goodbye()).await.ok();
                }))
            }
            Err(e) => {
                tracing::warn!("mDNS discovery is off: {}", error_chain(&e));
                None
            }
        }
    } else {
        tracing::info!("mDNS discovery disabled by the board config");
        None
    };

    // Devices no longer trusted (expired, or revoked by `agent revoke`) lose their instances.
    let sweeper = tokio::spawn(crate::revocation::run(
        sup.clone(),
        state.devices.clone(),
        stop_rx.clone(),
    ));

    // Phones arriving on USB pair through it (without USB: one line in the log).
    let usb_stop = Arc::new(AtomicBool::new(false));
    let usb = crate::pairing::usb::start_watcher(pairing.clone(), usb_stop.clone());

    shutdown_signal().await;
    sampler.abort();
    let _ = stop_tx.send(true);
    usb_stop.store(true, Ordering::Release);
    if let Some(d) = discovery {
        let _ = tokio::time::timeout(Duration::from_secs(4), d).await;
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(3), s).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), sweeper).await;
    sup.close_standbys().await;
    if opts.stop_on_exit {
        tracing::info!("stopping every instance (--stop-on-exit)");
        sup.stop_all().await;
    } else {
        let n = sup.usage().0;
        if n > 0 {
            tracing::info!("{n} instance(s) keep running; the next agent re-adopts them");
        }
    }
    cgroups.close();
    if let Some(u) = usb {
        let _ = tokio::task::spawn_blocking(move || u.join()).await;
    }
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(&url_file);
    tracing::info!("agent stopped");
    Ok(())
}
