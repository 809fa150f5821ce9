//! `cloudlet`: the client CLI — discover appliances, start a service on the best one, call
//! it, hand it off to another appliance, stop it.

use std::time::Duration;

use agent::client::{
    best, discover_ranked, discover_ranked_until, Client, Pin, PinStore, Session, Trust,
};
use agent::guest::GuestConn;
use agent::handoff::HANDOFF_TIMEOUT;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Client of cloudlet appliances.
///
/// Finds appliances over mDNS (_cloudlet._tcp), ranks them by free cores, free memory and
/// the measured round trip to their API, starts service VMs on the best one and talks to
/// them over the guest's framed TCP protocol.
///
/// The credential (the operator's token or a paired device's) is never given on the command
/// line: it is the environment variable CLOUDLET_TOKEN, or the file --token-file names (mode
/// 0600; the operator's is the appliance's DATA_DIR/operator.token).
///
/// Examples:
///   cloudlet discover
///   cloudlet start model --token-file ~/.cloudlet-token   # on the best appliance
///   cloudlet call 127.0.0.1:40123 "query 5" "get 7"
///   cloudlet call i-0123abcd "query 5" --agent http://127.0.0.1:9999   # follows a handoff
///   cloudlet handoff i-0123abcd --to http://10.0.0.2:9999 --agent http://127.0.0.1:9999
///   cloudlet stop i-0123abcd --agent http://127.0.0.1:9999
///   cloudlet devices --agent http://127.0.0.1:9999       # paired devices (operator)
///   cloudlet revoke phone-1 --agent http://127.0.0.1:9999
///   cloudlet info --agent https://10.0.0.2:9999 --fingerprint 3f2a…   # pinned HTTPS
///   cloudlet upload-overlay model app.overlay --agent …   # the next version of `model`
///   cloudlet versions model --agent …; cloudlet edit-service model --version 1 --agent …
///   cloudlet upload-base micro ./base --agent …           # tar.zst, verified before install
///   cloudlet build-service kv --base micro --script load:16,put:7:42 --agent …   # built there
///   cloudlet upload-app model-client client.apk --version 1.1 --platform android --service model
///   cloudlet download-app model-client --agent …          # checked against its SHA-256
///   cloudlet pin 3f2a… --agent https://10.0.0.2:9999      # pin it for good (or discovered)
///   cloudlet pins                                          # what is pinned
///   cloudlet unpin 0123456789ab                            # by appliance id or fingerprint
///
/// HTTPS: appliances serve HTTPS on the network with their own certificate, which the client
/// pins by its SHA-256 fingerprint. Pins live in $CLOUDLET_PINS, else
/// $XDG_CONFIG_HOME/cloudlet/pins.json, else ~/.config/cloudlet/pins.json (pairing writes
/// them; `cloudlet pin` and --trust-first-use add one, `cloudlet unpin` removes). Once any appliance is pinned, discovery chooses only
/// pinned ones and shows the others as unverified.
#[derive(Parser, Debug)]
#[command(name = "cloudlet", version, verbatim_doc_comment)]
struct Cli {
    /// Use this agent (http://IP:PORT) instead of discovering one.
    #[arg(long, global = true)]
    agent: Option<String>,
    /// A file holding the credential to present (mode 0600). CLOUDLET_TOKEN takes
    /// precedence.
    #[arg(long, global = true)]
    token_file: Option<std::path::PathBuf>,
    /// The certificate fingerprint (SHA-256, hex) the --agent URL must present (https).
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// Accept the certificate the appliance presents without a pin, print its fingerprint and
    /// pin it in the pin store (only where you can check it, e.g. with its operator).
    #[arg(long, global = true)]
    trust_first_use: bool,
    /// How long to browse mDNS, ms.
    #[arg(long, global = true, default_value_t = 1500)]
    browse_ms: u64,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the appliances that answer mDNS, best first, with their TXT values.
    Discover {
        /// Stop browsing as soon as this appliance (TXT id or instance name) is resolved.
        #[arg(long)]
        wait_for: Option<String>,
    },
    /// Show an appliance's system information and services.
    Info,
    /// Start an instance of SERVICE (on the best appliance, or --agent) and print its
    /// endpoint and timings.
    Start {
        /// Service name.
        service: String,
    },
    /// Send requests to an instance's endpoint (IP:PORT) and print the replies; given an
    /// instance id instead, find it through the agent (following a handoff) and reconnect
    /// when it moves.
    Call {
        /// The endpoint from `start` (IP:PORT), or an instance id (i-…).
        endpoint: String,
        /// Requests (`health`, `query 5`, `get 7`, `primes 1000`, ...).
        #[arg(required = true)]
        requests: Vec<String>,
    },
    /// Hand an instance off to another appliance (a trusted peer holding the same base)
    /// while it keeps serving; print the progress and where it runs now.
    Handoff {
        /// Instance id.
        id: String,
        /// The target agent (http://IP:PORT).
        #[arg(long)]
        to: String,
        /// The pause to aim for, ms (the vmm's default when absent).
        #[arg(long)]
        downtime_ms: Option<u32>,
    },
    /// Stop and remove an instance.
    Stop {
        /// Instance id.
        id: String,
    },
    /// List an appliance's instances.
    List,
    /// List the devices paired with an appliance (the operator's).
    Devices,
    /// Pin an appliance's certificate by its fingerprint (SHA-256, as the manager, the
    /// pairing QR code or the agent's start-up line show it): from then on this client
    /// talks to that appliance only when it presents that certificate. The appliance is
    /// found by --id, or asked at --agent, or discovered by the fingerprint it announces.
    Pin {
        /// The certificate's SHA-256: 64 hex digits, colons allowed.
        #[arg(value_name = "FINGERPRINT")]
        cert: String,
        /// The appliance id (skips asking the appliance).
        #[arg(long)]
        id: Option<String>,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Remove the pins of an appliance (by id) or of a certificate (by fingerprint).
    Unpin {
        /// An appliance id or a certificate fingerprint.
        what: String,
    },
    /// List the pinned appliances.
    Pins,
    /// Revoke a paired device's credential (the operator's): it gets 401 from its next
    /// request on, and the instances it runs are stopped.
    Revoke {
        /// The device id (as `cloudlet devices` shows it).
        id: String,
    },
    /// Update the appliance (an A/B disk image) with an update artifact from `cargo xtask
    /// image` (the operator's): the agent checks all of it, the box writes it to its other
    /// root slot and reboots into it, and falls back by itself if it does not come up
    /// healthy. `cloudlet info` then shows the slot, generation and update state.
    Update {
        /// The artifact (`cloudlet-BOARD-GENERATION.cup`).
        file: std::path::PathBuf,
    },
    #[command(flatten)]
    Catalogue(agent::manage::CatalogueCmd),
}

/// Pins what `c` (a [`Pin::FirstUse`] client) presents, in the pin store, and returns a
/// client pinned to it.
fn trust_first_use(c: Client) -> Result<Client> {
    let sys = c.system()?;
    let fp = c
        .seen_fingerprint()
        .context("the appliance presented no certificate")?;
    let store = PinStore::user();
    store.add(&sys.id, &fp, "")?;
    eprintln!(
        "trusting {} on first use: appliance {}, certificate SHA-256 {fp} (pinned in {})",
        c.base(),
        sys.id,
        store.path().display()
    );
    Ok(c.with_pin(Pin::Fingerprints(vec![fp])))
}

/// A client of the agent to use: --agent (pinned by --fingerprint, the pin store or trust on
/// first use), or the best appliance discovered.
fn connect(cli: &Cli, token: Option<&str>) -> Result<Client> {
    let pins = PinStore::user().entries()?;
    if let Some(url) = &cli.agent {
        let c = Client::new(url, token);
        if !url.starts_with("https://") {
            return Ok(c);
        }
        if let Some(fp) = &cli.fingerprint {
            let fp = agent::tls::parse_fingerprint(fp)?;
            return Ok(c.with_pin(Pin::Fingerprints(vec![fp])));
        }
        if cli.trust_first_use {
            return trust_first_use(c.with_pin(Pin::FirstUse));
        }
        if pins.is_empty() {
            return Ok(c);
        }
        return Ok(c.with_pin(Pin::Fingerprints(
            pins.into_iter().map(|p| p.fingerprint).collect(),
        )));
    }
    let b = best(Duration::from_millis(cli.browse_ms), &pins)?;
    eprintln!(
        "using {} at {} (score {:.3}, rtt {:.2} ms, {:?})",
        b.appliance.instance,
        b.url,
        b.score,
        b.rtt_ms.unwrap_or(f64::NAN),
        b.trust
    );
    if b.url.starts_with("https://") && b.trust != Trust::Pinned {
        if cli.trust_first_use {
            return trust_first_use(Client::new(&b.url, token).with_pin(Pin::FirstUse));
        }
        bail!(
            "{} ({}) is not paired with this client (certificate {} not pinned): pair with it, pass --fingerprint with --agent, or --trust-first-use",
            b.appliance.instance,
            b.url,
            b.fingerprint.as_deref().unwrap_or("-")
        );
    }
    if b.trust == Trust::Pinned {
        // Every pinned appliance, so that following an instance handed off to another
        // paired appliance works too.
        return Ok(Client::new(&b.url, token).with_pin(Pin::Fingerprints(
            pins.into_iter().map(|p| p.fingerprint).collect(),
        )));
    }
    Ok(b.client(token))
}

/// The id of the appliance presenting certificate `fp`: asked at --agent (over HTTPS pinned
/// to `fp`), or found among the appliances discovered announcing `fp`.
fn appliance_id_of(cli: &Cli, fp: &str) -> Result<String> {
    let ask = |url: &str| -> Result<String> {
        let s = Client::new(url, None)
            .with_pin(Pin::Fingerprints(vec![fp.to_string()]))
            .with_timeout(Duration::from_secs(5))
            .system()?;
        if s.fingerprint != fp {
            bail!(
                "{url} presents certificate {fp} but says its own is {}: not pinning it",
                s.fingerprint
            );
        }
        Ok(s.id)
    };
    if let Some(url) = &cli.agent {
        if !url.starts_with("https://") {
            bail!("{url} is plain HTTP (a loopback address): there is no certificate to pin; give the appliance's https:// URL or --id");
        }
        return ask(url);
    }
    let found = discover_ranked(Duration::from_millis(cli.browse_ms), &[])?;
    for r in found
        .iter()
        .filter(|r| r.appliance.txt.get("fp").map(String::as_str) == Some(fp))
    {
        match ask(&r.url) {
            Ok(id) => return Ok(id),
            Err(e) => eprintln!("{} ({}): {e:#}", r.appliance.instance, r.url),
        }
    }
    bail!(
        "no appliance announcing certificate {fp} answered within {} ms: give --agent https://IP:PORT or --id ID",
        cli.browse_ms
    )
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudlet: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let token = agent::auth::client_token(
        std::env::var(agent::auth::TOKEN_ENV).ok(),
        cli.token_file.as_deref(),
    )?;
    match &cli.cmd {
        Cmd::Discover { wait_for } => {
            let window = Duration::from_millis(cli.browse_ms);
            let pins = PinStore::user().entries()?;
            let ranked = match wait_for {
                Some(who) => discover_ranked_until(window, who, &pins)?,
                None => discover_ranked(window, &pins)?,
            };
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&ranked)?);
                return Ok(());
            }
            if ranked.is_empty() {
                bail!(
                    "no cloudlet answered within {} ms (is an agent running with discovery on?)",
                    cli.browse_ms
                );
            }
            for r in &ranked {
                let txt: Vec<String> = r
                    .appliance
                    .txt
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<34} {:<28} {:<10} score {:>8.3}  rtt {:>7} ms  {}",
                    r.appliance.instance,
                    r.url,
                    format!("{:?}", r.trust).to_lowercase(),
                    r.score,
                    r.rtt_ms.map(|v| format!("{v:.2}")).unwrap_or("-".into()),
                    txt.join(" ")
                );
            }
        }
        Cmd::Info => {
            let c = connect(&cli, token.as_deref())?;
            let s = c.system()?;
            let svcs = c.services()?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"system": s, "services": svcs})
                    )?
                );
            } else {
                println!(
                    "{} (board {}, agent {}): {} cores, load {:.2}, {} / {} MiB free; {} / {} instances",
                    s.id, s.board, s.version, s.cores, s.load1, s.mem_free_mib, s.mem_total_mib,
                    s.instances, s.max_vms
                );
                if let Some(b) = &s.boot {
                    let slots: Vec<String> = b
                        .slots
                        .iter()
                        .map(|e| {
                            let state = match e.state {
                                format::update::EntryState::Good => "good".to_string(),
                                format::update::EntryState::Trying { tries_left } => {
                                    format!("on trial, {tries_left} tries left")
                                }
                                format::update::EntryState::Bad => "bad".to_string(),
                            };
                            format!(
                                "{}: generation {} {state}",
                                e.slot,
                                e.generation.map_or("?".into(), |g| g.to_string())
                            )
                        })
                        .collect();
                    let update = match &b.update {
                        format::update::UpdateState::None => "no update yet".to_string(),
                        format::update::UpdateState::Pending { generation } => {
                            format!("generation {generation} written, tried at the next boot")
                        }
                        format::update::UpdateState::Running => "runs the last update".into(),
                        format::update::UpdateState::RolledBack { attempted } => {
                            format!("generation {attempted} did not come up healthy: rolled back")
                        }
                        format::update::UpdateState::Failed { error } => {
                            format!("the last update failed: {error}")
                        }
                    };
                    println!(
                        "  booted slot {} generation {}{}; {update}; slots: {}",
                        b.slot,
                        b.generation,
                        if b.pending {
                            " (an update is being applied)"
                        } else {
                            ""
                        },
                        slots.join(", ")
                    );
                }
                for v in svcs {
                    println!(
                        "  service {:<16} base {:<12} {:>10} bytes  {}",
                        v.name, v.base, v.overlay_bytes, v.description
                    );
                }
            }
        }
        Cmd::Start { service } => {
            let c = connect(&cli, token.as_deref())?;
            let i = c.start(service)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                println!(
                    "{} {} {} synthesis {} ms, first reply {} ms",
                    i.id,
                    i.state,
                    i.endpoint,
                    i.synthesis_ms.map(|v| v.to_string()).unwrap_or("-".into()),
                    i.first_reply_ms
                        .map(|v| v.to_string())
                        .unwrap_or("-".into())
                );
            }
        }
        Cmd::Call { endpoint, requests } if endpoint.starts_with("i-") => {
            let c = connect(&cli, token.as_deref())?;
            let mut sess = Session::open(&c, endpoint, Duration::from_secs(10))?;
            for r in requests {
                let reply = sess
                    .request(r)
                    .with_context(|| format!("request '{r}' failed"))?;
                println!("{reply}");
            }
            if sess.reconnects > 0 {
                eprintln!(
                    "(reconnected {} time(s); the instance is {} at {}, endpoint {})",
                    sess.reconnects,
                    sess.id(),
                    sess.agent(),
                    sess.endpoint()
                );
            }
        }
        Cmd::Handoff {
            id,
            to,
            downtime_ms,
        } => {
            let c = connect(&cli, token.as_deref())?;
            let (id2, to2, dt) = (id.clone(), to.clone(), *downtime_ms);
            let c2 = c.clone().with_timeout(HANDOFF_TIMEOUT);
            let job = std::thread::spawn(move || c2.handoff(&id2, &to2, dt));
            let mut last = String::new();
            while !job.is_finished() {
                if let Ok(Some(h)) = c.instance(id).map(|v| v.handoff) {
                    let line = format!(
                        "{:<10} round {:>3}  {:>12} bytes  dirty {:>6} pages  {:>8.1} Mbit/s",
                        h.phase,
                        h.round,
                        h.bytes,
                        h.dirty_pages,
                        h.bandwidth_bps as f64 * 8.0 / 1e6
                    );
                    if line != last && !cli.json {
                        eprintln!("{line}");
                        last = line;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let v = job
                .join()
                .map_err(|_| anyhow::anyhow!("the handoff thread panicked"))??;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let h = v
                    .handoff
                    .clone()
                    .unwrap_or_else(|| agent::supervisor::HandoffInfo::new(to));
                let m = v.moved_to.as_ref();
                println!(
                    "{} {}: now {} at {} (endpoint {}); downtime {} ms, total {} ms, {} bytes in {} rounds",
                    v.id,
                    v.state,
                    m.map_or("-", |m| m.instance.as_str()),
                    m.map_or("-", |m| m.agent.as_str()),
                    m.and_then(|m| m.endpoint.as_deref()).unwrap_or("-"),
                    h.downtime_ms.map_or("-".into(), |d| format!("{d:.2}")),
                    h.total_ms.map_or("-".into(), |d| format!("{d:.1}")),
                    h.bytes,
                    h.round
                );
            }
        }
        Cmd::Call { endpoint, requests } => {
            let mut g = GuestConn::connect(endpoint, Duration::from_secs(10))
                .with_context(|| format!("cannot connect to {endpoint}"))?;
            for r in requests {
                let reply = g
                    .request(r)
                    .with_context(|| format!("request '{r}' failed"))?;
                println!("{reply}");
            }
        }
        Cmd::Stop { id } => {
            let c = connect(&cli, token.as_deref())?;
            let i = c.delete(id)?;
            println!("{} {} ({})", i.id, i.state, i.exit.unwrap_or_default());
        }
        Cmd::Pin { cert, id, name } => {
            let fp = agent::tls::parse_fingerprint(cert)?;
            let id = match id {
                Some(id) => id.clone(),
                None => appliance_id_of(&cli, &fp)?,
            };
            let store = PinStore::user();
            let e = store.add(&id, &fp, name)?;
            println!(
                "pinned appliance {} certificate SHA-256 {} (in {})",
                e.id,
                e.fingerprint,
                store.path().display()
            );
        }
        Cmd::Unpin { what } => {
            let store = PinStore::user();
            let gone = store.remove(what)?;
            if gone.is_empty() {
                bail!(
                    "nothing pinned for '{what}' in {} (`cloudlet pins` lists what is)",
                    store.path().display()
                );
            }
            for e in gone {
                println!("unpinned appliance {} ({})", e.id, e.fingerprint);
            }
        }
        Cmd::Pins => {
            let store = PinStore::user();
            let v = store.entries()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.is_empty() {
                eprintln!("no appliance is pinned (in {})", store.path().display());
            } else {
                for e in v {
                    println!("{:<14} {} {}", e.id, e.fingerprint, e.name);
                }
            }
        }
        Cmd::Devices => {
            let v = connect(&cli, token.as_deref())?.devices()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for d in v {
                    println!(
                        "{:<24} {:<8} {:<20} {:<20} expires {}",
                        d.id, d.status, d.name, d.model, d.expires_unix
                    );
                }
            }
        }
        Cmd::Revoke { id } => {
            let r = connect(&cli, token.as_deref())?.revoke_device(id)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let d = &r.device;
                println!(
                    "device {} ({}) is {}; {} instance(s) it ran stopped{}",
                    d.id,
                    d.name,
                    d.status,
                    r.instances_stopped.len(),
                    if r.instances_stopped.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.instances_stopped.join(" "))
                    }
                );
            }
        }
        Cmd::Update { file } => {
            let c = connect(&cli, token.as_deref())?;
            let mut p = agent::manage::ProgressLine::new(&format!("uploading {}", file.display()));
            let a: agent::update::Accepted =
                c.upload("/v1/system/update", file, &mut |x, y| p.update(x, y))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                println!(
                    "update accepted: generation {} (version {}, {} bytes) goes to slot {}; {}",
                    a.generation, a.version, a.bytes, a.slot, a.next
                );
            }
        }
        Cmd::Catalogue(cmd) => {
            let c = connect(&cli, token.as_deref())?;
            agent::manage::run(cmd, &c, cli.json)?;
        }
        Cmd::List => {
            let c = connect(&cli, token.as_deref())?;
            let v = c.instances()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for i in v {
                    println!("{} {:<10} {:<10} {}", i.id, i.service, i.state, i.endpoint);
                }
            }
        }
    }
    Ok(())
}
