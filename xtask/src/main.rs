//! `cargo xtask`: the project's build tasks, in Rust (no shell scripts).

mod bench;
mod check;
mod demo;
mod flash;
mod guest;
mod image;
mod linux;
mod linux_base;
mod run;
mod test;
mod util;

use clap::{Parser, Subcommand};

/// Build, run, test and benchmark the cloudlet appliance software.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the no_std micro guest into target/guest/micro-guest.
    Guest,
    /// Build the micro guest and the vmm, boot the guest and show its service's answers.
    Run(run::RunArgs),
    /// The appliance end to end: agent on loopback, mDNS discovery, a service VM started over
    /// the API, verified requests through its forwarded port, timings.
    Demo,
    /// Build everything the tests need (guest, vmm, Debian's kernel), then run all tests.
    Test(test::TestArgs),
    /// Run a benchmark (boot, synthesis) and write target/bench/NAME.json.
    Bench(bench::BenchArgs),
    /// Download Debian's cloud kernel into target/linux/vmlinuz (for the boot-path tests).
    FetchLinux,
    /// Build the Linux service-VM base's kernel (cached by recipe outside the clone) and root
    /// filesystem into target/linux-base/.
    LinuxBase,
    /// Everything that must pass before pushing: fmt, clippy (workspace and guest), tests.
    Check,
    /// What a vendor ships for a board, under target/image/NAME/: the Debian package (agent,
    /// vmm, image-builder, cloudlet, cloudlet-update, hardened systemd unit, board config),
    /// checked in a clean Debian root; the flashable GPT disk image (minimal Debian, A/B root
    /// slots, data partition with the board's bases staged, booting into a running agent);
    /// the update artifact with its SHA-256. --boot-test boots the image under QEMU and
    /// updates it (good and bad). docs/appliance-image.md says more.
    Image(image::ImageArgs),
    /// Write a board's disk image to a whole disk and verify it (refuses mounted disks, the
    /// host's own disk, partitions, too-small devices; `--help` says all).
    #[command(long_about = flash::LONG_HELP)]
    Flash(flash::FlashArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Guest => guest::build().map(|_| 0),
        Cmd::Run(a) => run::boot(&a),
        Cmd::Demo => demo::demo().map(|_| 0),
        Cmd::Test(a) => test::run_tests(&a).map(|_| 0),
        Cmd::Bench(a) => bench::bench(&a).map(|_| 0),
        Cmd::FetchLinux => linux::fetch().map(|_| 0),
        Cmd::LinuxBase => linux_base::build().map(|_| 0),
        Cmd::Check => check::check().map(|_| 0),
        Cmd::Image(a) => image::image(&a).map(|_| 0),
        Cmd::Flash(a) => flash::flash(&a).map(|_| 0),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
