//! `cargo xtask image --board NAME`: the appliance as a vendor ships it, under
//! `target/image/NAME/`: the `cloudlet` Debian package ([`deb`]), its unit's
//! `systemd-analyze security` report and its check in a clean Debian root
//! ([`install_test`]); the flashable A/B disk image ([`disk`]); the update artifact
//! ([`update`]); and, with `--boot-test`, the image booted under QEMU, updated well and
//! badly ([`boot_test`]). See docs/appliance-image.md.

pub mod boot_test;
pub mod deb;
pub mod disk;
pub mod install_test;
pub mod update;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::util::{cargo, run, step, target_dir, timed};

/// Options of `cargo xtask image`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The board (a file in board-configs/ without .toml: dev, minipc-4c).
    #[arg(long)]
    pub board: String,
    /// Do not install the package in a clean Debian root to check it.
    #[arg(long)]
    pub no_install_check: bool,
    /// Package the debug binaries already built (target/debug) instead of building release
    /// ones: for checking the packaging quickly (`cargo xtask test` does), not for shipping.
    #[arg(long)]
    pub debug_binaries: bool,
    /// Make only the package (step 1), not the disk image and the update artifact.
    #[arg(long)]
    pub package_only: bool,
    /// The generation slot A's root boots as and the update artifact carries (updates
    /// must be newer than what a box runs). Default: the current time in seconds.
    #[arg(long)]
    pub generation: Option<u64>,
    /// Factory provisioning: write this file's token as the operator token of every box
    /// flashed with the image (default: each box makes its own on first start).
    #[arg(long, value_name = "FILE")]
    pub operator_token_file: Option<std::path::PathBuf>,
    /// Then boot the image under QEMU (TCG, OVMF) and test it: the agent answers through a
    /// forwarded port and over mDNS, a good update switches slots, a bad one rolls back, the
    /// data stays. Without --operator-token-file the image is provisioned with a random
    /// token for the test: do not ship an image built this way.
    #[arg(long)]
    pub boot_test: bool,
    /// Only run the boot test, on the image built last (target/image/NAME/image.json): for
    /// working on the test or the box without rebuilding.
    #[arg(long)]
    pub test_only: bool,
}

