//! The VM lifecycle through the `vmm` library: vCPUs pause (leave KVM_RUN and stay out) and
//! resume; dropping the machine stops its vCPU threads.

use std::time::Duration;

use cloudlet_tests::{tiny_elf, Scratch};
use vmm::config::{SerialOutput, VmConfig};
use vmm::loader::{BootProtocol, KernelConfig};

/// CPL0 code that writes 'x' to COM1 forever.
const SPIN_PRINT: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfb];

fn len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn pause_stops_guest_progress_and_resume_continues_it() {
    let s = Scratch::new("pause");
    let kernel = s.write("spin.elf", &tiny_elf(SPIN_PRINT));
    let out = s.path("serial.log");
    let cfg = VmConfig::new(
        KernelConfig {
            kernel,
            initrd: None,
            cmdline: String::new(),
            protocol: BootProtocol::Linux,
        },
        16,
        2,
        SerialOutput::File(out.clone()),
        false,
    )
    .unwrap();
    let machine = vmm::builder::build_for_boot(&cfg).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(len(&out) > 0, "the guest is printing");

    machine.pause().unwrap();
    let paused_at = len(&out);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(len(&out), paused_at, "no guest progress while paused");

    machine.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(len(&out) > paused_at, "progress again after resume");

    // Pausing twice in a row and resuming is fine too.
    machine.pause().unwrap();
    machine.pause().unwrap();
    machine.resume().unwrap();
    assert!(machine.exit_reason().is_none());
    drop(machine);
    let stopped_at = len(&out);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        len(&out),
        stopped_at,
        "dropping the machine stopped the vCPUs"
    );
}
