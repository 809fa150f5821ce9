//! The agent daemon: wires the board, the data directory, the supervisor, the HTTP API and
//! discovery together, and shuts them down in order on SIGINT/SIGTERM.
//!
//! Start-up: open the data directory → re-adopt or clean up instances left from a previous
//! run → bind the API (port 0 picks one; the address goes to `DATA/api.addr` and stdout) →
//! announce over mDNS. Shutdown: mDNS goodbye → stop serving → (with `stop_on_exit`) stop
//! every instance; otherwise instances keep running and the next agent re-adopts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::auth::{Credentials, PeerStore, TokenStore};
use crate::board::Board;
use crate::discovery::{Announcer, REFRESH};
use crate::http::{router, shown_ip, system_info, AppState};
use crate::metrics::Metrics;
use crate::pairing::{ApplianceFacts, MemoryIssuer, Pairing};
use crate::store::{error_chain, Store};
use crate::supervisor::{Supervisor, SupervisorConfig, START_TIMEOUT};

/// How long a paired device's credential lasts.
pub const DEVICE_CREDENTIAL_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The board (already loaded, with overrides applied).
    pub board: Board,
    /// The `vmm` binary.
    pub vmm: PathBuf,
    /// Stop every instance when the agent exits (otherwise they are re-adopted later).
    pub stop_on_exit: bool,
}

/// The default vmm: next to this executable.
pub fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vmm")))
        .unwrap_or_else(|| PathBuf::from("vmm"))
}

/// The TXT record of the current state (see crate::discovery).
pub fn txt_record(st: &AppState, port: u16) -> BTreeMap<String, String> {
    let s = system_info(st);
    let free_vm = s.vm_memory_mib.saturating_sub(s.vm_memory_used_mib);
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
    t.insert("vms".into(), format!("{}/{}", s.instances, s.max_vms));
    t.insert("svcs".into(), s.services_digest);
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
    let _ = std::fs::remove_file(&addr_file);
    let metrics = Arc::new(Metrics::default());
    let sup = Supervisor::new(
        SupervisorConfig {
            vmm: opts.vmm.clone(),
            host_ip: board.listen[0],
            network: board.network.clone(),
            max_vms: board.max_vms,
            memory_mib: board.memory_mib,
            start_timeout: START_TIMEOUT,
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
    let peers = PeerStore::in_dir(store.root());
    // Paired devices' credentials, in memory until a credential store on disk issues them.
    let issuer = Arc::new(MemoryIssuer::new(DEVICE_CREDENTIAL_LIFETIME));
    let pairing = Arc::new(Pairing::new(
        ApplianceFacts {
            appliance_id: store.id().into(),
            wifi: crate::pairing::load_wifi(store.root()).unwrap_or_else(|e| {
                tracing::warn!("pairing hands out no Wi-Fi profile: {}", error_chain(&e));
                None
            }),
            ..Default::default()
        },
        issuer.clone(),
    ));
    let creds = Credentials::default()
        .with(Arc::new(TokenStore::new(board.token.clone(), "operator")))
        .with(Arc::new(peers.clone()))
        .with(issuer);
    let state = Arc::new(AppState {
        board: board.clone(),
        store: store.clone(),
        sup: sup.clone(),
        metrics,
        creds,
        peers,
        pairing: pairing.clone(),
        started: Instant::now(),
    });

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
    pairing.set_api(vec![format!("http://{shown}")]);
    std::fs::write(&addr_file, format!("{shown}\n"))
        .with_context(|| format!("cannot write {}", addr_file.display()))?;
    tracing::info!(board = %board.name, id = %store.id(), data = %store.root().display(), "agent listening on http://{shown}");
    println!(
        "cloudlet agent {} (board {}) listening on http://{shown}",
        store.id(),
        board.name
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = router(state.clone());
    let mut servers = Vec::new();
    for l in listeners {
        let app = app.clone();
        let mut rx = stop_rx.clone();
        servers.push(tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        }));
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

    // Phones arriving on USB pair through it (without USB: one line in the log).
    let usb_stop = Arc::new(AtomicBool::new(false));
    let usb = crate::pairing::usb::start_watcher(pairing.clone(), usb_stop.clone());

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    usb_stop.store(true, Ordering::Release);
    if let Some(d) = discovery {
        let _ = tokio::time::timeout(Duration::from_secs(4), d).await;
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(3), s).await;
    }
    if opts.stop_on_exit {
        tracing::info!("stopping every instance (--stop-on-exit)");
        sup.stop_all().await;
    } else {
        let n = sup.usage().0;
        if n > 0 {
            tracing::info!("{n} instance(s) keep running; the next agent re-adopts them");
        }
    }
    if let Some(u) = usb {
        let _ = tokio::task::spawn_blocking(move || u.join()).await;
    }
    let _ = std::fs::remove_file(&addr_file);
    tracing::info!("agent stopped");
    Ok(())
}
