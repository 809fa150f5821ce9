//! The micro guest: the service VM of the cloudlet's tests, demos and benchmarks.
//!
//! `entry.rs` holds everything that runs at CPL0 (a few dozen instructions: tables, MSRs, PIC,
//! then `iretq`); `guest_main` below runs at CPL3, natively even on PVM hosts. It prints the
//! banner, runs the `micro.run=` commands, then serves requests from the serial console
//! (protocol in `micro_service::request` and docs/micro-guest.md).
#![no_std]
#![no_main]

mod cpu;
mod entry;
mod mem;
mod serial;

use core::fmt::Write;

use micro_service::{cmdline, model, FixedBuf, PrimeCounter, Request};
use serial::Serial;

/// Longest request line.
const LINE_MAX: usize = 1024;

/// The service's state.
struct Service {
    requests: u64,
    start_tsc: u64,
    tsc_hz: Option<u64>,
    primes: PrimeCounter,
    reply: FixedBuf<{ LINE_MAX + 64 }>,
    /// Bytes of RAM from `model::MODEL_BASE` to the end of its RAM range.
    model_room: u64,
    /// Entries of the loaded model table.
    model_entries: u64,
}

impl Service {
    /// Microseconds between two TSC readings, when the frequency is known.
    fn micros(&self, cycles: u64) -> Option<u64> {
        self.tsc_hz
            .map(|hz| (u128::from(cycles) * 1_000_000 / u128::from(hz.max(1))) as u64)
    }

    /// Handles one request line and prints its reply.
    fn handle(&mut self, line: &[u8], sep: u8) {
        self.requests += 1;
        self.reply.clear();
        let mut power_off = None;
        let r = &mut self.reply;
        match Request::parse(line, sep) {
            Ok(Request::Primes(n)) => {
                let t0 = cpu::rdtsc();
                let count = self.primes.count(n).unwrap_or(0);
                let cycles = cpu::rdtsc() - t0;
                let _ = write!(r, "ok primes N={n} count={count}");
                match self
                    .tsc_hz
                    .map(|hz| u128::from(cycles) * 1_000_000 / u128::from(hz.max(1)))
                {
                    Some(us) => {
                        let _ = write!(r, " us={us}");
                    }
                    None => {
                        let _ = write!(r, " cycles={cycles}");
                    }
                }
            }
            Ok(Request::Echo(text)) => {
                r.push_bytes(b"ok echo ");
                r.push_bytes(text);
            }
            Ok(Request::Stats) => {
                let up = cpu::rdtsc() - self.start_tsc;
                let _ = write!(r, "ok stats requests={}", self.requests);
                let _ = match self.tsc_hz {
                    Some(hz) => write!(
                        r,
                        " uptime_us={}",
                        u128::from(up) * 1_000_000 / u128::from(hz.max(1))
                    ),
                    None => write!(r, " uptime_cycles={up}"),
                };
            }
            Ok(Request::Load(mib)) => {
                let bytes = mib << 20;
                if bytes > self.model_room {
                    let _ = write!(
                        r,
                        "err not enough memory: load {mib} needs {mib} MiB above 16 MiB, the guest has {} MiB there",
                        self.model_room >> 20
                    );
                } else {
                    let t0 = cpu::rdtsc();
                    // SAFETY: `model_room` bytes from MODEL_BASE are RAM (from the firmware
                    // memory map), identity-mapped and used by nothing else.
                    let table = unsafe {
                        core::slice::from_raw_parts_mut(
                            model::MODEL_BASE as *mut u64,
                            (bytes / 8) as usize,
                        )
                    };
                    let sum = model::fill(table, 0);
                    self.model_entries = bytes / 8;
                    let cycles = cpu::rdtsc() - t0;
                    let us = self.tsc_hz.map_or(0, |hz| {
                        (u128::from(cycles) * 1_000_000 / u128::from(hz.max(1))) as u64
                    });
                    let _ = write!(r, "ok load mib={mib} sum={sum} us={us}");
                }
            }
            Ok(Request::Query(i)) => {
                if i < self.model_entries {
                    // SAFETY: entry i lies inside the loaded table (checked above).
                    let v = unsafe { ((model::MODEL_BASE + i * 8) as *const u64).read_volatile() };
                    let _ = write!(r, "ok query i={i} value={v}");
                } else {
                    let _ = write!(
                        r,
                        "err query {i} is beyond the loaded table ({} entries; use load first)",
                        self.model_entries
                    );
                }
            }
            Ok(Request::Poweroff(code)) => {
                let _ = write!(r, "ok poweroff code={code}");
                power_off = Some(code);
            }
            Err(e) => {
                let _ = write!(r, "err {e}");
            }
        }
        r.push_bytes(b"\n");
        serial::write(r.as_bytes());
        if let Some(code) = power_off {
            cpu::poweroff(code);
        }
    }
}

