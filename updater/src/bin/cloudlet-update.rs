//! `cloudlet-update`: the appliance's A/B updater (see the `updater` crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use updater::apply::{self, ApplyError, ApplyOptions, Event};
use updater::health::{self, HealthOptions};
use updater::Paths;

#[derive(Parser)]
#[command(
    name = "cloudlet-update",
    version,
    about = "A/B updates of a cloudlet appliance: writes an update artifact (.cup) to the root \
             slot the box did not boot from and lets systemd-boot's boot counting try it once",
    long_about = "A/B updates of a cloudlet appliance.\n\n\
        The disk has two root slots (GPT labels cloudlet-root-a, cloudlet-root-b), an ESP with \
        one systemd-boot entry per slot (loader/entries/cloudlet-SLOT[+LEFT[-DONE]].conf) and a \
        data partition. `apply` writes the inactive slot (its entry removed first, its root, \
        kernel and initrd written and verified, then a new entry with one boot try), records \
        the outcome in DATA/updates/last.json and optionally reboots. On the next boot, \
        `check-health` (run before boot-complete.target) succeeds once the agent answers; \
        systemd-bless-boot then makes the entry permanent. If it never does, the entry runs \
        out of tries and the box boots the other slot again.\n\n\
        Exit status: 0 done (or healthy), 1 refused, failed or unhealthy (the message says why)."
)]
struct Cli {
    /// The mounted ESP.
    #[arg(long, global = true, default_value = "/boot/efi")]
    esp: PathBuf,
    /// The directory of partitions by GPT label.
    #[arg(long, global = true, default_value = "/dev/disk/by-partlabel")]
    devices: PathBuf,
    /// The running kernel's command line.
    #[arg(long, global = true, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// The board config (its `name` must match the artifact's board).
    #[arg(long, global = true, default_value = "/etc/cloudlet/board.toml")]
    board_file: PathBuf,
    /// The agent's data directory (updates/last.json, updates/pending.cup, api.url).
    #[arg(long, global = true, default_value = "/var/lib/cloudlet")]
    data_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The booted slot and generation, each slot's boot entry (good, trying with N tries left,
    /// bad, or empty) and where the last update stands.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Writes FILE to the slot not booted and gives it a boot entry with a boot counter.
    /// Refused, with nothing changed: another board, a generation not newer than the running
    /// one, a root image larger than the slot, a mounted target.
    Apply {
        /// The update artifact (.cup).
        file: PathBuf,
        #[command(flatten)]
        opts: ApplyArgs,
        /// Reboot into the new slot once applied (`systemctl reboot`).
        #[arg(long)]
        reboot: bool,
    },
    /// Applies DATA/updates/pending.cup (left there by the agent) if there is one, removes it
    /// either way (the record says why a failure failed) and reboots once applied. What a
    /// root systemd service runs.
    ApplyPending {
        #[command(flatten)]
        opts: ApplyArgs,
        /// Do not reboot after applying (tests).
        #[arg(long)]
        no_reboot: bool,
    },
    /// The boot assessment: succeeds once the agent on this box answers GET /v1/system twice,
    /// --settle-s apart, without its unit restarting in between (address from DATA/api.url;
    /// HTTPS pinned to DATA/tls/cert.der); fails when the agent unit has failed or restarted
    /// 3 times, or at the timeout.
    CheckHealth {
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// Seconds the agent must stay up (no restart) between its first answer and a second.
        #[arg(long, default_value_t = 10)]
        settle_s: u64,
        /// The agent's systemd unit ("" skips the unit check).
        #[arg(long, default_value = "cloudlet-agent")]
        unit: String,
        /// The systemctl to ask (tests).
        #[arg(long, default_value = "systemctl", hide = true)]
        systemctl: PathBuf,
    },
    /// Makes an update artifact from a root filesystem image, a kernel and an initrd (each
    /// zstd-compressed, with its SHA-256) — what `cargo xtask image` does through the library.
    Pack {
        /// The board it is for (`name` in its TOML).
        #[arg(long)]
        board: String,
        /// Its generation: must grow with each build (default: now, unix seconds).
        #[arg(long)]
        generation: Option<u64>,
        /// The product version shown in boot entries.
        #[arg(long)]
        version: String,
        /// The root filesystem image (ext4), at most the size of a root slot.
        #[arg(long)]
        root: PathBuf,
        /// The kernel.
        #[arg(long)]
        kernel: PathBuf,
        /// The initrd.
        #[arg(long)]
        initrd: PathBuf,
        /// Where to write it (.cup).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Shows an artifact's header; with --verify, also decompresses every part and checks its
    /// length and SHA-256.
    Inspect {
        /// The update artifact (.cup).
        file: PathBuf,
        /// Check every part.
        #[arg(long)]
        verify: bool,
    },
}

#[derive(clap::Args)]
struct ApplyArgs {
    /// Install even when the artifact's generation is not newer than the running one.
    #[arg(long)]
    allow_downgrade: bool,
    /// Boot tries the new slot gets before the box falls back.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    tries: u32,
}

impl ApplyArgs {
    fn options(&self) -> ApplyOptions {
        ApplyOptions {
            allow_downgrade: self.allow_downgrade,
            tries: self.tries,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let cli = Cli::parse();
    let paths = Paths {
        esp: cli.esp.clone(),
        devices: cli.devices.clone(),
        cmdline: cli.cmdline.clone(),
        board_file: cli.board_file.clone(),
        data_dir: cli.data_dir.clone(),
    };
    match run(cli.cmd, &paths) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cloudlet-update: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd, paths: &Paths) -> Result<ExitCode> {
    match cmd {
        Cmd::Status { json } => {
            let s = updater::status::status(paths, updater::paths::boot_time_unix()).with_context(
                || format!("cannot read the boot entries in {}", paths.esp.display()),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{s}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Apply { file, opts, reboot } => {
            let t0 = Instant::now();
            let plan = apply::plan(paths, &file, opts.options())
                .map_err(|e| anyhow::anyhow!("update refused, nothing changed: {}", e.chain()))?;
            let applied = execute(paths, plan)?;
            eprintln!(
                "applied generation {} to slot {} in {:.1} s",
                applied.header.generation,
                applied.slot,
                t0.elapsed().as_secs_f64()
            );
            if reboot {
                reboot_now()?;
            } else {
                eprintln!(
                    "the next boot tries slot {} once; reboot to start it",
                    applied.slot
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ApplyPending { opts, no_reboot } => {
            let pending = paths.pending();
            if !pending.exists() {
                eprintln!("no update pending ({} does not exist)", pending.display());
                return Ok(ExitCode::SUCCESS);
            }
            let result = apply::plan(paths, &pending, opts.options());
            let outcome = match result {
                Ok(plan) => execute(paths, plan),
                Err(e) => {
                    let msg = format!("update refused, nothing changed: {}", e.chain());
                    let booted = paths.booted();
                    let record = apply::outcome_record(
                        apply::peek_header(&pending).as_ref(),
                        booted.map(|b| b.slot.other()),
                        Some(msg.clone()),
                    );
                    if let Err(e) = apply::record(paths, &record) {
                        tracing::error!("cannot write {}: {e}", paths.record().display());
                    }
                    Err(anyhow::anyhow!(msg))
                }
            };
            std::fs::remove_file(&pending)
                .with_context(|| format!("cannot remove {}", pending.display()))?;
            let applied = outcome?;
            eprintln!(
                "applied generation {} to slot {}",
                applied.header.generation, applied.slot
            );
            if !no_reboot {
                reboot_now()?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckHealth {
            timeout_s,
            settle_s,
            unit,
            systemctl,
        } => {
            let since =
                updater::paths::boot_time_unix().map(|t| UNIX_EPOCH + Duration::from_secs(t));
            let opts = HealthOptions {
                data_dir: paths.data_dir.clone(),
                timeout: Duration::from_secs(timeout_s),
                unit: (!unit.is_empty()).then_some(unit),
                systemctl,
                since,
                settle: Duration::from_secs(settle_s),
            };
            match health::check_health(&opts) {
                Ok(h) => {
                    println!(
                        "healthy: the agent (board {}, version {}) answered on {} after {:.1} s",
                        h.board, h.version, h.url, h.secs
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("unhealthy: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Inspect { file, verify } => inspect(&file, verify),
        Cmd::Pack {
            board,
            generation,
            version,
            root,
            kernel,
            initrd,
            out,
        } => {
            use format::update::PartKind;
            let t = Instant::now();
            let now = updater::now_unix();
            let mut tmp = out.as_os_str().to_owned();
            tmp.push(".new");
            let tmp = PathBuf::from(tmp);
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?,
            );
            let h = format::update::write_artifact(
                &mut f,
                &board,
                generation.unwrap_or(now),
                &version,
                now,
                &[
                    (PartKind::Root, &root),
                    (PartKind::Kernel, &kernel),
                    (PartKind::Initrd, &initrd),
                ],
            )
            .with_context(|| format!("cannot write {}", out.display()))?;
            f.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .with_context(|| format!("cannot write {}", out.display()))?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
            let stored = h.payload_len();
            let len: u64 = h.parts.iter().map(|p| p.len).sum();
            eprintln!(
                "packed generation {} for board {} into {}: {} MiB → {} MiB in {:.1} s",
                h.generation,
                h.board,
                out.display(),
                len >> 20,
                stored >> 20,
                t.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs a checked plan, printing progress, and records the outcome either way.
fn execute(paths: &Paths, plan: apply::Plan) -> Result<apply::Applied> {
    let header = plan.header().clone();
    let target = plan.target;
    eprintln!(
        "updating slot {target} ({}) from generation {} (slot {}) to generation {} ({})",
        plan.device.display(),
        plan.booted().generation,
        plan.booted().slot,
        header.generation,
        header.version
    );
    let mut last_pct = None;
    let mut started = Instant::now();
    let result = plan.execute(&mut |ev| match ev {
        Event::Step(what) => eprintln!("  {what}…"),
        Event::Root { written, total } => {
            if written == 0 {
                started = Instant::now();
            }
            let pct = (written * 100).checked_div(total).unwrap_or(100) / 10 * 10;
            if last_pct != Some(pct) {
                last_pct = Some(pct);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                eprintln!(
                    "    {pct:3}%  {} / {} MiB  {:.0} MiB/s",
                    written >> 20,
                    total >> 20,
                    (written as f64 / (1 << 20) as f64) / secs
                );
            }
        }
        Event::Done(what, secs) => eprintln!("  {what}: {secs:.2} s"),
    });
    let (record, outcome) = match result {
        Ok(a) => (
            apply::outcome_record(Some(&header), Some(target), None),
            Ok(a),
        ),
        Err(e) => {
            let msg = e.chain();
            (
                apply::outcome_record(Some(&header), Some(target), Some(msg.clone())),
                Err(e),
            )
        }
    };
    apply::record(paths, &record).with_context(|| {
        format!(
            "cannot write the update record {}",
            paths.record().display()
        )
    })?;
    outcome.map_err(|e: ApplyError| anyhow::anyhow!("update failed: {}", e.chain()))
}

fn reboot_now() -> Result<()> {
    eprintln!("rebooting into the new slot");
    let st = std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
        .context("cannot run systemctl reboot")?;
    anyhow::ensure!(st.success(), "systemctl reboot failed: {st}");
    Ok(())
}

fn inspect(file: &std::path::Path, verify: bool) -> Result<ExitCode> {
    use format::update::{open_part, read_header};
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let head = read_header(&mut std::io::BufReader::new(&mut f))
        .with_context(|| format!("{} is not a usable update artifact", file.display()))?;
    let h = &head.header;
    println!(
        "board {}, generation {}, version {}, created at unix time {}",
        h.board, h.generation, h.version, h.created_unix
    );
    for p in &h.parts {
        println!(
            "  {:?}: {} bytes ({} stored), sha256 {}",
            p.kind,
            p.len,
            p.stored_len,
            agent::store::hex(&p.sha256)
        );
    }
    if verify {
        for p in &h.parts {
            let t = Instant::now();
            let mut r = open_part(&mut f, &head, p.kind)?;
            std::io::copy(&mut r, &mut std::io::sink())
                .map_err(format::update::UpdateError::from)
                .with_context(|| format!("{:?} part", p.kind))?;
            println!(
                "  {:?}: verified in {:.2} s",
                p.kind,
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
