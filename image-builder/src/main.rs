//! `image-builder`: make base images and application overlays for the cloudlet.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use format::overlay::{BuildOptions, Overlay};
use format::progress::Step;
use image_builder::{base, overlay};

/// Build cloudlet base images and application overlays.
///
/// A base is a guest booted to its ready point and snapshotted (≤ 8 MiB on disk for the micro
/// guest); an overlay is what one application changes in it (RAM δ in compressed chunks plus
/// the VM state), from which `vmm synthesize` makes a ready service VM in milliseconds.
#[derive(Parser, Debug)]
#[command(name = "image-builder", version, about, long_about)]
struct Cli {
    /// More logging on stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel to its ready point and keep it as a base image directory.
    ///
    /// Example: image-builder base --kernel target/guest/micro-guest --out bases/micro
    Base {
        /// Guest kernel (ELF or bzImage).
        #[arg(long, required_unless_present = "linux")]
        kernel: Option<PathBuf>,
        /// The Linux service-VM base made by `cargo xtask linux-base` (a directory holding
        /// `vmlinux`, `rootfs.ext4` and `cmdline`): its kernel, its root filesystem as the
        /// disk, its command line, a NIC, and `cloudlet-linux ready` as the ready line.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "disk", "cmdline", "ready"])]
        linux: Option<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// Start of the console line that means "ready".
        #[arg(long, default_value = "micro-guest ")]
        ready: String,
        /// Replace an existing output directory.
        #[arg(long)]
        force: bool,
        /// Include this raw image as the guest's root disk (virtio-blk; VMs made from the base
        /// read it shared and write to their own copy-on-write δ).
        #[arg(long, value_name = "FILE")]
        disk: Option<PathBuf>,
        /// Give the guest a NIC (virtio-net); each VM made from the base picks its backend
        /// (`vmm synthesize --forward ...`).
        #[arg(long)]
        net: bool,
        /// Give the guest a virtio console and talk to it there instead of on the serial
        /// port: VMs made from the base then exchange console lines in a few VM exits
        /// instead of two per byte (the micro guest uses it when present).
        #[arg(long)]
        console: bool,
    },
    /// Build an application overlay against a base.
    ///
    /// From a snapshot of a customised VM (--from), or by restoring the base and running a
    /// script on its console (--script 'load:16'); the script's snapshot is kept with
    /// --keep-snapshot.
    Overlay {
        /// Base image directory.
        #[arg(long)]
        base: PathBuf,
        /// Snapshot of the customised VM (from `vmm snapshot`).
        #[arg(long, conflicts_with = "script", required_unless_present = "script")]
        from: Option<PathBuf>,
        /// Console commands that customise the base, `,`-separated, `:` between words
        /// (`put:7:42`); may be empty when --file places what the service needs.
        #[arg(long)]
        script: Option<String>,
        /// Place a file on the guest's disk before it is restored: GUEST=HOST, GUEST a place
        /// on the raw disk (`/dev/vda@OFFSET`, a byte offset), HOST the file to copy there
        /// (at most 256 KiB; repeat up to 16 times, 1 MiB in all). Needs --script.
        #[arg(long = "file", value_name = "GUEST=HOST", requires = "script")]
        files: Vec<String>,
        /// Where to keep the customised snapshot made for --script.
        #[arg(long)]
        keep_snapshot: Option<PathBuf>,
        /// Output overlay file.
        #[arg(long)]
        out: PathBuf,
        /// zstd level (1-22).
        #[arg(long, default_value_t = BuildOptions::default().level)]
        level: i32,
        /// Pages per compressed chunk (1-1024).
        #[arg(long, default_value_t = BuildOptions::default().chunk_pages)]
        chunk_pages: u64,
        /// `json`: print the steps of a --script build on stdout as they happen, one JSON
        /// object per line (`format::progress`), ending with `done` or `failed`, instead of
        /// the summary line.
        #[arg(long, value_parser = ["json"])]
        progress: Option<String>,
    },
    /// Turn an existing VM disk (qcow2 or raw) into a base's disk: raw, whole 4 KiB blocks,
    /// read back equal to the source, for `image-builder base --disk`.
    ///
    /// Refused, with nothing written: images with a backing file, encrypted images,
    /// compression other than zlib/zstd, damaged or truncated images, other formats.
    /// Needs qemu-img (Debian's qemu-utils).
    ///
    /// Example: image-builder import old-service.qcow2 --out service.disk
    Import {
        /// The disk image to import.
        src: PathBuf,
        /// Where to write the base's disk.
        #[arg(long)]
        out: PathBuf,
        /// Don't probe the format: the source is this one (qcow2 or raw).
        #[arg(long, value_parser = ["qcow2", "raw"])]
        format: Option<String>,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
    /// Recompute a base's content id and compare it with its manifest.
    Verify {
        /// Base image directory.
        base: PathBuf,
    },
    /// Check an overlay (header, index, every chunk) and describe it.
    Info {
        /// Overlay file.
        overlay: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(if cli.verbose {
            tracing::Level::DEBUG
        } else {
            tracing::Level::WARN
        })
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("image-builder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `--file GUEST=HOST` arguments, read.
fn read_files(args: &[String]) -> Result<Vec<overlay::DiskFile>> {
    args.iter()
        .map(|a| {
            let (guest, host) = a.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("--file {a}: write GUEST=HOST (e.g. /dev/vda@568=entry.bin)")
            })?;
            format::disk_file::parse(guest)?;
            let meta = std::fs::metadata(host)
                .with_context(|| format!("--file {a}: cannot read '{host}'"))?;
            if meta.len() > format::disk_file::MAX_FILE_BYTES as u64 {
                anyhow::bail!(
                    "--file {a}: '{host}' holds {} bytes, at most {} are placed per file",
                    meta.len(),
                    format::disk_file::MAX_FILE_BYTES
                );
            }
            Ok(overlay::DiskFile {
                path: guest.to_string(),
                data: std::fs::read(host)
                    .with_context(|| format!("--file {a}: cannot read '{host}'"))?,
            })
        })
        .collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Base {
            kernel,
            linux,
            out,
            mem,
            cmdline,
            ready,
            force,
            disk,
            net,
            console,
        } => {
            let t0 = std::time::Instant::now();
            let (kernel, disk, cmdline, ready, net) = match linux {
                Some(dir) => {
                    let l = base::LinuxParts::open(&dir)?;
                    (
                        l.kernel,
                        Some(l.rootfs),
                        l.cmdline,
                        base::LINUX_READY.into(),
                        true,
                    )
                }
                None => (
                    kernel.expect("clap requires --kernel"),
                    disk,
                    cmdline,
                    ready,
                    net,
                ),
            };
            let m = base::build(&base::BaseSpec {
                kernel,
                out: out.clone(),
                mem_mib: mem,
                cmdline,
                ready,
                timeout: Duration::from_secs(30),
                force,
                disk,
                net,
                console,
            })?;
            println!(
                "base {} in {}: {} MiB RAM, {:.2} MiB on disk, built in {:.0} ms",
                m.id,
                out.display(),
                m.mem_mib,
                mib(base::base_disk_bytes(&out)),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Command::Overlay {
            base,
            from,
            script,
            files,
            keep_snapshot,
            out,
            level,
            chunk_pages,
            progress,
        } => {
            let json = progress.is_some();
            let emit = |s: Step| {
                use std::io::Write;
                let mut o = std::io::stdout().lock();
                let sent = o.write_all(s.to_line().as_bytes()).and_then(|_| o.flush());
                if sent.is_err() {
                    // The supervisor following the build is gone (an agent that died): a
                    // build nobody will install is not worth a VM.
                    eprintln!("image-builder: nobody reads the progress any more; stopping");
                    std::process::exit(1);
                }
            };
            let t0 = std::time::Instant::now();
            let opts = BuildOptions {
                level,
                chunk_pages,
                ..BuildOptions::default()
            };
            let stats = match (from, script) {
                (Some(snap), _) => overlay::from_snapshot(&base, &snap, &out, opts)?,
                (None, Some(script)) => {
                    let tmp;
                    let snap = match &keep_snapshot {
                        Some(p) => p.clone(),
                        None => {
                            tmp = std::env::temp_dir()
                                .join(format!("image-builder-{}", std::process::id()));
                            tmp.clone()
                        }
                    };
                    let r = read_files(&files).and_then(|files| {
                        overlay::from_script(
                            &base,
                            &script,
                            &files,
                            &snap,
                            &out,
                            opts,
                            Duration::from_secs(120),
                            &mut |s| {
                                if json {
                                    emit(s)
                                }
                            },
                        )
                    });
                    if keep_snapshot.is_none() {
                        let _ = std::fs::remove_dir_all(&snap);
                    }
                    match r {
                        Ok(s) => s,
                        Err(e) if json => {
                            let _ = std::fs::remove_file(&out);
                            emit(Step::Failed {
                                error: format!("{e:#}"),
                            });
                            return Err(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                (None, None) => unreachable!("clap requires --from or --script"),
            };
            let size = std::fs::metadata(&out)?.len();
            if json {
                emit(Step::Done {
                    bytes: size,
                    pages: stats.data,
                });
                return Ok(());
            }
            println!(
                "overlay {}: {:.2} MiB; pages: {} same, {} zero, {} base-dedup, {} self-dedup, {} data ({:.2} MiB); disk δ: {} blocks; {:.2} MiB compressed; built in {:.0} ms",
                out.display(),
                mib(size),
                stats.same,
                stats.zero,
                stats.base_dedup,
                stats.self_dedup,
                stats.data,
                mib(stats.data * 4096),
                stats.disk_blocks,
                mib(stats.compressed_bytes),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Command::Import {
            src,
            out,
            format,
            force,
        } => {
            use image_builder::import::{import, SourceFormat};
            let t0 = std::time::Instant::now();
            let forced = format.map(|f| match f.as_str() {
                "qcow2" => SourceFormat::Qcow2,
                _ => SourceFormat::Raw,
            });
            let i = import(&src, &out, forced, force)?;
            println!(
                "imported {} ({:?}, {:.2} MiB virtual{}) into {}: {:.2} MiB raw disk, read back equal, in {:.0} ms",
                src.display(),
                i.format,
                mib(i.virtual_bytes),
                if i.leaks > 0 {
                    format!(", {} leaked clusters ignored", i.leaks)
                } else {
                    String::new()
                },
                out.display(),
                mib(i.disk_bytes),
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        Command::Verify { base: dir } => {
            let m = base::verify(&dir)?;
            println!("base {} is intact ({} MiB RAM)", m.id, m.mem_mib);
        }
        Command::Info { overlay } => {
            let ov = Overlay::open(&overlay)?;
            let mut buf = Vec::new();
            let chunks = ov.index().chunks.len() + ov.index().disk_chunks.len();
            for i in 0..chunks {
                ov.read_chunk(i, &mut buf)?;
            }
            let s = ov.index().stats;
            println!(
                "overlay for base {}: {} pages ({} MiB), {} chunks (all intact), {} data pages, {} zero, {} base-dedup, {} self-dedup, disk δ {} blocks of a {} MiB disk, state {} B",
                format::base::hex(ov.base_id()),
                s.pages,
                s.pages / 256,
                chunks,
                s.data,
                s.zero,
                s.base_dedup,
                s.self_dedup,
                s.disk_blocks,
                ov.index().disk_bytes >> 20,
                ov.index().state.len()
            );
        }
    }
    Ok(())
}
