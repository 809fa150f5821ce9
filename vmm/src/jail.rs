//! The jail a vmm enters first thing when it is given `--jail UID:GID` (the agent gives it to
//! every vmm it starts): no other process's files, no other process, no privilege.
//!
//! ```text
//!  vmm (root, as spawned: by the agent, already pid 1 of a pid namespace of its own,
//!   │   the agent's `jail::spawn_in_namespaces`; otherwise it unshares one and forks, and the parent
//!   │   waits, forwards SIGINT/SIGTERM/SIGHUP and exits as the jailed vmm did)
//!   │ join its cgroups (--cgroup), chown the instance directory to UID:GID, mode 0700
//!   │ unshare(mount, IPC namespaces)
//!   │ a private tmpfs mounted over the instance directory becomes its root:
//!   │   <instance dir>   bound read-write (the socket, serial log, snapshots)
//!   │   the base, the overlay's directory, …   bound read-only, nosuid/nodev/noexec
//!   │   /dev/kvm, /dev/userfaultfd, /dev/net/tun (TAP only): nodes made here, owned by
//!   │        UID, mode 0600 (the host's nodes stay root's)
//!   │   /proc: this pid namespace's own (pids only), for /proc/self
//!   │   everything else: absent; the tmpfs itself read-only
//!   │ moved over / and made the root (the host's mounts beneath it, unreachable)
//!   │ setgroups([]), GID, UID: every capability gone (no_new_privs is already set)
//!   ▼ returns: the vmm goes on, at the same paths as before
//! ```
//!
//! Paths stay the same inside (each is bound at its own absolute path, and the working
//! directory is recreated), so nothing after this step knows it is jailed. The jail holds
//! what one VM needs and nothing of another: another instance's directory, another
//! service's overlay, the agent's data (tokens, keys, records) do not exist in it, and
//! would not be readable by this VM's own user if they did.
//!
//! A hidden test hook shows it from inside: with `VMM_JAIL_PROBE=FILE` in the environment,
//! the jailed vmm tries to reach each path listed in FILE (one per line, read before the
//! jail is entered) and writes what happened to its stderr (see [`probe`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The environment variable of the jail's test hook: a file listing paths to try from
/// inside.
pub const PROBE_ENV: &str = "VMM_JAIL_PROBE";

/// Threads (and processes) the jailed vmm's own user may have at once (`RLIMIT_NPROC`; with a
/// user of its own per VM, this bounds that VM alone).
pub const MAX_TASKS: u64 = 512;

/// What a vmm's jail holds and who it runs as.
#[derive(Clone, Debug)]
pub struct JailSpec {
    /// The user the vmm becomes.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// The instance directory: the only writable place, handed to `uid` (mode 0700).
    pub dir: PathBuf,
    /// Files or directories bound read-only at their own paths.
    pub read_only: Vec<PathBuf>,
    /// Character devices made inside, owned by `uid`, mode 0600.
    pub devices: Vec<PathBuf>,
    /// A tap device to hand to `uid` (it must exist: see `netback::Tap::hand_to`).
    pub tap: Option<String>,
}

