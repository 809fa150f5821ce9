//! The jailed launch of every vmm the agent starts (see `vmm::jail` for what the jail holds;
//! the vmm enters it itself, first thing, when given `--jail UID:GID`).
//!
//! Each VM gets a user and group of its own (not one per appliance): a vmm that escaped its
//! guest and its jail still could not read, signal or trace another VM's vmm, nor open
//! another VM's files (instance directories are 0700, each owned by its VM's user), and
//! `RLIMIT_NPROC` counts that VM's threads alone. The ids come from a range no account uses
//! ([`UID_BASE`], [`UID_RANGE`] of them), handed out in turn from a random start; the agent
//! (root) keeps reading and writing every instance's files.
//!
//! The agent spawns the vmm with `posix_spawn` (no code of ours in the child, no copy of the
//! agent's page tables) from a short-lived thread that first unshares the pid namespace
//! ([`spawn_in_namespaces`]): the vmm is born as pid 1 of a namespace of its own and its
//! parent is the agent, so its pid and exit status (a seccomp SIGSYS, an OOM kill) reach the
//! supervisor as before, and it need not fork to get there. `agent --no-jail` turns all of
//! this off (for debugging: the vmm then runs as root, still filtered and confined).

use std::sync::atomic::{AtomicU32, Ordering};

/// The first user (and group) id of the VMs.
pub const UID_BASE: u32 = 1_500_000_000;
/// How many ids VMs take in turn.
pub const UID_RANGE: u32 = 1 << 20;

/// Hands out per-VM user ids.
#[derive(Debug)]
pub struct JailIds {
    next: AtomicU32,
}

impl Default for JailIds {
    fn default() -> Self {
        let start = u32::from_str_radix(&crate::store::new_id(4), 16).unwrap_or(0);
        JailIds {
            next: AtomicU32::new(start % UID_RANGE),
        }
    }
}

impl JailIds {
    /// The next VM's user id (its group id is the same number). An id comes round again
    /// only after [`UID_RANGE`] more VMs.
    pub fn take(&self) -> u32 {
        UID_BASE + self.next.fetch_add(1, Ordering::Relaxed) % UID_RANGE
    }
}

/// Runs `spawn` (which starts a process: a vmm with `--jail`) on a thread of its own that
/// first unshares the pid namespace: the process it starts is pid 1 of a new one (the thread
/// ends afterwards; the process keeps the namespace). Needs root. `spawn` must not start
/// threads: the kernel refuses a thread whose pid namespace for children is not its own.
pub fn spawn_in_namespaces<T: Send>(
    spawn: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // CLONE_NEWPID changes the namespace of this thread's future children only.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
                .map_err(std::io::Error::from)?;
            spawn()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
    })
}

/// Whether this process may jail its vmms (it is root).
pub fn can_jail() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_in_turn_within_the_range() {
        let ids = JailIds::default();
        let a = ids.take();
        let b = ids.take();
        assert!((UID_BASE..UID_BASE + UID_RANGE).contains(&a));
        assert!(b == a + 1 || (a == UID_BASE + UID_RANGE - 1 && b == UID_BASE));
    }

    #[test]
    fn a_process_spawned_in_namespaces_is_pid_1_of_its_own() {
        let out = spawn_in_namespaces(|| {
            std::process::Command::new("sh")
                .args(["-c", "echo $$"])
                .output()
        })
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
        let me = std::fs::read_link("/proc/self/ns/pid").unwrap();
        let again = std::fs::read_link("/proc/self/ns/pid").unwrap();
        assert_eq!(me, again, "the agent's own namespace is untouched");
    }
}
