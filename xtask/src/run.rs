//! `cargo xtask run`: builds the micro guest and the VMM and boots the guest, showing its
//! banner and the answers of its sample service.

use anyhow::Result;

use crate::util::{step, target_dir};

/// Options of `cargo xtask run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Commands for the guest's service (`:` separates a command from its argument). Empty
    /// for an interactive session on the serial console (type `poweroff` to end it).
    #[arg(
        long,
        default_value = "primes:10000000,echo:hello-from-the-guest,stats,poweroff:0"
    )]
    pub commands: String,
    /// Entry protocol (`linux` or `pvh`).
    #[arg(long, default_value = "linux")]
    pub boot: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
}

/// Builds and boots the micro guest; returns the VMM's exit status.
pub fn boot(args: &RunArgs) -> Result<i32> {
    let guest = crate::guest::build()?;
    step("building the vmm (release)");
    crate::util::build_release_vmm()?;
    let vmm = target_dir().join("release/vmm");
    let mut cmdline = String::from("console=ttyS0");
    if !args.commands.is_empty() {
        cmdline.push_str(" micro.run=");
        cmdline.push_str(&args.commands);
    }
    step(&format!(
        "booting {} under our vmm: {} MiB, --boot {}, cmdline '{cmdline}'",
        guest.display(),
        args.mem,
        args.boot
    ));
    let started = std::time::Instant::now();
    let status = std::process::Command::new(&vmm)
        .arg("run")
        .arg("--kernel")
        .arg(&guest)
        .args([
            "--mem",
            &args.mem.to_string(),
            "--boot",
            &args.boot,
            "--cmdline",
            &cmdline,
        ])
        .status()?;
    let code = status.code().unwrap_or(1);
    step(&format!(
        "vmm exited with status {code} after {:.1} ms (whole process, including the guest's work)",
        started.elapsed().as_secs_f64() * 1e3
    ));
    Ok(code)
}
