//! Per-thread seccomp filters: each kind of vmm thread may make only the system calls it
//! needs (measured with `strace -f` over synthesis, boot, control requests, snapshots,
//! handoffs and the device paths; see docs/architecture.md), and any other call kills the
//! whole process with SIGSYS.
//!
//! ```text
//!   kind      installed by                         before
//!   main      the event loop's thread             the vCPUs first run (Machine::start)
//!   vcpu      each vCPU thread                     its first KVM_RUN
//!   device    the virtio device thread             its first request
//!   lazy      the overlay fill helper, prefetcher  the guest runs / their first fill
//!   control   the control socket's acceptor        its first accept (its connection
//!                                                  threads inherit it)
//!   handoff   the handoff thread                   its first connect (its encoder and
//!                                                  sender threads inherit it)
//! ```
//!
//! Filters stack: a thread spawned by a filtered thread keeps its parent's filter too, so
//! the main thread's list also holds what the threads it starts after its own filter need
//! (the handoff thread, the lazy prefetcher). The filters are built from Rust data with
//! `seccompiler` (no hand-written BPF). `ioctl` is limited by request: KVM's (type 0xAE) on
//! vCPU threads, userfaultfd's (0xAA) on the fill threads, and a few named socket and
//! terminal requests elsewhere (never TIOCSTI). No thread may map or protect memory
//! executable, and `tgkill` reaches only this process's threads.
//!
//! The library installs nothing until [`enable`] is called: the `vmm` binary does, unless
//! `--no-seccomp`; library users (tests) run unfiltered.
//!
//! A hidden test hook proves each filter is active: with `VMM_SECCOMP_SELFTEST=KIND` in the
//! environment at [`enable`], the first thread of that kind makes a forbidden system call
//! (`getppid`) right after installing its filter, and the vmm dies with SIGSYS.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The environment variable of the test hook (see the module documentation).
pub const SELFTEST_ENV: &str = "VMM_SECCOMP_SELFTEST";

/// A kind of vmm thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ThreadKind {
    /// The event loop (the process's main thread).
    Main = 1,
    /// A vCPU thread.
    Vcpu = 2,
    /// The virtio device thread (block, net, console; user-mode networking).
    Device = 3,
    /// The lazy overlay fill: fault server and background prefetcher.
    Lazy = 4,
    /// The control socket's acceptor and connection threads.
    Control = 5,
    /// A handoff's sender threads.
    Handoff = 6,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Lazy,
        ThreadKind::Control,
        ThreadKind::Handoff,
    ];

    /// The kind's name (as the test hook spells it).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Lazy => "lazy",
            ThreadKind::Control => "control",
            ThreadKind::Handoff => "handoff",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Why filters could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter of a thread kind is invalid (a bug in its list).
    #[error("cannot build the seccomp filter of the {0} threads")]
    Build(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {0} threads (does this kernel support seccomp? --no-seccomp runs without)")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The kernel has no seccomp filters.
    #[error("this kernel does not support seccomp filters (--no-seccomp runs without)")]
    Unsupported(#[source] std::io::Error),
    /// The test hook names no thread kind.
    #[error(
        "{SELFTEST_ENV}='{0}' is not a thread kind (main, vcpu, device, lazy, control, handoff)"
    )]
    SelfTest(String),
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The thread kind the test hook makes misbehave (0: none).
static SELFTEST: AtomicU8 = AtomicU8::new(0);
static PROGRAMS: [OnceLock<BpfProgram>; 6] = [const { OnceLock::new() }; 6];