/// Errors of entering the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Not root: namespaces, mounts and a change of user need it.
    #[error("entering a jail needs root (the agent runs as root); run without --jail to debug as another user")]
    NotRoot,
    /// A path the jail should hold is not there.
    #[error("cannot {what} '{path}' for the jail")]
    Path {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("cannot {0} while entering the jail")]
    Sys(&'static str, #[source] io::Error),
    /// The tap could not be handed to the VM's user.
    #[error("cannot hand the tap to the VM's user")]
    Tap(#[source] netback::TapError),
    /// A cgroup could not be joined.
    #[error("cannot join the cgroup by writing 0 to '{0}'")]
    Cgroup(PathBuf, #[source] io::Error),
}

fn sys(what: &'static str, rc: libc::c_long) -> Result<libc::c_long, JailError> {
    if rc < 0 {
        Err(JailError::Sys(what, io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths from the OS hold no NUL")
}

fn path_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JailError + 'a {
    move |source| JailError::Path {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Joins the cgroups by the files given: each cgroup's `cgroup.procs`, or (v1) its `tasks`,
/// which moves only the calling thread, but skips the lock that makes a move of a whole
/// process wait for an RCU grace period (10–15 ms per start on this host). Called while the
/// vmm has one thread, so either moves all of it; threads started later are born inside.
/// Done before anything is allocated, so the VM's memory is charged to its own cgroup from
/// the start.
pub fn join_cgroups(procs: &[PathBuf]) -> Result<(), JailError> {
    for p in procs {
        std::fs::write(p, b"0").map_err(|e| JailError::Cgroup(p.clone(), e))?;
    }
    Ok(())
}

/// `inside` (an absolute path) below `root`.
fn under(root: &Path, inside: &Path) -> PathBuf {
    root.join(inside.strip_prefix("/").unwrap_or(inside))
}

/// A path to bind into the jail.
struct Bind {
    /// Where, as the vmm names it (absolute).
    at: PathBuf,
    /// The source, opened before the tmpfs hides it.
    fd: std::fs::File,
    dir: bool,
    writable: bool,
}

/// Mounts `src` at `dst` (bind mounts, tmpfs, proc).
fn mount(
    what: &'static str,
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let src = src.map(cpath);
    let dst_c = cpath(dst);
    let fstype = fstype.map(|t| CString::new(t).expect("no NUL"));
    let data = data.map(|d| CString::new(d).expect("no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null where
    // mount(2) accepts null.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            dst_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(JailError::Path {
            what,
            path: dst.to_owned(),
            source: io::Error::last_os_error(),
        })
    }
}

/// Enters the jail `spec` (see the module doc). Must be called while the process has one
/// thread. Returns in the jailed process: this one when it is pid 1 of its own pid namespace
/// already; otherwise a forked child, while this one waits for it and exits as it does.
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let abs = |p: &Path| std::path::absolute(p).map_err(path_err("resolve", p));
    let cwd =
        std::env::current_dir().map_err(|e| JailError::Sys("read the working directory", e))?;
    let dir = abs(&spec.dir)?;
    let mut devices = Vec::new();
    for d in &spec.devices {
        let at = abs(d)?;
        let m = std::fs::metadata(&at).map_err(path_err("stat", &at))?;
        devices.push((at, m.rdev()));
    }
    if let Some(tap) = &spec.tap {
        netback::Tap::hand_to(tap, spec.uid, spec.gid).map_err(JailError::Tap)?;
    }
    // The instance directory becomes the VM user's own.
    let c = cpath(&dir);
    // SAFETY: `c` is a NUL-terminated path.
    let rc = unsafe { libc::chown(c.as_ptr(), spec.uid, spec.gid) };
    sys("chown the instance directory", rc as _)?;
    // SAFETY: as above.
    let rc = unsafe { libc::chmod(c.as_ptr(), 0o700) };
    sys("chmod the instance directory", rc as _)?;
    let nproc = libc::rlimit {
        rlim_cur: MAX_TASKS,
        rlim_max: MAX_TASKS,
    };
    // SAFETY: setrlimit reads a valid rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &nproc) };
    sys("set RLIMIT_NPROC", rc as _)?;

    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        // Not spawned into a pid namespace of its own (as the agent's
        // `jail::spawn_in_namespaces` does): make one, and go on as its first process.
        fork_into_pid_namespace()?;
    }
    // Always a mount and IPC namespace of its own (a spawner's may be shared with others).
    // SAFETY: unshare takes flags only.
    sys("unshare the mount and IPC namespaces", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC)
    } as _)?;
    build_root(&dir, &devices, &cwd, spec)?;
    drop_privileges(spec)
}

/// Unshares the pid namespace and forks: the child (pid 1 there) returns, killed if its
/// parent goes; the parent never returns (see [`wait_and_mirror`]). A fork costs this host
/// milliseconds (copy-on-write faults under shadow paging), so the agent spawns the vmm
/// directly into a pid namespace instead (the agent's `jail::spawn_in_namespaces`).
fn fork_into_pid_namespace() -> Result<(), JailError> {
    // The signals the waiting parent forwards (and SIGCHLD, its child's end) are blocked
    // before the fork, so none is lost in between; the child unblocks them again.
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut waited: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `waited` and `before` are valid sigsets; these calls only write them and the
    // thread's mask.
    unsafe {
        libc::sigemptyset(&mut waited);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD] {
            libc::sigaddset(&mut waited, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &waited, &mut before);
    }
    // SAFETY: unshare takes flags only.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    sys("unshare the pid namespace", rc as _)?;
    // SAFETY: the process has one thread (the caller's contract), so the child may go on
    // running Rust code.
    let child = sys("fork the jailed vmm", unsafe { libc::fork() } as _)? as libc::pid_t;
    if child > 0 {
        wait_and_mirror(child, &waited);
    }
    // SAFETY: restores the signal mask saved above; prctl takes integers.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    Ok(())
}

/// In the child: the private root over `root` (the instance directory), then `pivot_root`.
fn build_root(
    root: &Path,
    devices: &[(PathBuf, u64)],
    cwd: &Path,
    spec: &JailSpec,
) -> Result<(), JailError> {
    // What the jail will hold, opened now (the tmpfs over the instance directory hides the
    // paths below it; the descriptors do not care), in this mount namespace: a bind mount
    // takes its source from the caller's own namespace only.
    let abs = |p: &Path| std::path::absolute(p).map_err(path_err("resolve", p));
    let open = |p: &Path, writable: bool| -> Result<Bind, JailError> {
        let at = abs(p)?;
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
            .open(&at)
            .map_err(path_err("open", &at))?;
        let dir = fd.metadata().map_err(path_err("stat", &at))?.is_dir();
        Ok(Bind {
            at,
            fd,
            dir,
            writable,
        })
    };
    let mut binds = vec![open(root, true)?];
    for p in &spec.read_only {
        binds.push(open(p, false)?);
    }
    // Parents before what they contain (a read-only directory may hold the instance's).
    binds.sort_by_key(|b| b.at.components().count());
    // Nothing mounted here reaches the host's namespace.
    mount(
        "make the mounts private",
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // Device nodes live on it: no nodev here (the binds get it).
    mount(
        "mount the jail's tmpfs on",
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("size=1m,nr_inodes=4096,mode=0755"),
    )?;
    for b in &binds {
        let target = under(root, &b.at);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(path_err("make the way to", &b.at))?;
        }
        if !target.exists() {
            if b.dir {
                std::fs::create_dir(&target).map_err(path_err("make a mount point for", &b.at))?;
            } else {
                std::fs::File::create(&target)
                    .map_err(path_err("make a mount point for", &b.at))?;
            }
        }
        use std::os::fd::AsRawFd;
        let src = PathBuf::from(format!("/proc/self/fd/{}", b.fd.as_raw_fd()));
        mount("bind", Some(&src), &target, None, libc::MS_BIND, None)?;
        let ro = if b.writable { 0 } else { libc::MS_RDONLY };
        mount(
            "restrict the bind of",
            None,
            &target,
            None,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC
                | ro,
            None,
        )?;
    }
    for (at, rdev) in devices {
        let target = under(root, at);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(path_err("make the way to", at))?;
        }
        let c = cpath(&target);
        // SAFETY: `c` is a NUL-terminated path; mknod and chown take plain integers else.
        sys("make a device node", unsafe {
            libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, *rdev as libc::dev_t)
        } as _)?;
        // SAFETY: as above.
        sys("hand a device node to the VM's user", unsafe {
            libc::chown(c.as_ptr(), spec.uid, spec.gid)
        } as _)?;
    }
    // This pid namespace's own /proc (the vmm reads /proc/self during a handoff); only the
    // process directories where the kernel can (subset=pid).
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(path_err("make", &proc_dir))?;
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let proc = Some(Path::new("proc"));
    mount(
        "mount proc on",
        proc,
        &proc_dir,
        Some("proc"),
        proc_flags,
        Some("subset=pid"),
    )
    .or_else(|_| {
        mount(
            "mount proc on",
            proc,
            &proc_dir,
            Some("proc"),
            proc_flags,
            None,
        )
    })?;
    let cwd_inside = under(root, cwd);
    std::fs::create_dir_all(&cwd_inside).map_err(path_err("make", cwd))?;
    mount(
        "make read-only",
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
    )?;
    let r = cpath(root);
    let (slash, dot) = (c"/", c".");
    // SAFETY: NUL-terminated paths. The jail's tmpfs is moved over "/" and becomes the
    // process's root (as switch_root does): the host's mounts lie beneath it, unreachable by
    // any path, and are never unmounted one by one (a lazy unmount waits for an RCU grace
    // period: milliseconds here, on the start's path).
    unsafe {
        sys("enter the jail's root", libc::chdir(r.as_ptr()) as _)?;
        sys(
            "move the jail's root over /",
            libc::mount(
                dot.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            ) as _,
        )?;
        sys("chroot into the jail", libc::chroot(dot.as_ptr()) as _)?;
    }
    drop(binds);
    std::env::set_current_dir(cwd).map_err(path_err("enter", cwd))
}

