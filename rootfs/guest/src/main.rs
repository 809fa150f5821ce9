//! The micro guest: the service VM of the cloudlet's tests, demos and benchmarks.
//!
//! `entry.rs` holds everything that runs at CPL0 (a few dozen instructions: tables, MSRs, PIC,
//! then `iretq`); `guest_main` below runs at CPL3, natively even on PVM hosts. It finds its
//! virtio-mmio devices on the command line (a disk, a network card and a console, all
//! optional), prints the banner, runs the `micro.run=` commands, then serves requests from its
//! console and, with a network card, over TCP (protocol in `micro_service::request`,
//! `micro_service::frame` and docs/micro-guest.md).
//!
//! The console is the virtio console when there is one, else COM1: the banner, the replies to
//! the `micro.run=` commands and the request/reply lines all go through it (COM1 is then left
//! alone; panics still go to COM1).
//!
//! The main loop polls everything (console, network) and, when nothing is left to do, sleeps
//! in the one system call (`sti; hlt` at CPL0) until an interrupt: the serial port's, a
//! device's, or the PIT armed for the TCP stack's next timer.
#![no_std]
#![no_main]

mod arena;
mod blk;
mod clock;
mod console;
mod cpu;
mod disk;
mod entry;
mod irq;
mod mem;
mod net;
mod serial;
mod server;
mod virtio;

use core::fmt::Write;

use micro_service::cmdline;
use micro_service::{model, ram, FixedBuf, Line, LineReader, PrimeCounter, Request};
use serial::Serial;

/// Longest request line.
const LINE_MAX: usize = 1024;

// A reply (at most `LINE_MAX + 64` bytes with its `\n`) takes one virtio console write: one
// transmit buffer, one notification.
const _: () = assert!(console::TX_BUF >= LINE_MAX + 64);

/// What the `net` request reports.
#[derive(Clone, Copy)]
struct NetInfo {
    mac: [u8; 6],
    ip: Option<([u8; 4], u8)>,
    port: u16,
}

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
    /// The regions in use above 16 MiB: model table, base content, dirtier's buffer.
    layout: ram::Layout,
    /// The steady page dirtier's pacing.
    dirtier: ram::Dirtier,
    /// The counter `incr` and `count` change and read.
    counter: u64,
    /// Whether IRQ 0 (the PIT) is enabled as the wake-up timer.
    timer: bool,
    /// The disk table, or why there is none.
    disk: Result<disk::Disk, &'static str>,
    /// The network interface, or why there is none.
    net: Result<NetInfo, &'static str>,
    /// The virtio console, when there is one: the service's console instead of COM1.
    console: Option<console::Console>,
}

/// Writes `bytes` to the service's console: the virtio console when there is one, else COM1.
fn print(console: &mut Option<console::Console>, bytes: &[u8]) {
    match console {
        Some(c) => c.write(bytes),
        None => serial::write(bytes),
    }
}

impl Service {
    /// Microseconds between two TSC readings, when the frequency is known.
    fn micros(&self, cycles: u64) -> Option<u64> {
        self.tsc_hz
            .map(|hz| (u128::from(cycles) * 1_000_000 / u128::from(hz.max(1))) as u64)
    }

    /// Writes the pages the dirtier owes by `now_us`: one word (the write's number) at the
    /// start of each successive page of its buffer.
    fn dirty_pages(&mut self, now_us: u64) {
        let start = self.layout.dirty_start();
        for _ in 0..self.dirtier.due(now_us) {
            let (off, word) = self.dirtier.next_write();
            // SAFETY: the dirtier runs only once `check_dirty` found its buffer (32 MiB from
            // `start`) inside RAM above the model table and the base content; identity-mapped.
            unsafe { ((start + off) as *mut u64).write_volatile(word) };
        }
    }

    /// Handles one request line and prints its reply.
    fn handle(&mut self, line: &[u8], sep: u8) {
        let power_off = self.respond(line, sep);
        self.reply.push_bytes(b"\n");
        print(&mut self.console, self.reply.as_bytes());
        if let Some(code) = power_off {
            self.finish_output();
            cpu::poweroff(code);
        }
    }

    /// Feeds one input byte of the console to `lines` and answers the line it completes.
    fn take_byte(&mut self, lines: &mut LineReader<LINE_MAX>, b: u8) {
        match lines.push(b) {
            None => {}
            Some(Line::Done(l)) if l.iter().all(u8::is_ascii_whitespace) => {}
            Some(Line::Done(l)) => self.handle(l, b' '),
            Some(Line::TooLong) => {
                self.requests += 1;
                print(
                    &mut self.console,
                    b"err line too long (at most 1024 bytes)\n",
                );
            }
        }
    }