/// Turns the filters on for every thread that starts (or reaches its install point) from
/// now on, once the kernel is known to support them. Reads the test hook's variable.
pub fn enable() -> Result<(), SeccompError> {
    if let Ok(name) = std::env::var(SELFTEST_ENV) {
        let kind = ThreadKind::from_name(&name).ok_or(SeccompError::SelfTest(name))?;
        SELFTEST.store(kind as u8, Ordering::Relaxed);
    }
    // Each filter is built by the first thread of its kind, off the main thread's path to
    // the guest's start (the unit tests build every one); only kernel support is checked
    // here, so that a thread's install does not fail later.
    // SAFETY: PR_GET_SECCOMP takes no pointer; it fails with EINVAL without seccomp.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    ENABLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether [`enable`] was called.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// Installs the filter of `kind` in the calling thread, if filters are enabled.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    seccompiler::apply_filter(program(kind)?).map_err(|e| SeccompError::Install(kind.name(), e))?;
    if SELFTEST.load(Ordering::Relaxed) == kind as u8 {
        tracing::warn!(
            "{SELFTEST_ENV}: the {} thread makes a forbidden system call",
            kind.name()
        );
        // SAFETY: getppid takes no arguments and has no effect; the filter kills us here.
        unsafe { libc::syscall(libc::SYS_getppid) };
        tracing::error!("{SELFTEST_ENV}: the forbidden call was allowed");
    }
    Ok(())
}

/// [`install`] for a thread that must not go on unfiltered: a failure ends the process
/// (the lists are checked by the unit tests and kernel support at [`enable`]).
pub fn install_or_abort(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("vmm: {}", crate::error::message(&e));
        std::process::abort();
    }
}

/// The system calls `kind` may make (some only with the arguments its rules allow).
pub fn allowed(kind: ThreadKind) -> Vec<i64> {
    rules(kind).into_keys().collect()
}

fn program(kind: ThreadKind) -> Result<&'static BpfProgram, SeccompError> {
    let slot = &PROGRAMS[kind as usize - 1];
    if let Some(p) = slot.get() {
        return Ok(p);
    }
    let filter = SeccompFilter::new(
        rules(kind),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| SeccompError::Build(kind.name(), e))?;
    Ok(slot.get_or_init(|| filter))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// One condition on argument `arg` (32 bits).
fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index <= 5")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule with conditions")
}

fn allow(r: &mut Rules, calls: &[i64]) {
    for c in calls {
        r.insert(*c, Vec::new());
    }
}

/// `ioctl` with one of `types` (bits 8–15 of the request) or one of `requests`.
fn ioctls(r: &mut Rules, types: &[u64], requests: &[u64]) {
    let mut rs: Vec<SeccompRule> = types
        .iter()
        .map(|t| rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), t << 8)]))
        .collect();
    rs.extend(
        requests
            .iter()
            .map(|q| rule(vec![cond(1, SeccompCmpOp::Eq, *q)])),
    );
    r.insert(libc::SYS_ioctl, rs);
}

/// KVM's ioctl type.
const KVMIO: u64 = 0xae;
/// userfaultfd's ioctl type.
const UFFDIO: u64 = 0xaa;

/// What every thread needs: memory, locks, signals' return, time, its own end, logging.
fn common(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_read,
            SYS_write,
            SYS_close,
            SYS_futex,
            SYS_munmap,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_gettid,
            SYS_getpid,
            SYS_getrandom,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_fcntl,
            SYS_exit,
            SYS_exit_group,
        ],
    );
    // Never executable memory.
    let no_exec = |arg| {
        vec![rule(vec![cond(
            arg,
            SeccompCmpOp::MaskedEq(PROT_EXEC as u64),
            0,
        )])]
    };
    r.insert(SYS_mmap, no_exec(2));
    r.insert(SYS_mprotect, no_exec(2));
    // Signals (a vCPU kick, an abort) only to this process's threads.
    let pid = std::process::id() as u64;
    r.insert(SYS_tgkill, vec![rule(vec![cond(0, SeccompCmpOp::Eq, pid)])]);
}

/// What a thread that starts threads needs (the child runs these under its parent's filter
/// until it installs its own, if it does).
fn spawns(r: &mut Rules) {
    use libc::*;
    allow(r, &[SYS_clone3, SYS_clone, SYS_rseq, SYS_set_robust_list]);
    // Naming the thread; and a child that installs its own filter (which only narrows
    // what it may do) sets no_new_privs first.
    r.insert(
        SYS_prctl,
        vec![
            rule(vec![cond(0, SeccompCmpOp::Eq, PR_SET_NAME as u64)]),
            rule(vec![cond(0, SeccompCmpOp::Eq, PR_SET_NO_NEW_PRIVS as u64)]),
        ],
    );
    r.insert(
        SYS_seccomp,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Eq,
            SECCOMP_SET_MODE_FILTER as u64,
        )])],
    );
}