/// Builds the image's steps for `a.board`.
pub fn image(a: &ImageArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = target_dir().join("image").join(&a.board);
    std::fs::create_dir_all(&out)?;
    // Checked first: a misspelt board fails before minutes of building.
    let board_text = deb::packaged_board(&a.board)?;
    let board = agent::board::Board::parse(&board_text, &a.board, None)?;
    if a.test_only {
        let img = board.image.as_ref().context("the board has no [image]")?;
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(MANIFEST))
                .context("no image built yet: run cargo xtask image --board NAME --boot-test")?,
        )?;
        let disk = disk::Disk {
            image: out.join(format!("cloudlet-{}.img", a.board)),
            root_fs: out.join("root.ext4"),
            kernel: out.join("vmlinuz"),
            initrd: out.join("initrd.img"),
            generation: m["generation"]
                .as_u64()
                .context("no generation in image.json")?,
        };
        let token = std::fs::read_to_string(out.join(TEST_TOKEN))
            .context("the last image was not built for the boot test (--boot-test)")?;
        let bin = target_dir().join(if a.debug_binaries { "debug" } else { "release" });
        return boot(&disk, &a.board, img.port, token.trim(), &bin, &out);
    }
    let bin_dir = if a.debug_binaries {
        timed(
            "building the debug binaries (agent, cloudlet, image-builder, vmm)",
            || {
                run(cargo().args([
                    "build",
                    "-p",
                    "agent",
                    "-p",
                    "image-builder",
                    "-p",
                    "vmm",
                    "-p",
                    "updater",
                ]))
            },
        )?;
        target_dir().join("debug")
    } else {
        timed(
            "building the release binaries (agent, cloudlet, image-builder, vmm)",
            || {
                run(cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "agent",
                    "-p",
                    "image-builder",
                    "-p",
                    "updater",
                ]))?;
                crate::util::build_release_vmm()
            },
        )?;
        target_dir().join("release")
    };
    let deb = timed("building the Debian package (dpkg-deb)", || {
        deb::build(&a.board, &bin_dir)
    })?;
    let size = std::fs::metadata(&deb)?.len();
    eprintln!("    {} ({:.1} MiB)", deb.display(), size as f64 / 1048576.0);
    timed("systemd-analyze security of the unit", || security(&out))?;
    if a.no_install_check {
        step("not checking the package in a clean Debian root (--no-install-check)");
    } else {
        let t = timed(
            &format!(
                "checking the package in a clean Debian {} root: install, run, use, stop, purge",
                install_test::SUITE
            ),
            || install_test::check(&deb, &board, &out),
        )?;
        eprintln!(
            "    unpack {:.1} s, install {:.1} s, agent serving after {:.2} s, purge {:.1} s",
            t.unpack_s, t.install_s, t.agent_ready_s, t.purge_s
        );
    }
    if a.package_only {
        step(&format!(
            "the package for board {} done in {:.1} s: {}",
            a.board,
            t0.elapsed().as_secs_f64(),
            deb.display()
        ));
        return Ok(());
    }
    let img = board.image.as_ref().with_context(|| {
        format!(
            "board-configs/{}.toml has no [image] section: say what its disk image is made of (see board-configs/dev.toml), or use --package-only",
            a.board
        )
    })?;
    let generation = a.generation.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let token = match &a.operator_token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the operator token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None if a.boot_test => {
            let t = test_token()?;
            agent::auth::write_private(&out.join(TEST_TOKEN), t.as_bytes())?;
            Some(t)
        }
        None => {
            let _ = std::fs::remove_file(out.join(TEST_TOKEN));
            None
        }
    };
    let bases = out.join("bases");
    let prepared = timed("making the board's base image and sample service", || {
        crate::demo::prepare_from(&bases, bin_dir.clone())
    })?;
    let stage = |data: &std::path::Path| -> Result<()> {
        crate::demo::Agent::stage(&prepared, data)?;
        // Each box makes its own identity (id, certificate) on first start.
        for f in ["agent.id", "tls"] {
            let p = data.join(f);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir_all(&p);
        }
        Ok(())
    };
    let disk = disk::build(
        &a.board,
        img,
        &deb,
        &out,
        generation,
        &stage,
        token.as_deref(),
        &deb::version(),
    )?;
    let art = timed(
        &format!(
            "writing the update artifact (generation {}: root, kernel, initrd; zstd, SHA-256)",
            disk.generation
        ),
        || {
            update::write(
                &out,
                &a.board,
                disk.generation,
                &deb::version(),
                &disk.root_fs,
                &disk.kernel,
                &disk.initrd,
            )
        },
    )?;
    eprintln!(
        "    {} ({:.1} MiB), sha256 {}",
        art.path.display(),
        art.bytes as f64 / 1048576.0,
        art.sha256
    );
    std::fs::write(
        out.join(MANIFEST),
        serde_json::to_string_pretty(&serde_json::json!({
            "board": a.board,
            "version": deb::version(),
            "generation": disk.generation,
            "image": disk.image.file_name().and_then(|n| n.to_str()),
            "package": deb.file_name().and_then(|n| n.to_str()),
            "update": art.path.file_name().and_then(|n| n.to_str()),
            "update_sha256": art.sha256,
            "update_bytes": art.bytes,
            "provisioned_token": token.is_some(),
        }))? + "\n",
    )?;
    if a.boot_test {
        boot(
            &disk,
            &a.board,
            img.port,
            token.as_deref().expect("a token for the boot test"),
            &bin_dir,
            &out,
        )?;
    }
    step(&format!(
        "image of board {} (generation {}) done in {:.1} s: {}",
        a.board,
        disk.generation,
        t0.elapsed().as_secs_f64(),
        disk.image.display()
    ));
    Ok(())
}

/// What the last build made (board, version, generation, file names, the update's SHA-256).
const MANIFEST: &str = "image.json";
/// The operator token an image built for the boot test was provisioned with.
const TEST_TOKEN: &str = "test-operator.token";

/// Runs the boot test on `disk` and prints what it measured.
fn boot(
    disk: &disk::Disk,
    board: &str,
    port: u16,
    token: &str,
    bin: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    let t = boot_test::run_test(
        disk,
        board,
        port,
        token,
        &deb::version(),
        bin,
        &out.join("boot-test"),
    )?;
    step(&format!(
        "image test passed in {:.0} s: API after {:.1} s, mDNS after {:.1} s ({:.1} s after the API); good update {:.1} s (upload {:.1}, write {:.1}, reboot {:.1}); rollback {:.1} s",
        t.total_s, t.api_s, t.mdns_s, t.mdns_after_api_s, t.good_update_s, t.upload_s, t.apply_s, t.reboot_s, t.rollback_s
    ));
    Ok(())
}

/// A random operator token for an image under test (32 hex digits from /dev/urandom).
fn test_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes `systemd-analyze security` of the unit (offline, from the file) to
/// `out/systemd-analyze-security.txt` and prints its verdict.
fn security(out: &std::path::Path) -> Result<()> {
    if !crate::util::have("systemd-analyze") {
        step("systemd-analyze is not installed here: no security report");
        return Ok(());
    }
    let unit = out.join(deb::UNIT);
    std::fs::write(&unit, deb::UNIT_FILE)?;
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .context("cannot run systemd-analyze")?;
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    std::fs::write(out.join("systemd-analyze-security.txt"), &text)?;
    let verdict = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no overall exposure level in its output)");
    eprintln!("    {}", verdict.trim());
    Ok(())
}
