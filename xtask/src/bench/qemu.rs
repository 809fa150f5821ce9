//! The QEMU peer: `-M microvm` with KVM, booting the micro guest's ELF through its PVH note,
//! its console on stdio (the 16550, or a virtio console as our VMs get with `--console`).

use std::path::Path;
use std::process::Command;

/// A QEMU microvm command for `guest` with `mem_mib` MiB, CPU model `cpu`, and `extra`
/// arguments before `-kernel`.
pub fn microvm(guest: &Path, mem_mib: u64, cpu: &str, extra: &[&str]) -> Command {
    machine(guest, "", mem_mib, cpu, &["-serial", "stdio"], extra)
}

/// As [`microvm`], with the console on a virtio console instead of the serial port: QEMU's
/// virtio-serial device (modern virtio-mmio), which acts as a single-port console since the
/// micro guest declines MULTIPORT; the 16550 is there but goes nowhere. Without ACPI, so
/// that QEMU lists its virtio-mmio devices on the kernel command line, where the guest looks.
pub fn microvm_console(guest: &Path, mem_mib: u64, cpu: &str, extra: &[&str]) -> Command {
    let console = [
        "-serial",
        "null",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-serial-device",
        "-chardev",
        "stdio,id=con0",
        "-device",
        "virtconsole,chardev=con0",
    ];
    machine(guest, ",acpi=off", mem_mib, cpu, &console, extra)
}

fn machine(
    guest: &Path,
    options: &str,
    mem_mib: u64,
    cpu: &str,
    console: &[&str],
    extra: &[&str],
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        &format!("microvm,x-option-roms=off,rtc=off,isa-serial=on{options}"),
        "-enable-kvm",
        "-cpu",
        cpu,
    ])
    .args(["-m", &mem_mib.to_string(), "-smp", "1"])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(console)
    .args(extra)
    .arg("-kernel")
    .arg(guest)
    .args(["-append", "console=ttyS0"]);
    c
}
