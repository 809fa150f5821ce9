//! The vmm the agent starts is locked down: it runs jailed (a user of its own, namespaces of
//! its own, a root holding only what its VM needs: see `vmm::jail`), in a cgroup of its own
//! within the appliance's (the board's cpus and memory), it writes only in its instance's
//! directory (`--confine`), its control socket is the agent's alone, and a vmm its seccomp
//! filter or its memory limit killed is reported failed with that reason.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::common::{assert_jailed, proc_status, verify_guest, wait_for, AgentProc, Scratch};

/// A script that runs the built vmm with `env` (shell assignments) in front.
fn wrapper(d: &Scratch, env: &str) -> std::path::PathBuf {
    let real = Path::new(env!("CARGO_BIN_EXE_agent")).with_file_name("vmm");
    let w = d.path("vmm");
    std::fs::write(
        &w,
        format!("#!/bin/sh\n{env}\nexec '{}' \"$@\"\n", real.display()),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    w
}

/// Every vmm the agent starts is jailed, the cold start's and the warm standby's alike (the
/// handoff's target is checked in handoff.rs), each VM as a user of its own; and its cgroup
/// goes with it.
#[test]
fn every_vmm_the_agent_starts_is_jailed() {
    let a = AgentProc::start("jailed", &[]);
    let c = a.client();
    let cold = c.start("model").unwrap();
    assert!(!cold.warm_start);
    verify_guest(&cold.endpoint);
    let u1 = assert_jailed(&a.data, &cold.id, cold.pid.unwrap());
    let warm = c.start("model").unwrap();
    assert!(warm.warm_start, "{warm:?}");
    verify_guest(&warm.endpoint);
    let u2 = assert_jailed(&a.data, &warm.id, warm.pid.unwrap());
    assert_ne!(u1, u2, "two VMs, one user");
    // The agent still reaches the control socket (stop goes through it) and removes the
    // VM's cgroup once its vmm has ended.
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", cold.pid.unwrap())).unwrap();
    let mem = cg
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
        .expect("a memory cgroup");
    let dir = Path::new("/sys/fs/cgroup/memory").join(mem.trim_start_matches('/'));
    assert!(dir.exists(), "{dir:?}");
    let stopped = c.stop(&cold.id).unwrap();
    assert_eq!(stopped.state, "stopped");
    assert_eq!(
        stopped.exit.as_deref(),
        Some("exit status 0"),
        "{stopped:?}"
    );
    wait_for(Duration::from_secs(5), "the VM's cgroup to go", || {
        (!dir.exists()).then_some(())
    });
    c.delete(&warm.id).unwrap();
}

/// `--no-jail` (debugging) runs the vmm as root in the agent's namespaces; it still works.
#[test]
fn no_jail_runs_the_vmm_as_root_for_debugging() {
    let a = AgentProc::start_args("unjailed", &[], None, &["--no-jail", "--no-warm-standby"]);
    let c = a.client();
    let i = c.start("model").unwrap();
    verify_guest(&i.endpoint);
    let pid = i.pid.unwrap();
    assert_eq!(proc_status(pid, "Uid:")[0], "0");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert!(a.log().contains("--no-jail"), "{}", a.log());
    c.delete(&i.id).unwrap();
}

/// The board's limits are the appliance cgroup's: its cpus as a CPU quota, its memory
/// (plus each VM slot's overhead) as a memory limit; each VM's cgroup holds its guest RAM
/// plus the overhead.
#[test]
fn the_boards_cpus_and_memory_are_the_appliance_cgroups_limits() {
    let a = AgentProc::start(
        "cgroup-limits",
        &[
            ("cpus = 2", "cpus = 1"),
            ("memory_mib = 1024", "memory_mib = 512"),
        ],
    );
    let c = a.client();
    let i = c.start("model").unwrap();
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", i.pid.unwrap())).unwrap();
    let path = |ctrl: &str| {
        let p = cg
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrls, p) = (f.next()?, f.next()?, f.next()?);
                ctrls.split(',').any(|c| c == ctrl).then(|| p.to_string())
            })
            .unwrap_or_else(|| panic!("no {ctrl} cgroup in {cg}"));
        Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(p.trim_start_matches('/'))
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).unwrap().trim().to_string();
    // The VMs share the appliance's CPU group (v1): its quota is the board's cpus.
    let app_cpu = path("cpu");
    let vm_mem = path("memory");
    assert!(vm_mem.ends_with(format!("vm-{}", i.id)), "{vm_mem:?}");
    assert_eq!(
        app_cpu.file_name(),
        vm_mem.parent().unwrap().file_name(),
        "the appliance's cgroup"
    );
    assert_eq!(read(app_cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(app_cpu.join("cpu.cfs_quota_us")), "100000", "1 CPU");
    assert_eq!(read(app_cpu.join("cpu.shares")), "1024");
    let overhead = agent::cgroup::VM_OVERHEAD_MIB;
    assert_eq!(
        read(vm_mem.parent().unwrap().join("memory.limit_in_bytes")),
        ((512 + 4 * overhead) << 20).to_string()
    );
    assert_eq!(
        read(vm_mem.join("memory.limit_in_bytes")),
        ((i.mem_mib + overhead) << 20).to_string()
    );
    assert_eq!(
        read(path("pids").join("pids.max")),
        agent::cgroup::VM_TASKS.to_string()
    );
    assert!(
        a.log().contains("cgroups: service VMs run under"),
        "{}",
        a.log()
    );
    c.delete(&i.id).unwrap();
}

