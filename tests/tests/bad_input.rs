//! Bad input never panics or hangs the VMM: it ends with a clear message naming the problem
//! and a non-zero status. Guest crashes end with status 124 and the guest's registers.

use std::time::Duration;

use cloudlet_tests::{
    micro_guest, print_and_exit, run_vmm, tiny_elf, tiny_elf_with_memsz, Scratch,
};

const T: Duration = Duration::from_secs(30);

fn run_kernel(kernel: &std::path::Path, extra: &[&str]) -> cloudlet_tests::Finished {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_vmm(args, T)
}

/// A setup failure: status 1, one `vmm: error:` line containing every `needle`, no panic.
fn assert_refused(fin: &cloudlet_tests::Finished, needles: &[&str]) {
    assert_eq!(fin.code(), 1, "{fin:?}");
    assert!(fin.stderr.starts_with("vmm: error: "), "{}", fin.stderr);
    for n in needles {
        assert!(fin.stderr.contains(n), "expected {n:?} in: {}", fin.stderr);
    }
    assert!(!fin.stderr.contains("panicked"), "{}", fin.stderr);
    assert!(fin.stdout.is_empty());
}

#[test]
fn tiny_kernel_runs_and_its_exit_code_propagates() {
    // Sanity for the builders used below.
    let s = Scratch::new("tiny");
    let k = s.write("k.elf", &tiny_elf(&print_and_exit(b"tiny\n", 42)));
    let fin = run_kernel(&k, &[]);
    assert_eq!(fin.code(), 42, "{fin:?}");
    assert_eq!(fin.stdout, ["tiny"]);
}

#[test]
fn missing_kernel() {
    let fin = run_kernel(std::path::Path::new("/nonexistent/kernel"), &[]);
    assert_refused(&fin, &["/nonexistent/kernel", "No such file"]);
}

#[test]
fn kernel_that_is_not_elf_or_bzimage() {
    let s = Scratch::new("notk");
    let k = s.write("notes.txt", b"this is not a kernel\n");
    assert_refused(&run_kernel(&k, &[]), &["notes.txt", "not a kernel image"]);
    let empty = s.write("empty", b"");
    assert_refused(&run_kernel(&empty, &[]), &["not a kernel image"]);
}

#[test]
fn non_x86_64_elf() {
    let s = Scratch::new("arm");
    let mut img = tiny_elf(&print_and_exit(b"x", 0));
    img[18] = 183; // EM_AARCH64
    let k = s.write("arm.elf", &img);
    assert_refused(&run_kernel(&k, &[]), &["not a 64-bit x86 ELF"]);
}

#[test]
fn truncated_elf_at_every_kind_of_boundary() {
    let s = Scratch::new("trunc");
    let elf = std::fs::read(micro_guest()).unwrap();
    // End of the loaded bytes of the first PT_LOAD (the section headers after it are not
    // loaded, so cutting those is harmless and boots).
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let p_offset = u64::from_le_bytes(elf[phoff + 8..phoff + 16].try_into().unwrap()) as usize;
    let p_filesz = u64::from_le_bytes(elf[phoff + 32..phoff + 40].try_into().unwrap()) as usize;
    let load_end = p_offset + p_filesz;
    assert!(load_end <= elf.len());
    // Inside the ELF header, inside the program headers, inside the segment, and one byte
    // short of the segment's end.
    for cut in [20, 70, 200, p_offset + 0x100, load_end - 1] {
        let k = s.write(&format!("cut{cut}"), &elf[..cut]);
        let fin = run_kernel(&k, &[]);
        assert_eq!(fin.code(), 1, "cut at {cut}: {fin:?}");
        assert!(
            fin.stderr.starts_with("vmm: error: "),
            "cut at {cut}: {}",
            fin.stderr
        );
        assert!(!fin.stderr.contains("panicked"));
    }
}

#[test]
fn memory_too_small_for_the_kernel() {
    let s = Scratch::new("big");
    // 6 MiB of bss at 1 MiB does not fit in 4 MiB of RAM.
    let k = s.write(
        "big.elf",
        &tiny_elf_with_memsz(&print_and_exit(b"x", 0), 6 << 20),
    );
    assert_refused(&run_kernel(&k, &["--mem", "4"]), &["raise --mem", "4 MiB"]);
    // File bytes that do not fit at all.
    let code = vec![0x90u8; 3 << 20];
    let k = s.write("huge.elf", &tiny_elf(&code));
    assert_refused(&run_kernel(&k, &["--mem", "2"]), &["huge.elf"]);
}

