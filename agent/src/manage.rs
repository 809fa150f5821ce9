//! The catalogue commands of the `cloudlet` CLI (most are the operator's): service versions,
//! base and app uploads with progress on stderr, app downloads checked against their SHA-256.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;

use crate::client::Client;
use crate::http::{ServiceView, VersionView};
use crate::store::{AppRecord, BaseInfo};

/// The catalogue commands.
#[derive(Subcommand, Debug)]
pub enum CatalogueCmd {
    /// List the services with their current version.
    Services,
    /// List the versions of a service (operator): size, SHA-256, current, instances.
    Versions {
        /// Service name.
        service: String,
    },
    /// Upload an overlay (made by `image-builder overlay`) as the next version of SERVICE,
    /// made current (operator); the appliance verifies it before installing it.
    UploadOverlay {
        /// Service name (created when new).
        service: String,
        /// The overlay file.
        file: PathBuf,
    },
    /// Set the current version (a rollback), the description and/or the name of a service
    /// (operator).
    EditService {
        /// Service name.
        service: String,
        /// A new name (refused while instances of it run).
        #[arg(long)]
        name: Option<String>,
        /// The version to make current.
        #[arg(long)]
        version: Option<u32>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a service, or one version of it with --version (operator); refused while
    /// instances of it run.
    DeleteService {
        /// Service name.
        service: String,
        /// Only this version (never the current one).
        #[arg(long)]
        version: Option<u32>,
    },
    /// Build a service (or the next version of one) on the appliance (operator): customise a
    /// base with a script of console commands; follows the build's progress, and the new
    /// version becomes current once verified.
    BuildService {
        /// Service name.
        service: String,
        /// Console commands, `,`-separated, `:` between words (`load:16,put:7:42`); may be
        /// left out when --file places what the service needs.
        #[arg(long, default_value = "")]
        script: String,
        /// The base to customise (a new service needs one).
        #[arg(long)]
        base: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Place a file on the guest's disk first: GUEST=LOCAL, GUEST a place on the raw disk
        /// (`/dev/vda@OFFSET`, a byte offset), LOCAL the file to send (at most 256 KiB;
        /// repeat up to 16 times).
        #[arg(long = "file", value_name = "GUEST=LOCAL")]
        files: Vec<String>,
    },
    /// The events list, newest first (operator): starts, stops, failures with their reason,
    /// imports, builds, pairings.
    Events {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print an instance's console log; with --follow, keep printing what it writes until
    /// it ends.
    Console {
        /// Instance id.
        id: String,
        /// Follow the log (long polls).
        #[arg(long)]
        follow: bool,
    },
    /// Upload a base directory (made by `image-builder base`) as base NAME (operator): packed
    /// as tar.zst, uploaded, verified by the appliance (content id) before it is installed.
    UploadBase {
        /// Base name on the appliance.
        name: String,
        /// The base directory.
        dir: PathBuf,
    },
    /// Delete a base (operator); refused while services use it.
    DeleteBase {
        /// Base name.
        name: String,
    },
    /// Upload a client app file as version --version of app NAME (operator).
    UploadApp {
        /// App name.
        name: String,
        /// The file phones download.
        file: PathBuf,
        /// Its version (1.2.0).
        #[arg(long)]
        version: String,
        /// The platform it runs on (android, ios, linux, …).
        #[arg(long, default_value = "any")]
        platform: String,
        /// The service it offloads to.
        #[arg(long)]
        service: Option<String>,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List the app store, or the versions of one app.
    Apps {
        /// App name (its versions).
        name: Option<String>,
    },
    /// Download an app (its newest version, or --version) and check its SHA-256.
    DownloadApp {
        /// App name.
        name: String,
        /// Version.
        #[arg(long)]
        version: Option<String>,
        /// Where to write it (the app's file name in the current directory by default).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete an app, or one version of it (operator).
    DeleteApp {
        /// App name.
        name: String,
        /// Only this version.
        #[arg(long)]
        version: Option<String>,
    },
}

/// Prints an upload's progress on stderr: one line rewritten on a terminal, a line per 10%
/// otherwise.
pub struct ProgressLine {
    what: String,
    t0: Instant,
    last: Instant,
    last_pct: u64,
    tty: bool,
}

impl ProgressLine {
    /// A progress line for `what`.
    pub fn new(what: &str) -> ProgressLine {
        let now = Instant::now();
        ProgressLine {
            what: what.into(),
            t0: now,
            last: now - Duration::from_secs(1),
            last_pct: u64::MAX,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// `sent` of `total` bytes are done.
    pub fn update(&mut self, sent: u64, total: u64) {
        let pct = (sent * 100).checked_div(total).unwrap_or(100);
        let done = sent >= total;
        let due = if self.tty {
            self.last.elapsed() >= Duration::from_millis(200)
        } else {
            self.last_pct == u64::MAX || pct / 10 != self.last_pct / 10
        };
        if pct == self.last_pct || !(due || done) {
            return;
        }
        self.last = Instant::now();
        self.last_pct = pct;
        let s = self.t0.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "{}: {pct:>3}% ({:.1} / {:.1} MiB, {:.1} MiB/s)",
            self.what,
            sent as f64 / 1048576.0,
            total as f64 / 1048576.0,
            sent as f64 / 1048576.0 / s
        );
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r{line}{}", if done { "\n" } else { "" });
        } else {
            let _ = writeln!(e, "{line}");
        }
    }
}

/// Packs the base directory `dir` (its manifest, kernel, state, memory and disk) into a
/// zstd-compressed tar at `out`, the form `PUT /v1/bases/{name}` takes.
pub fn pack_base(dir: &Path, out: &Path) -> Result<()> {
    format::base::Manifest::load(dir)
        .with_context(|| format!("{} is not a base directory", dir.display()))?;
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let z = zstd::stream::write::Encoder::new(f, 3)?;
    let mut b = tar::Builder::new(z);
    for name in crate::store::BASE_FILES {
        let p = dir.join(name);
        if p.exists() {
            b.append_path_with_name(&p, name)
                .with_context(|| format!("cannot pack {}", p.display()))?;
        }
    }
    b.into_inner()?.finish()?.sync_all()?;
    Ok(())
}

/// Downloads `path` into `out`, computing its SHA-256 on the way; fails when it differs from
/// the `X-Content-Sha256` the appliance sent. Returns the bytes and the SHA-256.
pub fn download_checked(c: &Client, path: &str, out: &Path) -> Result<(u64, String)> {
    let (n, sha, announced) = c.download(path, out)?;
    match announced {
        Some(a) if a == sha => Ok((n, sha)),
        Some(a) => {
            let _ = std::fs::remove_file(out);
            bail!("the download's SHA-256 is {sha}, but the appliance announced {a}; removed it")
        }
        None => bail!("the appliance sent no X-Content-Sha256 to check the download against"),
    }
}

fn print<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a catalogue command against `c`; `json` prints JSON instead of text.
pub fn run(cmd: &CatalogueCmd, c: &Client, json_out: bool) -> Result<()> {
    match cmd {
        CatalogueCmd::Services => {
            let v = c.services()?;
            if json_out {
                return print(&v);
            }
            for s in v {
                println!(
                    "{:<20} v{:<3} base {:<12} {:>10} bytes  sha256 {}  {} running  {}",
                    s.name,
                    s.version,
                    s.base,
                    s.overlay_bytes,
                    &s.overlay_sha256,
                    s.instances,
                    s.description
                );
            }
        }
        CatalogueCmd::Versions { service } => {
            let v: Vec<VersionView> = c.get_json(&format!("/v1/services/{service}/versions"))?;
            if json_out {
                return print(&v);
            }
            for x in v {
                println!(
                    "{}{:<4} base {:<12} {:>10} bytes  sha256 {}  {} running  {}",
                    if x.current { "*" } else { " " },
                    x.record.version,
                    x.record.base,
                    x.record.overlay_bytes,
                    x.record.overlay_sha256,
                    x.instances,
                    x.record.note
                );
            }
        }
        CatalogueCmd::UploadOverlay { service, file } => {
            let mut p = ProgressLine::new(&format!("uploading {}", file.display()));
            let s: ServiceView = c.upload(
                &format!("/v1/services/{service}/overlay"),
                file,
                &mut |a, b| p.update(a, b),
            )?;
            if json_out {
                return print(&s);
            }
            println!(
                "service {} is at version {} ({} bytes, sha256 {})",
                s.name, s.version, s.overlay_bytes, s.overlay_sha256
            );
        }
        CatalogueCmd::EditService {
            service,
            name,
            version,
            description,
        } => {
            let s: ServiceView = c.send_json(
                "PUT",
                &format!("/v1/services/{service}"),
                &json!({"name": name, "version": version, "description": description}),
            )?;
            if json_out {
                return print(&s);
            }
            println!(
                "service {} is at version {}: {}",
                s.name, s.version, s.description
            );
        }
        CatalogueCmd::DeleteService { service, version } => {
            match version {
                Some(v) => c.delete_path(&format!("/v1/services/{service}/versions/{v}"))?,
                None => c.delete_path(&format!("/v1/services/{service}"))?,
            }
            println!("deleted");
        }
        CatalogueCmd::BuildService {
            service,
            script,
            base,
            description,
            files,
        } => {
            let mut sent = Vec::new();
            for f in files {
                use base64::Engine;
                let (guest, local) = f.split_once('=').with_context(|| {
                    format!("--file {f}: write GUEST=LOCAL (e.g. /dev/vda@568=entry.bin)")
                })?;
                let data = std::fs::read(local)
                    .with_context(|| format!("--file {f}: cannot read '{local}'"))?;
                sent.push(json!({
                    "path": guest,
                    "content_base64": base64::engine::general_purpose::STANDARD.encode(&data),
                }));
            }
            let mut j: crate::jobs::Job = c.send_json(
                "POST",
                &format!("/v1/services/{service}/build"),
                &json!({"base": base, "script": script, "description": description, "files": sent}),
            )?;
            let mut last = String::new();
            loop {
                let files = if j.files.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{}/{} files, ",
                        j.files.iter().filter(|f| f.placed).count(),
                        j.files.len()
                    )
                };
                let line = format!(
                    "{}: {} {:>3}% ({files}{}/{} commands){}",
                    j.id,
                    j.step,
                    j.percent,
                    j.commands_done,
                    j.commands_total,
                    j.replies
                        .last()
                        .map(|r| format!("  {r}"))
                        .unwrap_or_default()
                );
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
                if j.state != "running" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                j = c.get_json(&format!("/v1/jobs/{}", j.id))?;
            }
            if json_out {
                return print(&j);
            }
            match (j.state.as_str(), j.version) {
                ("done", Some(v)) => println!(
                    "service {} version {v} built in {:.0} ms and made current",
                    j.service,
                    j.took_ms.unwrap_or(0.0)
                ),
                _ => bail!(
                    "the build of {} failed: {}",
                    j.service,
                    j.error.unwrap_or_default()
                ),
            }
        }
        CatalogueCmd::Events { limit } => {
            let v: Vec<serde_json::Value> = c.get_json(&format!("/v1/events?limit={limit}"))?;
            if json_out {
                return print(&v);
            }
            for e in v {
                let fields: Vec<String> = e
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| *k != "unix" && *k != "event" && !v.is_null())
                    .map(|(k, v)| {
                        format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_string))
                    })
                    .collect();
                println!(
                    "{} {:<20} {}",
                    e["unix"],
                    e["event"].as_str().unwrap_or("?"),
                    fields.join(" ")
                );
            }
        }
        CatalogueCmd::Console { id, follow } => {
            let mut offset: Option<u64> = None;
            let c = c.clone().with_timeout(Duration::from_secs(40));
            loop {
                let q = match offset {
                    None => "?wait_ms=0".to_string(),
                    Some(o) => format!("?offset={o}&wait_ms=20000"),
                };
                let (text, next, live) = c.console(id, &q)?;
                print!("{text}");
                std::io::stdout().flush()?;
                offset = Some(next);
                if !follow || (!live && text.is_empty()) {
                    break;
                }
            }
        }
        CatalogueCmd::UploadBase { name, dir } => {
            let tmp = std::env::temp_dir().join(format!(
                "cloudlet-base-{}-{}.tar.zst",
                name,
                std::process::id()
            ));
            eprintln!("packing {} …", dir.display());
            let packed = pack_base(dir, &tmp);
            let r = packed.and_then(|()| {
                let mut p = ProgressLine::new(&format!("uploading base {name}"));
                Ok(
                    c.upload::<BaseInfo>(&format!("/v1/bases/{name}"), &tmp, &mut |a, b| {
                        p.update(a, b)
                    })?,
                )
            });
            let _ = std::fs::remove_file(&tmp);
            let b = r?;
            if json_out {
                return print(&b);
            }
            println!(
                "base {} installed: id {}, {} MiB RAM",
                b.name, b.id, b.mem_mib
            );
        }
        CatalogueCmd::DeleteBase { name } => {
            c.delete_path(&format!("/v1/bases/{name}"))?;
            println!("deleted");
        }
        CatalogueCmd::UploadApp {
            name,
            file,
            version,
            platform,
            service,
            description,
        } => {
            let fname = file
                .file_name()
                .and_then(|f| f.to_str())
                .context("the app file has no name")?;
            let mut q = vec![("file", fname), ("platform", platform.as_str())];
            if let Some(s) = service {
                q.push(("service", s));
            }
            if !description.is_empty() {
                q.push(("description", description));
            }
            let mut p = ProgressLine::new(&format!("uploading {fname}"));
            let a: AppRecord = c.upload(
                &format!("/v1/apps/{name}/versions/{version}?{}", query_string(&q)),
                file,
                &mut |a, b| p.update(a, b),
            )?;
            if json_out {
                return print(&a);
            }
            println!(
                "app {} {} ({}) installed: {} bytes, sha256 {}",
                a.name, a.version, a.platform, a.bytes, a.sha256
            );
        }
        CatalogueCmd::Apps { name } => {
            let v: Vec<AppRecord> = match name {
                Some(n) => c.get_json(&format!("/v1/apps/{n}/versions"))?,
                None => c.get_json("/v1/apps")?,
            };
            if json_out {
                return print(&v);
            }
            for a in v {
                println!(
                    "{:<20} {:<10} {:<8} service {:<12} {:>10} bytes  sha256 {}",
                    a.name,
                    a.version,
                    a.platform,
                    a.service.as_deref().unwrap_or("-"),
                    a.bytes,
                    a.sha256
                );
            }
        }
        CatalogueCmd::DownloadApp { name, version, out } => {
            let rec: AppRecord = match version {
                Some(v) => c
                    .get_json::<Vec<AppRecord>>(&format!("/v1/apps/{name}/versions"))?
                    .into_iter()
                    .find(|a| &a.version == v)
                    .with_context(|| format!("app {name} has no version {v}"))?,
                None => c.get_json(&format!("/v1/apps/{name}"))?,
            };
            let out = out.clone().unwrap_or_else(|| PathBuf::from(&rec.file));
            let path = format!("/v1/apps/{name}/download?version={}", enc(&rec.version));
            let (n, sha) = download_checked(c, &path, &out)?;
            println!("{}: {n} bytes, sha256 {sha} (checked)", out.display());
        }
        CatalogueCmd::DeleteApp { name, version } => {
            match version {
                Some(v) => c.delete_path(&format!("/v1/apps/{name}/versions/{v}"))?,
                None => c.delete_path(&format!("/v1/apps/{name}"))?,
            }
            println!("deleted");
        }
    }
    Ok(())
}

/// `s` percent-encoded for a query.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `k=v&…`, percent-encoded.
fn query_string(q: &[(&str, &str)]) -> String {
    q.iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}
