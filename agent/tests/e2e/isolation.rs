//! The vmm the agent starts is locked down: it writes only in its instance's directory
//! (`--confine`), its control socket is the agent's alone, and a vmm its seccomp filter
//! killed is reported failed with that reason.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::common::{verify_guest, wait_for, AgentProc, Scratch};

/// A vmm killed by SIGSYS (the hidden test hook makes its vCPU thread make a forbidden call
/// once filtered) → the instance is failed, and its exit and error say seccomp killed it.
#[test]
fn a_vmm_killed_by_its_seccomp_filter_is_reported_failed_with_that_reason() {
    let d = Scratch::new("seccomp-vmm");
    let real = Path::new(env!("CARGO_BIN_EXE_agent")).with_file_name("vmm");
    let wrapper = d.path("vmm");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nVMM_SECCOMP_SELFTEST=vcpu exec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = AgentProc::start_with_vmm("seccomp", &[], &wrapper);
    let c = a.client();
    let err = c.start("model").unwrap_err();
    assert!(err.to_string().contains("seccomp filter (SIGSYS)"), "{err}");
    let f = wait_for(Duration::from_secs(10), "the failed instance", || {
        c.instances()
            .unwrap()
            .into_iter()
            .find(|i| i.state == "failed")
    });
    assert_eq!(
        f.exit.as_deref(),
        Some("killed by its seccomp filter (SIGSYS): the vmm made a forbidden system call"),
        "{f:?}"
    );
    assert!(
        f.error
            .as_deref()
            .unwrap()
            .contains("forbidden system call"),
        "{f:?}"
    );
}

/// A running instance's vmm: confined to its instance directory, filtered, its socket 0600.
#[test]
fn a_running_vmm_is_confined_and_filtered() {
    let a = AgentProc::start("confined", &[]);
    let c = a.client();
    let i = c.start("model").unwrap();
    verify_guest(&i.endpoint);
    let pid = i.pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = a.data.join("instances").join(&i.id);
    let at = args
        .iter()
        .position(|a| a == "--confine")
        .expect("--confine");
    assert_eq!(Path::new(&args[at + 1]), dir, "{args:?}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let mode = std::fs::metadata(dir.join("vm.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    c.delete(&i.id).unwrap();
}
