//! Process-wide restrictions the vmm sets on itself at start, before any thread exists (so
//! every thread has them): `no_new_privs` (nothing it could execute gains privileges),
//! no core dumps (a dump would write the guest's memory to disk), and at most
//! [`MAX_OPEN_FILES`] descriptors (the devices' sockets and files, the user-mode network's
//! connections within its own caps, the control clients).

/// The descriptor limit (soft and hard; never raised above the inherited hard limit).
pub const MAX_OPEN_FILES: u64 = 4096;

/// Errors of [`restrict_process`].
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// A prctl or setrlimit call failed.
    #[error("cannot set {0} on the vmm process")]
    Set(&'static str, #[source] std::io::Error),
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), LimitsError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(LimitsError::Set(what, std::io::Error::last_os_error()))
    }
}

fn set_limit(
    what: &'static str,
    resource: libc::__rlimit_resource_t,
    max: u64,
) -> Result<(), LimitsError> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the current limits into `cur`, a valid rlimit.
    check(what, unsafe { libc::getrlimit(resource, &mut cur) })?;
    let lim = cur.rlim_max.min(max);
    let new = libc::rlimit {
        rlim_cur: lim,
        rlim_max: lim,
    };
    // SAFETY: setrlimit reads `new`, a valid rlimit.
    check(what, unsafe { libc::setrlimit(resource, &new) })
}

/// Sets `no_new_privs`, `RLIMIT_CORE` 0 and `RLIMIT_NOFILE` [`MAX_OPEN_FILES`] on the
/// calling process (threads started afterwards inherit them).
pub fn restrict_process() -> Result<(), LimitsError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    check("no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    set_limit("RLIMIT_CORE", libc::RLIMIT_CORE, 0)?;
    set_limit("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, MAX_OPEN_FILES)
}

/// The environment variable of the memory test hook (see [`exhaust_memory`]).
pub const MEMORY_SELFTEST_ENV: &str = "VMM_MEMORY_SELFTEST";
/// How much the memory test hook takes at most before it gives up, MiB.
pub const MEMORY_SELFTEST_CAP_MIB: usize = 4096;

/// Test hook (`VMM_MEMORY_SELFTEST` set): once the VM is ready, the vmm takes and touches
/// memory, 16 MiB at a time, as a VM outgrowing its memory would, until something stops it:
/// the memory limit of its cgroup (the OOM killer there). Should it reach
/// [`MEMORY_SELFTEST_CAP_MIB`] first, it says so and exits with status 3.
pub fn exhaust_memory() -> ! {
    let mut held: Vec<Vec<u8>> = Vec::new();
    while held.len() * 16 < MEMORY_SELFTEST_CAP_MIB {
        held.push(vec![0x5a; 16 << 20]);
    }
    eprintln!(
        "vmm: memory test hook: {} MiB taken and nothing stopped it",
        held.len() * 16
    );
    std::process::exit(3)
}