/// In the child: the VM's user and group, nothing else (every capability goes with uid 0).
fn drop_privileges(spec: &JailSpec) -> Result<(), JailError> {
    let (u, g) = (spec.uid, spec.gid);
    // SAFETY: plain integer arguments; setgroups with a count of 0 reads no pointer.
    unsafe {
        sys(
            "drop supplementary groups",
            libc::setgroups(0, std::ptr::null()) as _,
        )?;
        sys("set the VM's group", libc::setresgid(g, g, g) as _)?;
        sys("set the VM's user", libc::setresuid(u, u, u) as _)?;
        // A change of user makes the process undumpable, which makes /proc/self root's;
        // the vmm reads its own maps during a handoff. Only this VM's user could trace it.
        sys(
            "keep /proc/self readable",
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) as _,
        )?;
        if libc::geteuid() != u || libc::getegid() != g {
            return Err(JailError::Sys(
                "change user",
                io::Error::other("the user did not change"),
            ));
        }
    }
    Ok(())
}

/// The parent: forwards SIGINT/SIGTERM/SIGHUP to the jailed vmm, and once it has ended,
/// ends the same way. Keeps no descriptor but stdout/stderr (so the report channel's end of
/// file is the jailed vmm's exit).
fn wait_and_mirror(child: libc::pid_t, waited: &libc::sigset_t) -> ! {
    // SAFETY: closing descriptors this process no longer uses (the jailed child has its own
    // copies); sigwaitinfo/waitpid write only the locals given; kill, signal and raise take
    // integers.
    unsafe {
        libc::close(0);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(waited, &mut info);
            if sig < 0 {
                continue;
            }
            if sig != libc::SIGCHLD {
                libc::kill(child, sig);
                continue;
            }
            let mut status = 0;
            if libc::waitpid(child, &mut status, libc::WNOHANG) != child {
                continue;
            }
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                let s = libc::WTERMSIG(status);
                libc::signal(s, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, s);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(s);
                libc::_exit(128 + s);
            }
        }
    }
}

