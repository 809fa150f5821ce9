//! `cloudlet-init`: PID 1 of the Linux service-VM base, and its sample service.
//!
//! As PID 1 it mounts `/proc` and `/sys`, reads the kernel command line (`micro.port=` for
//! the TCP port, default 80; `cloudlet.table=` for the disk holding the table, default
//! the first virtio disk whose first sector holds its magic; the kernel's own `ip=` for the address it reports), listens, prints
//! `cloudlet-linux ready port=P uptime_ms=T` on the console — the base's ready point — and
//! serves the micro guest's protocol. `poweroff` powers the VM off.
//!
//! Run as an ordinary program (not PID 1), `cloudlet-init --listen ADDR [--table FILE]`
//! serves on ADDR and `poweroff CODE` exits with CODE: the host tests use that.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use linux_service::disk::TableDisk;
use linux_service::{server, NetInfo, Service};
use micro_service::cmdline;

fn main() {
    let pid1 = std::process::id() == 1;
    if let Err(e) = run(pid1) {
        eprintln!("cloudlet-init: {e}");
    }
    if pid1 {
        // PID 1 must not exit (the kernel would panic): stop the VM instead.
        power_off(1);
    }
    std::process::exit(1);
}

/// The `ip=` address as `A.B.C.D/N` (the kernel's static form
/// `ip=CLIENT:SERVER:GW:NETMASK:…`), `dhcp` for DHCP, `None` without `ip=`.
fn kernel_ip(cmdline: &str) -> Option<String> {
    let v = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))?;
    let fields: Vec<&str> = v.split(':').collect();
    if fields.len() < 4 || fields[0].is_empty() {
        return Some(v.to_string());
    }
    let prefix = fields[3]
        .parse::<std::net::Ipv4Addr>()
        .map(|m| u32::from(m).count_ones())
        .unwrap_or(24);
    Some(format!("{}/{prefix}", fields[0]))
}

fn run(pid1: bool) -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let cmdline = if pid1 {
        mount("proc", "/proc");
        mount("sysfs", "/sys");
        std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
    } else {
        String::new()
    };
    let port = cmdline::port(cmdline.as_bytes());
    let listen = arg("--listen").unwrap_or_else(|| format!("0.0.0.0:{port}"));
    let table = arg("--table")
        .or_else(|| {
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix("cloudlet.table="))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| table_device().unwrap_or_else(|| "/dev/vdb".into()));
    let disk = TableDisk::open(&PathBuf::from(&table)).map_err(|e| format!("{table}: {e}"));
    let net = NetInfo {
        mac: std::fs::read_to_string("/sys/class/net/eth0/address")
            .ok()
            .map(|m| m.trim().to_string()),
        ip: kernel_ip(&cmdline),
        port,
    };
    let listener =
        TcpListener::bind(&listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |s| (s * 1e3) as u64);
    println!(
        "cloudlet-linux ready port={} uptime_ms={uptime_ms}",
        bound.port()
    );
    let service = Arc::new(Mutex::new(Service::new(disk, net)));
    server::serve(listener, service, if pid1 { power_off } else { exit_with });
    Ok(())
}

/// The first of the VM's other virtio disks whose sector 0 holds the table's magic (the root
/// disk's does not).
fn table_device() -> Option<String> {
    ["/dev/vdb", "/dev/vdc", "/dev/vdd", "/dev/vda"]
        .into_iter()
        .find(|d| {
            let mut magic = [0u8; 8];
            std::fs::File::open(d)
                .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0))
                .is_ok_and(|()| magic == micro_service::table::MAGIC)
        })
        .map(str::to_owned)
}

/// Mounts the pseudo file system `fstype` on `dir` (a failure is reported, not fatal).
fn mount(fstype: &str, dir: &str) {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in a constant");
    let (src, target, fs) = (c(fstype), c(dir), c(fstype));
    // SAFETY: all pointers are NUL-terminated strings alive for the call; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        eprintln!(
            "cloudlet-init: cannot mount {fstype} on {dir}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The exit port: our vmm (and QEMU's `isa-debug-exit,iobase=0x501`) ends the VM with the
/// byte written there, as the micro guest powers off.
const EXIT_PORT: u16 = 0x501;

/// Powers the VM off with `code` (PID 1): flushes file systems, writes `code` to the exit
/// port, and where no device listens there, `reboot(POWER_OFF)`.
fn power_off(code: u8) {
    // SAFETY: sync takes no arguments; ioperm only changes this process's I/O bitmap.
    let io = unsafe {
        libc::sync();
        libc::ioperm(libc::c_ulong::from(EXIT_PORT), 1, 1)
    };
    if io == 0 {
        // SAFETY: the port was granted to this process just above; writing it has no effect
        // on this process's memory (a VMM ends the VM, or nothing listens).
        unsafe {
            std::arch::asm!("out dx, al", in("dx") EXIT_PORT, in("al") code, options(nomem, nostack));
        }
    }
    // SAFETY: reboot takes no pointers; as PID 1 (CAP_SYS_BOOT) this powers off.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
}

/// Ends the process with `code` (not PID 1).
fn exit_with(code: u8) {
    std::process::exit(i32::from(code));
}

#[cfg(test)]
mod tests {
    use super::kernel_ip;

    #[test]
    fn reads_the_kernels_ip_setting() {
        assert_eq!(
            kernel_ip("root=/dev/vda ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off ro"),
            Some("10.0.2.15/24".into())
        );
        assert_eq!(kernel_ip("ip=dhcp"), Some("dhcp".into()));
        assert_eq!(kernel_ip("console=ttyS0"), None);
    }
}