    /// Before powering off: lets the virtio console's device take what was written (COM1
    /// output has left the UART when `serial::write` returns).
    fn finish_output(&mut self) {
        if let Some(c) = &mut self.console {
            c.drain();
        }
    }

    /// Answers one request into `self.reply` (without a line end); returns the power-off code
    /// for `poweroff`, which the caller carries out after sending the reply.
    fn respond(&mut self, line: &[u8], sep: u8) -> Option<u8> {
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
                let console = if self.console.is_some() {
                    "virtio"
                } else {
                    "com1"
                };
                let _ = write!(r, " console={console}");
            }
            Ok(Request::Load(mib)) => {
                let bytes = mib << 20;
                if bytes > self.model_room {
                    let _ = write!(
                        r,
                        "err not enough memory: load {mib} needs {mib} MiB above 16 MiB, the guest has {} MiB there",
                        self.model_room >> 20
                    );
                } else if let Err(e) = self.layout.check_model(bytes) {
                    let _ = write!(r, "err load {mib}: {e}");
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
                    self.layout.model = bytes;
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
            Ok(Request::Incr) => {
                self.counter = self.counter.wrapping_add(1);
                let _ = write!(r, "ok incr n={}", self.counter);
            }
            Ok(Request::Count) => {
                let _ = write!(r, "ok count n={}", self.counter);
            }
            Ok(Request::Fill(mib)) => match self.layout.check_fill(mib << 20) {
                Ok(start) => {
                    let t0 = cpu::rdtsc();
                    // SAFETY: `mib` MiB from `start` lie in the RAM range above 16 MiB (the
                    // layout checked it against `model_room`), identity-mapped, and overlap
                    // neither the model table nor the dirtier's buffer.
                    let words = unsafe {
                        core::slice::from_raw_parts_mut(start as *mut u64, (mib << 17) as usize)
                    };
                    let sum = ram::fill(words, 0);
                    self.layout.fill = mib << 20;
                    let cycles = cpu::rdtsc() - t0;
                    let us = self.tsc_hz.map_or(0, |hz| {
                        (u128::from(cycles) * 1_000_000 / u128::from(hz.max(1))) as u64
                    });
                    let _ = write!(r, "ok fill mib={mib} sum={sum} us={us}");
                }
                Err(e) => {
                    let _ = write!(r, "err fill {mib}: {e}");
                }
            },
            Ok(Request::Dirty(rate)) => {
                let started = match rate {
                    Some(0) => {
                        self.dirtier.set_rate(0, clock::micros());
                        Ok(())
                    }
                    Some(rate) => self.layout.check_dirty().map(|_| {
                        self.layout.dirty = true;
                        if !self.timer {
                            irq::stop_timer();
                            irq::enable_line(0);
                            self.timer = true;
                        }
                        self.dirtier.set_rate(rate, clock::micros());
                    }),
                    None => Ok(()),
                };
                let _ = match started {
                    Ok(()) => write!(
                        r,
                        "ok dirty rate={} pages={}",
                        self.dirtier.rate(),
                        self.dirtier.total()
                    ),
                    Err(e) => write!(r, "err dirty: {e}"),
                };
            }
            Ok(Request::Check) => {
                let fill = self.layout.fill;
                let start = self.layout.fill_start(fill);
                // SAFETY: the base content and the model table were written by `fill` and
                // `load` at these places in RAM (identity-mapped); reading them is harmless.
                let (fill_sum, model_sum) = unsafe {
                    (
                        ram::sum(core::slice::from_raw_parts(
                            start as *const u64,
                            (fill / 8) as usize,
                        )),
                        ram::sum(core::slice::from_raw_parts(
                            model::MODEL_BASE as *const u64,
                            self.model_entries as usize,
                        )),
                    )
                };
                let _ = write!(
                    r,
                    "ok check fill_mib={} fill_sum={fill_sum} model_mib={} model_sum={model_sum}",
                    fill >> 20,
                    self.layout.model >> 20
                );
            }
            Ok(Request::Poweroff(code)) => {
                let _ = write!(r, "ok poweroff code={code}");
                power_off = Some(code);
            }
            Ok(Request::Health) => r.push_bytes(b"ok health"),
            Ok(Request::Get(i)) => match &mut self.disk {
                Ok(d) => {
                    let _ = match d.get(i) {
                        Ok(v) => write!(r, "ok get i={i} value={v}"),
                        Err(e) => write!(r, "err get {i}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Put(i, v)) => match &mut self.disk {
                Ok(d) => {
                    let _ = match d.put(i, v) {
                        Ok(()) => write!(r, "ok put i={i} value={v}"),
                        Err(e) => write!(r, "err put {i}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Disk) => match &self.disk {
                Ok(d) => {
                    let (sectors, ro, header) = d.describe();
                    let _ = write!(r, "ok disk sectors={sectors} ro={}", u8::from(ro));
                    let _ = match header {
                        Ok(h) => write!(r, " magic=CLDTABLE entries={}", h.entries),
                        Err(micro_service::table::TableError::NoMagic) => write!(r, " magic=none"),
                        Err(_) => write!(r, " magic=invalid"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Scan {
                first,
                sectors,
                req_kib,
            }) => match &mut self.disk {
                Ok(d) => {
                    let t0 = cpu::rdtsc();
                    let result = d.scan(first, sectors, req_kib);
                    let cycles = cpu::rdtsc() - t0;
                    let _ = match result {
                        Ok(sum) => {
                            let _ =
                                write!(r, "ok scan sectors={sectors} req_kib={req_kib} sum={sum}");
                            match self.tsc_hz {
                                Some(hz) => write!(
                                    r,
                                    " us={}",
                                    u128::from(cycles) * 1_000_000 / u128::from(hz.max(1))
                                ),
                                None => write!(r, " cycles={cycles}"),
                            }
                        }
                        Err(blk::BlkError::OutOfRange) => write!(
                            r,
                            "err scan {first} {sectors}: beyond the end of the disk ({} sectors)",
                            d.describe().0
                        ),
                        Err(e) => write!(r, "err scan {first} {sectors}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Net) => match &self.net {
                Ok(n) => {
                    let m = n.mac;
                    let _ = write!(
                        r,
                        "ok net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        m[0], m[1], m[2], m[3], m[4], m[5]
                    );
                    let _ = match n.ip {
                        Some(([a, b, c, d], p)) => write!(r, " ip={a}.{b}.{c}.{d}/{p}"),
                        None => write!(r, " ip=none"),
                    };
                    let _ = write!(r, " port={}", n.port);
                }
                Err(why) => {
                    let _ = write!(r, "err no network ({why})");
                }
            },
            Err(e) => {
                let _ = write!(r, "err {e}");
            }
        }
        power_off
    }
}

impl server::Handler for Service {
    fn handle(&mut self, request: &[u8]) -> (&[u8], Option<u8>) {
        let off = self.respond(request, b' ');
        (self.reply.as_bytes(), off)
    }

    fn before_poweroff(&mut self) {
        self.finish_output();
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

/// The virtio devices the guest drives.
struct Devices {
    /// The disk, or why there is none.
    disk: Result<blk::Blk, &'static str>,
    /// The network card, or why there is none.
    net: Result<net::Net, &'static str>,
    /// The console, if there is one that works (else the guest uses COM1).
    console: Option<console::Console>,
}

/// The devices named by `virtio_mmio.device=` entries: the first disk, the first network
/// card and the first console (others are left alone).
fn find_devices(cmd: &[u8], seed: u64) -> Devices {
    let mut disk = Err("no virtio-blk device on the command line");
    let mut net = Err("no virtio-net device on the command line");
    let mut console = None;
    let mut refused = None;
    for d in cmdline::mmio_devices(cmd) {
        match virtio::Mmio::probe(&d) {
            Ok((m, virtio::DEVICE_BLOCK)) if disk.is_err() => disk = blk::Blk::new(m),
            Ok((m, virtio::DEVICE_NET)) if net.is_err() => net = net::Net::new(m, seed),
            // A console that fails to set up leaves the guest on COM1.
            Ok((m, virtio::DEVICE_CONSOLE)) if console.is_none() => {
                console = console::Console::new(m).ok();
            }
            Ok(_) => {}
            Err(why) => refused = Some(why),
        }
    }
    // Without a device of a kind, a refused window is the likelier explanation.
    if let Some(why) = refused {
        disk = disk.or(Err(why));
        net = net.or(Err(why));
    }
    Devices { disk, net, console }
}

/// CPL3 entry, called from entry.rs with the boot information.
#[no_mangle]
extern "C" fn guest_main(boot_info: u64, protocol: u64, entry_tsc: u64) -> ! {
    serial::init();
    let tsc_hz = cpu::tsc_hz();
    clock::init(tsc_hz, entry_tsc);
    let cmd = command_line(boot_info, protocol);
    let seed = cpu::rdtsc();
    let Devices {
        disk: blk,
        net,
        console,
    } = find_devices(cmd, seed);
    let timer = blk.is_ok() || net.is_ok() || console.is_some();
    if timer {
        // Device waits and TCP timers sleep with the PIT as the alarm clock.
        irq::stop_timer();
        irq::enable_line(0);
    }
    let mut server =
        net.map(|n| server::Server::new(n, cmdline::ip_config(cmd), cmdline::port(cmd), seed));
    let room = model_room(boot_info, protocol);
    let mut svc = Service {
        requests: 0,
        start_tsc: entry_tsc,
        tsc_hz,
        primes: PrimeCounter::new(),
        reply: FixedBuf::new(),
        model_room: room,
        model_entries: 0,
        layout: ram::Layout {
            room,
            ..ram::Layout::default()
        },
        dirtier: ram::Dirtier::new(),
        counter: 0,
        timer,
        disk: blk.map(disk::Disk::new),
        net: Err(""),
        console,
    };
    let update_net = |svc: &mut Service, server: &Result<server::Server, &'static str>| {
        svc.net = match server {
            Ok(s) => Ok(NetInfo {
                mac: s.mac(),
                ip: s.ipv4(),
                port: s.port(),
            }),
            Err(why) => Err(why),
        };
    };
    update_net(&mut svc, &server);
    let now = cpu::rdtsc();
    let entry = if protocol == 1 { "pvh" } else { "linux64" };
    let boot = now.wrapping_sub(entry_tsc);
    // Formatted first, so that it is one console write (one notification).
    svc.reply.clear();
    let _ = match svc.micros(boot) {
        Some(us) => writeln!(
            svc.reply,
            "micro-guest {} ready boot_us={us} entry={entry}",
            env!("CARGO_PKG_VERSION")
        ),
        None => writeln!(
            svc.reply,
            "micro-guest {} ready boot_cycles={boot} entry={entry}",
            env!("CARGO_PKG_VERSION")
        ),
    };
    print(&mut svc.console, svc.reply.as_bytes());
    for c in cmdline::run_commands(cmd) {
        svc.handle(c, b':');
    }
    let lines = arena::leak(LineReader::<LINE_MAX>::new());
    let mut chunk = [0u8; console::RX_BUF];
    // When a device's interrupt (network card, console) does not reach the 8259, poll it:
    // every millisecond while there is traffic, backing off to 20 ms after a quiet second.
    let mut last_busy = clock::micros();
    // Which interrupt lines fired: look at the serial port only after its interrupt (or the
    // timer's, or at the start), at a virtio device's interrupt cause only after its
    // interrupt. Each look is a VM exit; looking at the rings in memory is free.
    let mut fired = u16::MAX;
    loop {
        fired |= irq::take(u16::MAX);
        let mut busy = false;
        if let Some(c) = &mut svc.console {
            // The virtio console; COM1 is not read. Acknowledge before looking at the ring.
            if c.irq().is_some_and(|l| fired & irq::bit(l) != 0) {
                c.ack_interrupt();
            }
            // Every buffer the device has filled (memory only, on every pass), then one
            // notification that gives them all back. (The console is borrowed anew for each
            // buffer: answering a line writes to it.)
            loop {
                let n = svc.console.as_mut().map_or(0, |c| c.read(&mut chunk));
                if n == 0 {
                    break;
                }
                busy = true;
                for &b in &chunk[..n] {
                    svc.take_byte(lines, b);
                }
            }
            if let Some(c) = &mut svc.console {
                c.flush();
            }
        } else if fired & (irq::bit(4) | irq::bit(0)) != 0 {
            while let Some(b) = serial::try_read() {
                busy = true;
                svc.take_byte(lines, b);
            }
        }
        if let Ok(s) = &mut server {
            if s.irq().is_some_and(|l| fired & irq::bit(l) != 0) {
                s.ack_interrupt();
            }
            busy |= s.poll(&mut svc);
            update_net(&mut svc, &server);
        }
        fired = 0;
        let now = clock::micros();
        svc.dirty_pages(now);
        if busy {
            last_busy = now;
            continue;
        }
        let every = if now - last_busy < 1_000_000 {
            1_000
        } else {
            20_000
        };
        let mut timeout = match &mut server {
            Ok(s) => {
                let t = s.poll_delay();
                if s.irq().is_some() {
                    t
                } else {
                    Some(t.map_or(every, |t| t.min(every)))
                }
            }
            Err(_) => None,
        };
        if svc.console.as_ref().is_some_and(|c| c.irq().is_none()) {
            timeout = Some(timeout.map_or(every, |t| t.min(every)));
        }
        if let Some(w) = svc.dirtier.wake_in(now) {
            timeout = Some(timeout.map_or(w, |t| t.min(w)));
        }
        if timeout == Some(0) {
            continue;
        }
        irq::sleep(timeout);
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
