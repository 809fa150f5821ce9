//! The micro guest under our `vmm`: banner, verified service answers, power-off codes,
//! interactive serial input, both entry protocols, several vCPUs.

use std::time::Duration;

use cloudlet_tests::{micro_guest, run_vmm, Scratch, Vmm};
use micro_service::client::field;
use micro_service::oracle::prime_count;

const T: Duration = Duration::from_secs(30);

fn guest_args(cmdline: &str) -> Vec<String> {
    vec![
        "run".into(),
        "--kernel".into(),
        micro_guest().display().to_string(),
        "--mem".into(),
        "64".into(),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

/// Runs `vmm` with `args` (a `micro.run` with one `primes` and `poweroff:0`), checks it
/// exits with 0, and returns its output and the `primes` reply's count.
fn primes_count(args: Vec<String>) -> (cloudlet_tests::Finished, String) {
    let fin = run_vmm(args, T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    let count = fin
        .stdout
        .iter()
        .find(|l| l.starts_with("ok primes"))
        .and_then(|l| field(l, "count"))
        .unwrap_or_else(|| panic!("no `ok primes … count=` line: {fin:?}"))
        .to_string();
    (fin, count)
}

#[test]
fn boots_prints_banner_answers_and_powers_off_with_its_code() {
    let fin = run_vmm(
        guest_args("console=ttyS0 micro.run=primes:1000000,primes:10000000,poweroff:7"),
        T,
    );
    assert_eq!(
        fin.code(),
        7,
        "power-off code becomes the exit status: {fin:?}"
    );
    let banner = &fin.stdout[0];
    assert!(
        banner.starts_with("micro-guest "),
        "banner first: {:?}",
        fin.stdout
    );
    assert!(
        field(banner, "boot_us").is_some_and(|v| v.parse::<u64>().is_ok()),
        "{banner}"
    );
    // π(10^6) and π(10^7) are known constants, independent of the guest's code.
    let answers: Vec<&String> = fin
        .stdout
        .iter()
        .filter(|l| l.starts_with("ok primes"))
        .collect();
    assert_eq!(answers.len(), 2, "{:?}", fin.stdout);
    assert_eq!(field(answers[0], "count"), Some("78498"));
    assert_eq!(field(answers[1], "count"), Some("664579"));
    assert!(
        fin.stdout.iter().any(|l| l == "ok poweroff code=7"),
        "{:?}",
        fin.stdout
    );
    assert!(
        fin.stderr.is_empty(),
        "no complaints on stderr: {}",
        fin.stderr
    );
}

#[test]
fn serves_requests_typed_on_the_serial_console() {
    let mut vmm = Vmm::spawn(guest_args("console=ttyS0"));
    vmm.expect_line(T, |l| l.starts_with("micro-guest "));
    vmm.send("echo hello guest\n");
    assert_eq!(
        vmm.expect_line(T, |l| l.starts_with("ok echo")),
        "ok echo hello guest"
    );
    vmm.send("primes 100\n");
    let l = vmm.expect_line(T, |l| l.starts_with("ok primes"));
    assert_eq!(field(&l, "count"), Some("25"));
    vmm.send("frobnicate\n");
    assert!(vmm
        .expect_line(T, |l| l.starts_with("err"))
        .contains("unknown command"));
    vmm.send("primes x\n");
    assert!(vmm
        .expect_line(T, |l| l.starts_with("err"))
        .contains("bad number"));
    vmm.send("stats\n");
    let stats = vmm.expect_line(T, |l| l.starts_with("ok stats"));
    assert!(
        field(&stats, "requests").is_some_and(|n| n.parse::<u32>().unwrap() >= 4),
        "{stats}"
    );
    // More input than the 16550's 64-byte FIFO holds, in one write: the VMM must queue it.
    let long: String = "z".repeat(300);
    vmm.send(&format!("echo {long}\npoweroff 3\n"));
    assert_eq!(
        vmm.expect_line(T, |l| l.starts_with("ok echo")),
        format!("ok echo {long}")
    );
    let fin = vmm.finish(T);
    assert_eq!(fin.code(), 3, "{fin:?}");
}

#[test]
fn pvh_entry_boots_the_same_guest() {
    let mut args = guest_args("micro.run=primes:1000,poweroff:0");
    args.extend(["--boot".into(), "pvh".into()]);
    let (fin, count) = primes_count(args);
    assert!(fin.stdout[0].starts_with("micro-guest "));
    assert_eq!(count, prime_count(1000).to_string());
}

#[test]
fn boots_with_two_vcpus_and_large_memory_above_4_gib() {
    let mut args = guest_args("micro.run=primes:100000,poweroff:0");
    // 3.5 GiB: part of the RAM is placed above the 4 GiB boundary.
    args[4] = "3584".into();
    args.extend(["--vcpus".into(), "2".into()]);
    let (_, count) = primes_count(args);
    assert_eq!(count, prime_count(100_000).to_string());
}

#[test]
fn serial_output_can_go_to_a_file() {
    let s = Scratch::new("serial");
    let out = s.path("console.log");
    let mut args = guest_args("micro.run=echo:to-file,poweroff:0");
    args.extend(["--serial".into(), out.display().to_string()]);
    let fin = run_vmm(args, T);
    assert_eq!(fin.code(), 0, "{fin:?}");
    assert!(fin.stdout.is_empty(), "nothing on stdout: {:?}", fin.stdout);
    let log = std::fs::read_to_string(&out).unwrap();
    assert!(log.starts_with("micro-guest "), "{log}");
    assert!(log.contains("ok echo to-file\n"), "{log}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    let mut vmm = Vmm::spawn(guest_args("console=ttyS0"));
    vmm.expect_line(T, |l| l.starts_with("micro-guest "));
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(vmm.pid() as i32, libc::SIGTERM) }, 0);
    let fin = vmm.finish(T);
    assert_eq!(fin.code(), 128 + libc::SIGTERM, "{fin:?}");
}