/// A VM that takes more memory than its limit (the hook makes its vmm take memory until
/// stopped) is killed in its own cgroup: the instance is failed with that reason, while the
/// agent and another VM go on.
#[test]
fn a_vm_outgrowing_its_memory_is_stopped_in_its_own_cgroup() {
    let d = Scratch::new("oom-vmm");
    let marker = d.path("oom-next");
    let vmm = wrapper(
        &d,
        &format!(
            "if [ -e '{m}' ]; then rm -f '{m}'; export VMM_MEMORY_SELFTEST=1; fi",
            m = marker.display()
        ),
    );
    let a = AgentProc::start_args("oom", &[], Some(&vmm), &["--no-warm-standby"]);
    let c = a.client();
    let other = c.start("model").unwrap();
    std::fs::write(&marker, "").unwrap();
    // The hook starts once the vmm reported Ready: the guest may answer its first `health`
    // before the limit is reached (then the running instance fails) or not (the start does).
    if let Err(e) = c.start("model") {
        assert!(e.to_string().contains("OOM killer"), "{e}");
    }
    let f = wait_for(Duration::from_secs(20), "the failed instance", || {
        c.instances()
            .unwrap()
            .into_iter()
            .find(|i| i.state == "failed")
    });
    let exit = f.exit.clone().unwrap_or_default();
    assert!(
        exit.starts_with("killed by the kernel's OOM killer: the VM outgrew its memory limit")
            && exit.contains("in its own cgroup"),
        "{f:?}"
    );
    assert!(f.error.as_deref().unwrap().contains("OOM killer"), "{f:?}");
    // Never the appliance: the agent and the other VM are fine.
    assert!(a
        .child
        .as_ref()
        .is_some_and(|ch| agent::supervisor::pid_alive(ch.id())));
    verify_guest(&other.endpoint);
    let again = c.start("model").unwrap();
    verify_guest(&again.endpoint);
}

/// From inside its jail, a vmm cannot reach another VM's files nor the agent's (the test
/// hook lists paths for it to try: another instance's directory, log, socket and serial log,
/// the operator token, the TLS key, the host's files), while its own directory stays
/// writable; it runs as its own user, pid 1 of its namespace.
#[test]
fn a_jailed_vmm_cannot_reach_another_vms_files() {
    let d = Scratch::new("escape");
    let list = d.path("probe.list");
    std::fs::write(&list, "").unwrap();
    let vmm = wrapper(&d, &format!("export VMM_JAIL_PROBE='{}'", list.display()));
    let a = AgentProc::start_args("escape", &[], Some(&vmm), &["--no-warm-standby"]);
    let c = a.client();
    let victim = c.start("model").unwrap();
    let vdir = a.data.join("instances").join(&victim.id);
    let targets = [
        vdir.clone(),
        vdir.join("serial.log"),
        vdir.join("vmm.log"),
        vdir.join("vm.sock"),
        a.data.join(format!("instances/{}.json", victim.id)),
        a.data.join(agent::auth::OPERATOR_TOKEN_FILE),
        a.data.join("tls"),
        std::path::PathBuf::from("/etc/passwd"),
        std::path::PathBuf::from("/sys/fs/cgroup"),
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_agent")),
    ];
    for t in &targets {
        assert!(t.exists(), "{t:?} should exist outside the jail");
    }
    let text: Vec<String> = targets.iter().map(|t| t.display().to_string()).collect();
    std::fs::write(&list, text.join("\n")).unwrap();
    let prober = c.start("model").unwrap();
    verify_guest(&prober.endpoint);
    let log =
        std::fs::read_to_string(a.data.join("instances").join(&prober.id).join("vmm.log")).unwrap();
    for t in &text {
        let line = log
            .lines()
            .find(|l| l.starts_with(&format!("vmm: jail probe: {t}: ")))
            .unwrap_or_else(|| panic!("no probe of {t} in:\n{log}"));
        assert!(line.contains(": unreachable ("), "{line}");
    }
    assert!(!log.contains("REACHABLE"), "{log}");
    let me = log
        .lines()
        .find(|l| l.starts_with("vmm: jail probe: uid="))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(me.ends_with("pid=1 own directory writable=true"), "{me}");
    assert!(!me.starts_with("vmm: jail probe: uid=0 "), "{me}");
    // The victim is untouched and still answers.
    verify_guest(&victim.endpoint);
    assert!(vdir.join("serial.log").exists());
}

/// A vmm killed by SIGSYS (the hidden test hook makes its vCPU thread make a forbidden call
/// once filtered) → the instance is failed, and its exit and error say seccomp killed it.
#[test]
fn a_vmm_killed_by_its_seccomp_filter_is_reported_failed_with_that_reason() {
    let d = Scratch::new("seccomp-vmm");
    let vmm = wrapper(&d, "export VMM_SECCOMP_SELFTEST=vcpu");
    let a = AgentProc::start_with_vmm("seccomp", &[], &vmm);
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