/// The paths listed in the file named by [`PROBE_ENV`], if set (read before the jail).
pub fn probe_list() -> Option<Vec<PathBuf>> {
    let file = std::env::var_os(PROBE_ENV)?;
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    Some(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
    )
}

/// The test hook, from inside the jail: tries to read (a file: one byte; a directory: its
/// entries) and to write (a new file beside or inside) each of `paths`, and `own` (the
/// instance directory, which must stay writable), and prints one line per path to stderr:
/// `vmm: jail probe: PATH: unreachable (…)` or `vmm: jail probe: PATH: REACHABLE (…)`, then
/// `vmm: jail probe: uid=U gid=G pid=P own directory writable=BOOL`.
pub fn probe(paths: &[PathBuf], own: &Path) {
    use std::io::Read;
    for p in paths {
        let mut got = Vec::new();
        match std::fs::File::open(p) {
            Ok(mut f) => {
                let mut b = [0u8; 1];
                match f.read(&mut b) {
                    Ok(n) => got.push(format!("read {n} byte(s)")),
                    Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
                    Err(e) => got.push(format!("opened, read failed: {e}")),
                }
            }
            Err(e) => {
                eprintln!("vmm: jail probe: {}: unreachable (open: {e})", p.display());
            }
        }
        if let Ok(rd) = std::fs::read_dir(p) {
            got.push(format!("listed {} entries", rd.count()));
        }
        let probe_file = if p.is_dir() {
            p.join(".jail-probe")
        } else {
            p.with_extension("jail-probe")
        };
        if std::fs::write(&probe_file, b"x").is_ok() {
            let _ = std::fs::remove_file(&probe_file);
            got.push(format!("wrote {}", probe_file.display()));
        }
        if !got.is_empty() {
            eprintln!(
                "vmm: jail probe: {}: REACHABLE ({})",
                p.display(),
                got.join(", ")
            );
        }
    }
    let own_file = own.join(".jail-probe");
    let writable = std::fs::write(&own_file, b"x").is_ok();
    let _ = std::fs::remove_file(&own_file);
    // SAFETY: getters with no arguments.
    let (u, g, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
    eprintln!("vmm: jail probe: uid={u} gid={g} pid={pid} own directory writable={writable}");
}