/// A small valid kernel, for tests about everything but the kernel.
fn ok_kernel(s: &Scratch) -> std::path::PathBuf {
    s.write("ok.elf", &tiny_elf(&print_and_exit(b"ok\n", 0)))
}

#[test]
fn absurd_memory_sizes() {
    let s = Scratch::new("mem");
    let k = ok_kernel(&s);
    assert_refused(&run_kernel(&k, &["--mem", "0"]), &["too small"]);
    assert_refused(&run_kernel(&k, &["--mem", "1"]), &["too small"]);
    assert_refused(
        &run_kernel(&k, &["--mem", "100000000"]),
        &["exceeds this host", "--mem"],
    );
}

#[test]
fn bad_vcpu_counts() {
    let s = Scratch::new("vcpus");
    let k = ok_kernel(&s);
    assert_refused(
        &run_kernel(&k, &["--vcpus", "0"]),
        &["--vcpus 0 is out of range"],
    );
    assert_refused(
        &run_kernel(&k, &["--vcpus", "1000"]),
        &["--vcpus 1000 is out of range"],
    );
}

#[test]
fn no_permission_on_dev_kvm() {
    // Drop to an unprivileged user: /dev/kvm is root-only here. setpriv comes with util-linux.
    let s = Scratch::new("perm");
    let kernel = ok_kernel(&s);
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(cloudlet_tests::vmm_bin())
        .args(["run", "--kernel"])
        .arg(&kernel);
    let mut v = cloudlet_tests::Vmm::spawn_cmd(&mut cmd);
    let fin = v.finish(T);
    assert_refused(&fin, &["/dev/kvm", "permission"]);
}

#[test]
fn missing_kvm_device() {
    let s = Scratch::new("nokvm");
    let fin = run_kernel(&ok_kernel(&s), &["--kvm-device", "/nonexistent/kvm"]);
    assert_refused(&fin, &["/nonexistent/kvm does not exist"]);
}

#[test]
fn pvh_requested_for_a_kernel_without_the_note() {
    let s = Scratch::new("nopvh");
    let k = s.write("k.elf", &tiny_elf(&print_and_exit(b"x", 0)));
    assert_refused(&run_kernel(&k, &["--boot", "pvh"]), &["PVH entry note"]);
}

/// Runs a tiny kernel of `code` that crashes the guest: the VMM must exit 124 with a report
/// holding every one of `needles` and at least one of `any_of`.
fn crash_report(name: &str, code: &[u8], needles: &[&str], any_of: &[&str]) {
    let s = Scratch::new(name);
    let k = s.write("crash.elf", &tiny_elf(code));
    let fin = run_kernel(&k, &["--no-stdin"]);
    assert_eq!(fin.code(), 124, "{fin:?}");
    for n in needles {
        assert!(fin.stderr.contains(n), "{n:?} in {}", fin.stderr);
    }
    assert!(
        any_of.iter().any(|n| fin.stderr.contains(n)),
        "one of {any_of:?} in {}",
        fin.stderr
    );
}

#[test]
fn guest_triple_fault_reports_registers() {
    // ud2 with an empty IDT: #UD → #GP → #DF → triple fault.
    crash_report(
        "tf",
        &[0x0f, 0x0b],
        &["rip=0x0000000000100000", "cr3="],
        &["triple-faulted"],
    );
}

#[test]
fn guest_emulation_failure_reports_registers() {
    // `lock cmpxchg16b [rsi]` at CPL0: the PVM instruction emulator cannot run it (facts.md).
    // On VMX/SVM hosts it runs natively; there the next `ud2` triple-faults instead, which is
    // also a crash report. Either way the VMM must exit 124 with registers.
    crash_report(
        "emu",
        &[0xf0, 0x48, 0x0f, 0xc7, 0x0e, 0x0f, 0x0b],
        &["rip="],
        &["emulation failure", "triple-faulted"],
    );
}

#[test]
fn writes_to_unclaimed_ports_are_ignored() {
    let s = Scratch::new("ports");
    // out 0x80 (POST code), in from 0x2f8 (COM2, absent), then print and exit.
    let mut code = vec![0xb0, 0x12, 0xe6, 0x80, 0x66, 0xba, 0xf8, 0x02, 0xec];
    code.extend(print_and_exit(b"ok\n", 0));
    let k = s.write("ports.elf", &tiny_elf(&code));
    let fin = run_kernel(&k, &["--no-stdin"]);
    assert_eq!(
        (fin.code(), fin.stdout.as_slice()),
        (0, &["ok".to_string()][..]),
        "{fin:?}"
    );
}
