//! `cargo xtask test`: builds what the tests need (the micro guest, the vmm binary, Debian's
//! kernel for the Linux boot-path tests, the Linux service-VM base — its kernel cached by
//! recipe outside the clone), then runs every test of the workspace, then builds and tests the
//! appliance image (`cargo xtask image --board dev --boot-test`, from the debug binaries).

use anyhow::Result;

use crate::util::{cargo, ensure_programs, require_kvm, run, step};

/// Options of `cargo xtask test`.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Also run the opt-in end-to-end Linux boot (needs a host with VMX/SVM).
    #[arg(long)]
    pub linux_boot: bool,
    /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// Runs the test suite.
pub fn run_tests(args: &TestArgs) -> Result<()> {
    require_kvm()?;
    crate::guest::build()?;
    crate::linux::fetch()?;
    // The Linux base boots under QEMU TCG in the tests; `image-builder import` uses qemu-img.
    ensure_programs(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
    ])?;
    let t = std::time::Instant::now();
    let base = crate::linux_base::build()?;
    step(&format!(
        "Linux base ready in {:.1} s ({:.2} MiB)",
        t.elapsed().as_secs_f64(),
        base.mib
    ));
    // The agent's tests: an independent mDNS client and a real browser; the handoff tests'
    // two appliances: network namespaces, veth and shaping (netlab); the USB pairing code
    // links the system libusb (found through pkg-config; without it libusb1-sys compiles its
    // own copy).
    ensure_programs(&[
        ("pkg-config", "pkg-config"),
        ("/usr/include/libusb-1.0/libusb.h", "libusb-1.0-0-dev"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
        (
            "/usr/lib/python3/dist-packages/zeroconf/__init__.py",
            "python3-zeroconf",
        ),
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ])?;
    step("building the workspace");
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    step("running the tests");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast", "--"]);
    cmd.args(&args.test_args);
    run(&mut cmd)?;
    // The appliance image (issue 14) from the debug binaries just built: the package is
    // installed, run, used, stopped and purged in a clean Debian root; the disk image boots
    // under QEMU (TCG), answers and is discovered, takes a good update and rolls back a bad
    // one keeping its data (the Debian roots are debootstrapped once and cached outside the
    // clone).
    crate::image::image(&crate::image::ImageArgs {
        board: "dev".into(),
        no_install_check: false,
        debug_binaries: true,
        package_only: false,
        generation: None,
        operator_token_file: None,
        boot_test: true,
        test_only: false,
    })?;
    if args.linux_boot {
        step("running the opt-in end-to-end Linux boot");
        run(cargo().args([
            "test",
            "-p",
            "cloudlet-tests",
            "--test",
            "linux_boot_path",
            "--",
            "--ignored",
        ]))?;
    }
    Ok(())
}