/// The kernel command line from the boot information of either entry protocol.
fn command_line(boot_info: u64, protocol: u64) -> &'static [u8] {
    let ptr = match protocol {
        // Linux: boot_params.hdr.cmd_line_ptr (0x228) | ext_cmd_line_ptr (0x0c8) << 32.
        0 if boot_info != 0 => {
            // SAFETY: the boot protocol gives a readable boot_params page at `boot_info`,
            // identity-mapped.
            let (lo, hi) = unsafe {
                (
                    ((boot_info + 0x228) as *const u32).read_volatile(),
                    ((boot_info + 0x0c8) as *const u32).read_volatile(),
                )
            };
            u64::from(lo) | (u64::from(hi) << 32)
        }
        // PVH: hvm_start_info.cmdline_paddr (0x18), after checking the magic.
        1 if boot_info != 0 => {
            // SAFETY: PVH passes a readable hvm_start_info at `boot_info`, identity-mapped.
            let (magic, ptr) = unsafe {
                (
                    (boot_info as *const u32).read_volatile(),
                    ((boot_info + 0x18) as *const u64).read_volatile(),
                )
            };
            if magic == 0x336e_c578 {
                ptr
            } else {
                0
            }
        }
        _ => 0,
    };
    if ptr == 0 || ptr >= 0xc000_0000 {
        return b"";
    }
    // SAFETY: the command line lies in guest RAM below the MMIO gap, identity-mapped; we read
    // at most 4 KiB (the VMM's limit) and stop at the NUL.
    let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, 4096) };
    cmdline::until_nul(bytes)
}

/// Bytes of RAM from `model::MODEL_BASE` to the end of the RAM range holding it, from the
/// e820 map (Linux boot_params: count at 0x1e8, 20-byte entries at 0x2d0) or the PVH memmap
/// (address at 0x28, count at 0x30, 24-byte entries); 0 when there is none.
fn model_room(boot_info: u64, protocol: u64) -> u64 {
    if boot_info == 0 {
        return 0;
    }
    // SAFETY: the boot information block and the map it points to are readable RAM,
    // identity-mapped; counts are bounded below.
    let read64 = |a: u64| unsafe { (a as *const u64).read_volatile() };
    // SAFETY: as above.
    let read32 = |a: u64| unsafe { (a as *const u32).read_volatile() };
    let (table, count, stride) = if protocol == 0 {
        // SAFETY: as above.
        let n = unsafe { ((boot_info + 0x1e8) as *const u8).read_volatile() };
        (boot_info + 0x2d0, u64::from(n).min(128), 20)
    } else {
        if read32(boot_info) != 0x336e_c578 {
            return 0;
        }
        (
            read64(boot_info + 0x28),
            u64::from(read32(boot_info + 0x30)).min(128),
            24,
        )
    };
    if table == 0 || table >= 0xc000_0000 {
        return 0;
    }
    for k in 0..count {
        let e = table + k * stride;
        let (addr, size, kind) = (read64(e), read64(e + 8), read32(e + 16));
        let end = addr.saturating_add(size).min(0xc000_0000);
        if kind == 1 && addr <= model::MODEL_BASE && model::MODEL_BASE < end {
            return end - model::MODEL_BASE;
        }
    }
    0
}

/// CPL3 entry, called from entry.rs with the boot information.
#[no_mangle]
extern "C" fn guest_main(boot_info: u64, protocol: u64, entry_tsc: u64) -> ! {
    let now = cpu::rdtsc();
    serial::init();
    let tsc_hz = cpu::tsc_hz();
    let mut svc = Service {
        requests: 0,
        start_tsc: entry_tsc,
        tsc_hz,
        primes: PrimeCounter::new(),
        reply: FixedBuf::new(),
        model_room: model_room(boot_info, protocol),
        model_entries: 0,
    };
    let entry = if protocol == 1 { "pvh" } else { "linux64" };
    let boot = now.wrapping_sub(entry_tsc);
    let _ = match svc.micros(boot) {
        Some(us) => writeln!(
            Serial,
            "micro-guest {} ready boot_us={us} entry={entry}",
            env!("CARGO_PKG_VERSION")
        ),
        None => writeln!(
            Serial,
            "micro-guest {} ready boot_cycles={boot} entry={entry}",
            env!("CARGO_PKG_VERSION")
        ),
    };
    for cmd in cmdline::run_commands(command_line(boot_info, protocol)) {
        svc.handle(cmd, b':');
    }
    let mut line = [0u8; LINE_MAX];
    loop {
        match serial::read_line(&mut line) {
            Ok(l) if l.iter().all(u8::is_ascii_whitespace) => {}
            Ok(l) => svc.handle(l, b' '),
            Err(()) => {
                svc.requests += 1;
                serial::write(b"err line too long (at most 1024 bytes)\n");
            }
        }
    }
}

/// CPU exception (at CPL0, from entry.rs): report and power off with status 3.
#[no_mangle]
extern "C" fn guest_exception(vector: u64, error: u64, rip: u64) -> ! {
    let _ = writeln!(
        Serial,
        "panic: exception {vector} err={error:#x} rip={rip:#x}"
    );
    cpu::poweroff(3)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Serial, "panic: {}", info.message());
    cpu::poweroff(2)
}