/// Reading and writing files already open, and their metadata.
fn file_io(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_pread64,
            SYS_pwrite64,
            SYS_preadv,
            SYS_pwritev,
            SYS_readv,
            SYS_writev,
            SYS_lseek,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_ftruncate,
            SYS_fsync,
            SYS_fdatasync,
        ],
    );
}

/// Talking over sockets already open, and polling.
fn socket_io(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_shutdown,
            SYS_setsockopt,
            SYS_getsockopt,
            SYS_getsockname,
            SYS_getpeername,
            SYS_poll,
            SYS_ppoll,
        ],
    );
}

fn rules(kind: ThreadKind) -> Rules {
    use libc::*;
    let mut r = Rules::new();
    common(&mut r);
    match kind {
        ThreadKind::Vcpu => {
            // Guest exits: KVM state, serial output (write), device notifications.
            ioctls(&mut r, &[KVMIO], &[]);
        }
        ThreadKind::Device => {
            file_io(&mut r);
            socket_io(&mut r);
            // User-mode networking: the guest's outbound connections and UDP, the forwards.
            allow(
                &mut r,
                &[
                    SYS_socket,
                    SYS_connect,
                    SYS_bind,
                    SYS_accept4,
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_epoll_ctl,
                    // A δ's directory is synced after it grows.
                    SYS_openat,
                ],
            );
            ioctls(&mut r, &[KVMIO], &[FIONBIO, FIOCLEX]);
        }
        ThreadKind::Lazy => {
            file_io(&mut r);
            allow(
                &mut r,
                &[SYS_poll, SYS_ppoll, SYS_openat, SYS_sched_setscheduler],
            );
            ioctls(&mut r, &[UFFDIO], &[]);
        }
        ThreadKind::Control => {
            spawns(&mut r);
            socket_io(&mut r);
            allow(&mut r, &[SYS_accept4]);
            ioctls(&mut r, &[], &[FIONBIO, FIOCLEX]);
        }
        ThreadKind::Handoff => {
            spawns(&mut r);
            file_io(&mut r);
            socket_io(&mut r);
            allow(&mut r, &[SYS_socket, SYS_connect, SYS_openat]);
            ioctls(&mut r, &[KVMIO], &[FIONBIO, FIOCLEX, TIOCOUTQ]);
        }
        ThreadKind::Main => {
            spawns(&mut r);
            file_io(&mut r);
            socket_io(&mut r);
            allow(
                &mut r,
                &[
                    // Snapshots: files and directories of their own.
                    SYS_openat,
                    SYS_mkdir,
                    SYS_mkdirat,
                    SYS_rename,
                    SYS_renameat,
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_mincore,
                    // Resolving a snapshot's directory against --confine.
                    SYS_readlink,
                    SYS_readlinkat,
                    SYS_access,
                    SYS_faccessat,
                    SYS_faccessat2,
                    // The event loop.
                    SYS_epoll_create1,
                    SYS_eventfd2,
                    SYS_epoll_wait,
                    SYS_epoll_pwait,
                    SYS_epoll_ctl,
                    SYS_rt_sigaction,
                    // Threads started after this filter keep it: the handoff's connection,
                    // the prefetcher's priority.
                    SYS_socket,
                    SYS_connect,
                    SYS_sched_setscheduler,
                ],
            );
            ioctls(
                &mut r,
                &[KVMIO, UFFDIO],
                &[
                    FIONBIO, FIOCLEX, TIOCOUTQ,
                    // The terminal of standard input (restored at exit).
                    TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ,
                ],
            );
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_vcpus_get_no_files() {
        for kind in ThreadKind::ALL {
            program(kind).unwrap();
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        let vcpu = allowed(ThreadKind::Vcpu);
        for call in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone3,
        ] {
            assert!(!vcpu.contains(&call), "{call}");
        }
        for kind in ThreadKind::ALL {
            let list = allowed(kind);
            for call in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_getppid] {
                assert!(!list.contains(&call), "{} allows {call}", kind.name());
            }
        }
    }
}
