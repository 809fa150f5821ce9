//! The Linux service-VM base (`cargo xtask linux-base`): its sample service answers the micro
//! guest's protocol exactly as the oracle says — run on the host, and inside the base booted
//! under QEMU with TCG (KVM here cannot run a Linux kernel, see shared/facts.md), reached
//! through a forwarded port.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_tests::{cloudlet_init_bin, linux_base, Scratch, Vmm};
use micro_service::client::Client;
use micro_service::oracle;

/// Entries of the disk table the tests give the service.
const TABLE_ENTRIES: u64 = 5000;
/// Bytes of that disk.
const TABLE_BYTES: usize = 1 << 20;

/// The protocol checks the micro guest passes, asked of a Linux base's service: every answer
/// compared with the oracle's.
fn check_service(c: &mut Client) {
    let ask = |c: &mut Client, req: &str| c.request(req).unwrap();
    assert_eq!(ask(c, "health"), "ok health");
    assert_eq!(ask(c, "echo from linux"), "ok echo from linux");
    let primes = ask(c, "primes 100000");
    let want = format!(
        "ok primes N=100000 count={} us=",
        oracle::prime_count(100_000)
    );
    assert!(primes.starts_with(&want), "{primes}");
    let load = ask(c, "load 4");
    let want = format!("ok load mib=4 sum={} us=", oracle::model_sum(4));
    assert!(load.starts_with(&want), "{load}");
    for i in [0, 5, 4097, (4 << 17) - 1] {
        c.expect(&format!("query {i}"), &oracle::query_reply(i))
            .unwrap();
    }
    assert!(ask(c, &format!("query {}", 4 << 17)).starts_with("err query"));
    for j in [0, 7, TABLE_ENTRIES - 1] {
        c.expect(
            &format!("get {j}"),
            &oracle::get_reply(j, oracle::table_value(j)),
        )
        .unwrap();
    }
    c.expect("put 3 99", "ok put i=3 value=99").unwrap();
    c.expect("get 3", &oracle::get_reply(3, 99)).unwrap();
    let sectors = TABLE_BYTES / 512;
    c.expect(
        "disk",
        &format!("ok disk sectors={sectors} ro=0 magic=CLDTABLE entries={TABLE_ENTRIES}"),
    )
    .unwrap();
    for n in 0..3 {
        c.expect("incr", &oracle::incr_reply(n)).unwrap();
    }
    c.expect("count", &oracle::count_reply(3)).unwrap();
    let fill = ask(c, "fill 2");
    assert!(
        fill.starts_with(&format!("ok fill mib=2 sum={} ", oracle::fill_sum(2))),
        "{fill}"
    );
    c.expect("check", &oracle::check_reply(2, 4)).unwrap();
    assert!(ask(c, "frobnicate").starts_with("err unknown command 'frobnicate'"));
}

/// A table disk image in `s`.
fn table_disk(s: &Scratch) -> std::path::PathBuf {
    s.write(
        "table.img",
        &oracle::table_image(TABLE_ENTRIES, TABLE_BYTES),
    )
}

/// The port from a `cloudlet-linux ready port=P …` line.
fn ready_port(line: &str) -> u16 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

#[test]
fn cloudlet_init_answers_the_oracle_on_the_host() {
    let s = Scratch::new("linux-init");
    let table = table_disk(&s);
    let mut init = Vmm::spawn_cmd(
        Command::new(cloudlet_init_bin())
            .args(["--listen", "127.0.0.1:0", "--table"])
            .arg(&table),
    );
    let ready = init.expect_line(Duration::from_secs(10), |l| {
        l.starts_with("cloudlet-linux ready")
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], ready_port(&ready)));
    let mut c = Client::connect(addr, Duration::from_secs(10)).unwrap();
    check_service(&mut c);
    // A second connection is served beside the first, on the same state.
    let mut c2 = Client::connect(addr, Duration::from_secs(10)).unwrap();
    c2.expect("count", &oracle::count_reply(3)).unwrap();
    c.expect("poweroff 9", "ok poweroff code=9").unwrap();
    let fin = init.finish(Duration::from_secs(10));
    assert_eq!(fin.status.code(), Some(9), "{}", fin.stderr);
}

/// A free TCP port on loopback (for QEMU's forward).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How long the Linux base may take under QEMU TCG from QEMU's start to its service's first
/// answer (measured ≈ 2–5 s on this 2-core host; the bound leaves room for a loaded machine).
const BOOT_BOUND: Duration = Duration::from_secs(90);

#[test]
fn linux_base_boots_under_qemu_tcg_and_its_service_answers_the_oracle() {
    let (vmlinux, rootfs, cmdline) = linux_base();
    let s = Scratch::new("linux-qemu");
    let table = table_disk(&s);
    let port = free_port();
    let drive = |id: &str, file: &std::path::Path, ro: bool| {
        format!(
            "id={id},file={},format=raw,if=none{}",
            file.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let t0 = Instant::now();
    // microvm: virtio-mmio devices named on the command line (without ACPI QEMU adds the
    // `virtio_mmio.device=` entries, as our vmm does) and a PVH boot of the ELF vmlinux.
    let mut qemu = Vmm::spawn_cmd(
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            ])
            .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-serial", "stdio"])
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=2"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-drive", &drive("root", &rootfs, true)])
            .args(["-device", "virtio-blk-device,drive=root"])
            .args(["-drive", &drive("table", &table, false)])
            .args(["-device", "virtio-blk-device,drive=table"])
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"),
            ])
            .args(["-device", "virtio-net-device,netdev=n0"])
            .arg("-kernel")
            .arg(&vmlinux)
            .args(["-append", &cmdline]),
    );
    let ready = qemu.expect_line(BOOT_BOUND, |l| l.starts_with("cloudlet-linux ready"));
    let t_ready = t0.elapsed();
    assert_eq!(ready_port(&ready), 80);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let left = BOOT_BOUND.saturating_sub(t0.elapsed());
    let mut c = Client::connect_when_up(addr, left, Duration::from_secs(5)).unwrap();
    let t_answer = t0.elapsed();
    assert!(t_answer < BOOT_BOUND, "first answer after {t_answer:?}");
    eprintln!(
        "Linux base under QEMU TCG: QEMU start → `{ready}` {:.0} ms, → first answer through the forwarded port {:.0} ms",
        t_ready.as_secs_f64() * 1e3,
        t_answer.as_secs_f64() * 1e3
    );
    check_service(&mut c);
    let net = c.request("net").unwrap();
    assert!(
        net.starts_with("ok net mac=") && net.ends_with(" ip=10.0.2.15/24 port=80"),
        "{net}"
    );
    c.expect("poweroff 3", "ok poweroff code=3").unwrap();
    let fin = qemu.finish(Duration::from_secs(30));
    // isa-debug-exit ends QEMU with (code << 1) | 1.
    assert_eq!(fin.status.code(), Some(7), "{}", fin.stderr);
}
