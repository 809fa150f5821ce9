//! `vmm`: boot a guest kernel under KVM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use vmm::config::{SerialOutput, VmConfig, DEFAULT_CMDLINE};
use vmm::exit::ExitReason;
use vmm::loader::{BootProtocol, KernelConfig};

/// A minimal KVM virtual machine monitor for the cloudlet appliance.
///
/// Exit status: the guest's power-off code (0–255) when it powers off through port 0x501;
/// 0 when it resets; 124 when it crashes (triple fault, instruction emulation failure, failed
/// VM entry — the registers are printed); 1 when the VMM itself fails (bad kernel, no KVM,
/// bad options); 128+N when stopped by signal N.
#[derive(Parser, Debug)]
#[command(name = "vmm", version, about, long_about)]
struct Cli {
    /// More logging on stderr (-v: timings and decisions, -vv: every unhandled exit).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a kernel (ELF vmlinux, our micro guest, or bzImage) and run it until it stops.
    ///
    /// Example: vmm run --kernel micro-guest --cmdline 'micro.run=primes:1000000,poweroff:0'
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kernel image: an x86-64 ELF (entered through the Linux 64-bit boot protocol, or PVH
    /// with --boot pvh) or a bzImage.
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    /// Initial ramdisk, placed at the top of low memory.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB (memory beyond 3 GiB is placed above 4 GiB).
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// Where the guest's serial console (COM1) goes: `stdout`, `null`, or a file path.
    #[arg(long, value_name = "stdout|null|FILE", default_value = "stdout")]
    serial: String,
    /// Do not connect standard input to the guest's serial console.
    #[arg(long)]
    no_stdin: bool,
    /// Entry protocol: `linux` (64-bit boot protocol) or `pvh` (32-bit PVH entry from the
    /// ELF note, as QEMU and Firecracker use).
    #[arg(long, value_enum, default_value_t = Boot::Linux)]
    boot: Boot,
    /// KVM device node.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm_device: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Boot {
    Linux,
    Pvh,
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<ExitReason> {
    let serial = match args.serial.as_str() {
        "stdout" => SerialOutput::Stdout,
        "null" => SerialOutput::Null,
        path => SerialOutput::File(path.into()),
    };
    let kernel = KernelConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        protocol: match args.boot {
            Boot::Linux => BootProtocol::Linux,
            Boot::Pvh => BootProtocol::Pvh,
        },
    };
    let mut cfg = VmConfig::new(kernel, args.mem, args.vcpus, serial, !args.no_stdin)?;
    cfg.kvm_path = args.kvm_device;
    let machine = vmm::builder::build_for_boot(&cfg).context("failed to start the VM")?;
    machine.run().context("the VMM event loop failed")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(reason) => {
            match &reason {
                ExitReason::Crashed(msg) => eprintln!("vmm: guest crashed: {msg}"),
                ExitReason::Error(msg) => eprintln!("vmm: error while running the guest: {msg}"),
                other => tracing::debug!(?other, "VM stopped"),
            }
            ExitCode::from(reason.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
