//! The QEMU peer: `-M microvm` with KVM, booting the micro guest's ELF through its PVH note,
//! serial on stdio.

use std::path::Path;
use std::process::Command;

/// A QEMU microvm command for `guest` with `mem_mib` MiB, CPU model `cpu`, and `extra`
/// arguments before `-kernel`.
pub fn microvm(guest: &Path, mem_mib: u64, cpu: &str, extra: &[&str]) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off,isa-serial=on",
        "-enable-kvm",
        "-cpu",
        cpu,
    ])
    .args(["-m", &mem_mib.to_string(), "-smp", "1"])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .args(extra)
    .arg("-kernel")
    .arg(guest)
    .args(["-append", "console=ttyS0"]);
    c
}
