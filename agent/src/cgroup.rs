//! The board's limits enforced by the kernel: an appliance cgroup under the agent's own,
//! limited to the board's `cpus` and memory, and one cgroup per VM inside it, limited to
//! that VM's guest RAM plus [`VM_OVERHEAD_MIB`]; each vmm joins its own (`vmm --cgroup`)
//! before it allocates anything (see [`VmCgroup::join_files`]), so a VM that outgrows its memory is stopped there (the
//! kernel's OOM killer, within that cgroup) and never takes the appliance with it.
//!
//! ```text
//! <agent's cgroup>/cloudlet-<appliance id>/      cpu: board cpus × 100 ms per 100 ms, weighed
//!                                                     as that many CPUs (shares / weight)
//!                                                memory: board memory_mib + max_vms × overhead
//!                                                pids: max_vms × VM_TASKS
//!     vm-<instance id>/                          memory: guest RAM + overhead (no swap)
//!                                                pids: VM_TASKS
//!                                                (v1: no cpu group of its own; the VMs share
//!                                                the appliance's)
//! ```
//!
//! cgroup v2 (one hierarchy with the cpu, memory and pids controllers) is used where the
//! kernel offers it; otherwise the v1 hierarchies `/sys/fs/cgroup/{cpu,memory,pids}` (a
//! "hybrid" host: v2 mounted without controllers). Which one is decided once at agent start
//! and logged; with neither (or when the agent is not allowed to create cgroups) the agent
//! says so once and goes on: the board's limits are then only accounted by the supervisor.
//! A VM's cgroup is removed when its vmm has ended; leftovers of an agent that died are
//! removed by the next one.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Memory a VM may use beyond its guest RAM: the vmm itself, its device buffers, and the page
/// cache its files bring in (reclaimed first when the limit is near).
pub const VM_OVERHEAD_MIB: u64 = 64;
/// Tasks (threads) a VM's cgroup may hold.
pub const VM_TASKS: u64 = 512;
/// The CPU period the quotas are expressed in, microseconds.
const PERIOD_US: u64 = 100_000;

/// Which cgroup interface the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// The unified hierarchy with the cpu, memory and pids controllers.
    V2,
    /// Separate cpu, memory and pids hierarchies.
    V1,
}

/// The appliance's cgroups, or none.
#[derive(Debug)]
pub struct Cgroups {
    inner: Option<Appliance>,
}

#[derive(Debug)]
struct Appliance {
    version: Version,
    /// The appliance cgroup, per hierarchy (v2: one; v1: cpu, memory, pids).
    dirs: Vec<(Controller, PathBuf)>,
    limits: Limits,
    /// Where the live agents' cgroup locks are (see [`Appliance::lock`]).
    locks: PathBuf,
    /// This agent's lock on its appliance cgroup, held for its lifetime: another agent
    /// removes an appliance cgroup only when it can take that cgroup's lock (its agent died).
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// Where agents keep the locks of their appliance cgroups (gone at reboot, as the cgroups).
const LOCK_DIR: &str = "/run/cloudlet/cgroups";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Controller {
    /// v2: every controller in one directory.
    All,
    Cpu,
    Memory,
    Pids,
}

/// The board's limits for the appliance cgroup.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// CPUs for service VMs.
    pub cpus: u32,
    /// Memory for service VMs' guest RAM, MiB.
    pub memory_mib: u64,
    /// Service VMs at once.
    pub max_vms: u32,
}

impl Limits {
    /// The appliance's memory limit, bytes: the guest RAM the board offers plus each VM
    /// slot's overhead.
    pub fn memory_bytes(&self) -> u64 {
        (self.memory_mib + u64::from(self.max_vms) * VM_OVERHEAD_MIB) << 20
    }

    /// The appliance's CPU quota per [`PERIOD_US`], microseconds.
    pub fn cpu_quota_us(&self) -> u64 {
        u64::from(self.cpus) * PERIOD_US
    }
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("writing '{value}' to {}: {e}", dir.join(file).display()),
        )
    })
}

/// The agent's own cgroup path in the hierarchy whose `/proc/self/cgroup` line matches
/// `pick` (the line's controller list).
fn own_path(proc_cgroup: &str, pick: impl Fn(&str, &str) -> bool) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        pick(id, ctrls).then(|| path.trim_start_matches('/').to_string())
    })
}

/// Where the cgroups go: v2 when a unified hierarchy has cpu, memory and pids, else v1 when
/// the three hierarchies are mounted; each with the agent's own path in it.
fn detect(root: &Path, proc_cgroup: &str) -> Option<(Version, Vec<(Controller, PathBuf)>)> {
    for unified in [root.to_path_buf(), root.join("unified")] {
        let Ok(ctrls) = std::fs::read_to_string(unified.join("cgroup.controllers")) else {
            continue;
        };
        let has = |c: &str| ctrls.split_whitespace().any(|x| x == c);
        if has("cpu") && has("memory") && has("pids") {
            let own = own_path(proc_cgroup, |id, _| id == "0")?;
            return Some((Version::V2, vec![(Controller::All, unified.join(own))]));
        }
    }
    let mut dirs = Vec::new();
    for (c, name) in [
        (Controller::Cpu, "cpu"),
        (Controller::Memory, "memory"),
        (Controller::Pids, "pids"),
    ] {
        let mount = root.join(name);
        if !mount.join("cgroup.procs").exists() {
            return None;
        }
        let own = own_path(proc_cgroup, |id, ctrls| {
            id != "0" && ctrls.split(',').any(|x| x == name)
        })?;
        dirs.push((c, mount.join(own)));
    }
    Some((Version::V1, dirs))
}

impl Cgroups {
    /// No cgroups (the limits are only accounted).
    pub fn none() -> Cgroups {
        Cgroups { inner: None }
    }

    /// Detects the cgroup interface, makes the appliance cgroup `cloudlet-<appliance>` under
    /// the agent's own with the board's `limits`, removes VM cgroups left empty by an agent
    /// before, and logs which interface is used (or why none).
    pub fn setup(appliance: &str, limits: Limits) -> Cgroups {
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match Cgroups::setup_in(
            Path::new("/sys/fs/cgroup"),
            Path::new(LOCK_DIR),
            &proc_cgroup,
            appliance,
            limits,
        ) {
            Ok(Some(c)) => {
                let a = c.inner.as_ref().expect("set up");
                tracing::info!(
                    version = ?a.version,
                    cpus = limits.cpus,
                    memory_mib = limits.memory_bytes() >> 20,
                    "cgroups: service VMs run under {} with the board's limits, each VM in its own cgroup",
                    a.dirs.iter().map(|(_, d)| d.display().to_string()).collect::<Vec<_>>().join(", ")
                );
                c
            }
            Ok(None) => {
                tracing::warn!("cgroups: no cpu, memory and pids controllers here (v2 or v1): the board's cpus and memory are accounted, not enforced by the kernel");
                Cgroups::none()
            }
            Err(e) => {
                tracing::warn!("cgroups: cannot set up the appliance's cgroup ({e}): the board's cpus and memory are accounted, not enforced by the kernel");
                Cgroups::none()
            }
        }
    }

    /// [`Cgroups::setup`] with the cgroup mount at `root`, the agents' locks in `locks` and
    /// the agent's `/proc/self/cgroup` text.
    fn setup_in(
        root: &Path,
        locks: &Path,
        proc_cgroup: &str,
        appliance: &str,
        limits: Limits,
    ) -> std::io::Result<Option<Cgroups>> {
        let Some((version, own)) = detect(root, proc_cgroup) else {
            return Ok(None);
        };
        let name = format!("cloudlet-{appliance}");
        let mut dirs = Vec::new();
        for (c, own_dir) in own {
            if c == Controller::All {
                enable_controllers(&own_dir)?;
            }
            dirs.push((c, own_dir.join(&name)));
        }
        let mut a = Appliance {
            version,
            dirs,
            limits,
            locks: locks.to_owned(),
            _lock: None,
        };
        // A moment's wait: another agent's sweep may hold it while it looks at it.
        for _ in 0..20 {
            a._lock = a.lock(std::ffi::OsStr::new(&name));
            if a._lock.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if a._lock.is_none() {
            tracing::warn!(
                "cgroups: cannot take the lock of '{name}' in {}: is another agent using this data directory?",
                locks.display()
            );
        }
        a.make()?;
        a.remove_others();
        let c = Cgroups { inner: Some(a) };
        c.sweep();
        Ok(Some(c))
    }

    /// The interface in use, if any.
    pub fn version(&self) -> Option<Version> {
        self.inner.as_ref().map(|a| a.version)
    }

    /// The appliance cgroup's directories (one per hierarchy).
    pub fn appliance_dirs(&self) -> Vec<PathBuf> {
        self.inner
            .iter()
            .flat_map(|a| a.dirs.iter().map(|(_, d)| d.clone()))
            .collect()
    }

    /// Makes the cgroup of instance `id` with `mem_mib` of guest RAM (an existing one, left
    /// by a vmm before, is reused). `None` without cgroups, or when it cannot be made (said
    /// in the log; the VM then runs in the appliance's cgroup's parent, unlimited).
    pub fn vm(&self, id: &str, mem_mib: u64) -> Option<VmCgroup> {
        let a = self.inner.as_ref()?;
        let made = (|| -> std::io::Result<VmCgroup> {
            let mut cg = VmCgroup {
                version: a.version,
                dirs: Vec::new(),
                shared: Vec::new(),
                memory_mib: mem_mib + VM_OVERHEAD_MIB,
            };
            for (c, parent) in &a.dirs {
                if *c == Controller::Cpu {
                    // v1: the VMs share the appliance's CPU group (a group per VM would
                    // only add a level of scheduling: the quota is the appliance's).
                    cg.shared.push(parent.join("tasks"));
                    continue;
                }
                let dir = parent.join(format!("vm-{id}"));
                let made = std::fs::create_dir(&dir).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        // The appliance cgroup went (another agent's clean-up): again.
                        a.make()?;
                        std::fs::create_dir(&dir)
                    } else {
                        Err(e)
                    }
                });
                match made {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                cg.dirs.push((*c, dir));
            }
            let bytes = cg.memory_mib << 20;
            for (c, dir) in &cg.dirs {
                match c {
                    Controller::All => {
                        write(dir, "memory.max", &bytes.to_string())?;
                        let _ = write(dir, "memory.swap.max", "0");
                        // An OOM kills the whole VM, not one of its threads' processes.
                        let _ = write(dir, "memory.oom.group", "1");
                        write(dir, "pids.max", &VM_TASKS.to_string())?;
                    }
                    Controller::Memory => set_v1_memory(dir, bytes)?,
                    Controller::Pids => write(dir, "pids.max", &VM_TASKS.to_string())?,
                    Controller::Cpu => {}
                }
            }
            Ok(cg)
        })();
        match made {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!(
                    instance = id,
                    "cannot make the VM's cgroup ({e}): it runs without its own limits"
                );
                None
            }
        }
    }

    /// Removes the cgroup of instance `id` (once its vmm has ended; a cgroup with a live
    /// process stays).
    pub fn remove_vm(&self, id: &str) {
        if let Some(a) = &self.inner {
            for (_, parent) in &a.dirs {
                let _ = std::fs::remove_dir(parent.join(format!("vm-{id}")));
            }
        }
    }

    /// At agent exit: removes the VM cgroups no vmm is in, then the appliance cgroup if no
    /// VM is left in it (running VMs keep theirs, for the next agent to adopt).
    pub fn close(&self) {
        self.sweep();
        for d in self.appliance_dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Removes the VM cgroups no process is in any more (left by an agent that died).
    pub fn sweep(&self) {
        let Some(a) = &self.inner else { return };
        for (_, parent) in &a.dirs {
            let Ok(rd) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("vm-") {
                    // Fails (busy) while a process is inside: an adopted VM keeps its own.
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

impl Appliance {
    /// Makes the appliance cgroup (again, if it went) with the board's limits.
    fn make(&self) -> std::io::Result<()> {
        let limits = self.limits;
        for (_, dir) in &self.dirs {
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        for (c, dir) in &self.dirs {
            match c {
                Controller::All => {
                    write(dir, "cgroup.subtree_control", "+cpu +memory +pids")?;
                    write(
                        dir,
                        "cpu.max",
                        &format!("{} {PERIOD_US}", limits.cpu_quota_us()),
                    )?;
                    // Weighed as the CPUs it stands for against the host's other tasks.
                    let _ = write(
                        dir,
                        "cpu.weight",
                        &(100 * u64::from(limits.cpus)).min(10_000).to_string(),
                    );
                    write(dir, "memory.max", &limits.memory_bytes().to_string())?;
                    let _ = write(dir, "memory.swap.max", "0");
                    write(
                        dir,
                        "pids.max",
                        &(u64::from(limits.max_vms) * VM_TASKS).to_string(),
                    )?;
                }
                Controller::Cpu => {
                    write(dir, "cpu.cfs_period_us", &PERIOD_US.to_string())?;
                    write(dir, "cpu.cfs_quota_us", &limits.cpu_quota_us().to_string())?;
                    // Weighed as the CPUs it stands for against the host's other tasks.
                    let _ = write(
                        dir,
                        "cpu.shares",
                        &(1024 * u64::from(limits.cpus)).to_string(),
                    );
                }
                Controller::Memory => set_v1_memory(dir, limits.memory_bytes())?,
                Controller::Pids => write(
                    dir,
                    "pids.max",
                    &(u64::from(limits.max_vms) * VM_TASKS).to_string(),
                )?,
            }
        }
        Ok(())
    }

    /// The lock of appliance cgroup `name`, if it can be taken now (no live agent holds it).
    fn lock(&self, name: &std::ffi::OsStr) -> Option<nix::fcntl::Flock<std::fs::File>> {
        std::fs::create_dir_all(&self.locks).ok()?;
        let mut path = self.locks.join(name);
        path.as_mut_os_string().push(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok()?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
    }

    /// Removes the empty appliance cgroups other agents left behind (killed ones): only those
    /// whose lock can be taken, so a live agent's cgroup stays even while it runs no VM. One
    /// with a VM cgroup inside is not removed either (the kernel refuses).
    fn remove_others(&self) {
        for (_, dir) in &self.dirs {
            let (Some(parent), Some(mine)) = (dir.parent(), dir.file_name()) else {
                continue;
            };
            let Ok(rd) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name();
                if name != mine && name.to_string_lossy().starts_with("cloudlet-") {
                    // Held while removing, so an agent of that name starting meanwhile waits.
                    if let Some(_held) = self.lock(&name) {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
        }
    }
}

/// v1 memory limit `bytes`, swap included where swap is accounted.
fn set_v1_memory(dir: &Path, bytes: u64) -> std::io::Result<()> {
    write(dir, "memory.limit_in_bytes", &bytes.to_string())?;
    if dir.join("memory.memsw.limit_in_bytes").exists() {
        let _ = write(dir, "memory.memsw.limit_in_bytes", &bytes.to_string());
    }
    Ok(())
}

/// v2: lets the agent's cgroup give cpu, memory and pids to its children. A cgroup with
/// processes of its own cannot (the "no internal processes" rule), so the agent first moves
/// itself into a leaf `agent` below it.
fn enable_controllers(own: &Path) -> std::io::Result<()> {
    const ENABLE: &str = "+cpu +memory +pids";
    if write(own, "cgroup.subtree_control", ENABLE).is_ok() {
        return Ok(());
    }
    let leaf = own.join("agent");
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let procs = std::fs::read_to_string(own.join("cgroup.procs"))?;
    for pid in procs.split_whitespace() {
        // Processes that ended meanwhile, or are not ours to move, stay.
        let _ = write(&leaf, "cgroup.procs", pid);
    }
    write(own, "cgroup.subtree_control", ENABLE)
}

/// One VM's cgroup.
#[derive(Debug)]
pub struct VmCgroup {
    version: Version,
    /// Its own cgroups (removed with it).
    dirs: Vec<(Controller, PathBuf)>,
    /// The files by which it joins appliance cgroups as they are (v1 cpu).
    shared: Vec<PathBuf>,
    memory_mib: u64,
}

impl VmCgroup {
    /// The files by which the vmm joins its cgroups (`vmm --cgroup FILE`, one per
    /// hierarchy), writing 0 (itself) into each while it has one thread: v1's `tasks` (a
    /// thread moving itself skips the lock that makes a process's move wait for an RCU grace
    /// period: 10–15 ms per start on this host), v2's `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let file = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.procs",
        };
        self.dirs
            .iter()
            .map(|(_, d)| d.join(file))
            .chain(self.shared.iter().cloned())
            .collect()
    }

    /// Its memory limit, MiB.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    /// True when the kernel's OOM killer killed a process in it (its memory limit reached).
    pub fn oom_killed(&self) -> bool {
        let (dir, file) = match self.version {
            Version::V2 => (self.dir(Controller::All), "memory.events"),
            Version::V1 => (self.dir(Controller::Memory), "memory.oom_control"),
        };
        let Some(dir) = dir else { return false };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
            })
            .is_some_and(|n| n > 0)
    }

    fn dir(&self, c: Controller) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, d)| d.as_path())
    }

    /// Removes it, waiting briefly for the ended vmm's last task to leave it.
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    _ => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "9:name=systemd:/\n8:pids:/\n4:memory:/svc/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    fn fake_v1(root: &Path) {
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(root.join("memory/svc/abc")).unwrap();
        std::fs::create_dir_all(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.controllers"), "").unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-cgroup-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_hybrid_host_uses_v1_under_the_agents_own_cgroups() {
        let root = scratch("hybrid");
        fake_v1(&root);
        let (v, dirs) = detect(&root, HYBRID).unwrap();
        assert_eq!(v, Version::V1);
        assert_eq!(
            dirs,
            vec![
                (Controller::Cpu, root.join("cpu/")),
                (Controller::Memory, root.join("memory/svc/abc")),
                (Controller::Pids, root.join("pids/")),
            ]
        );
        // Writes land in the right files (plain files stand in for the kernel's).
        let limits = Limits {
            cpus: 2,
            memory_mib: 1024,
            max_vms: 4,
        };
        let c = Cgroups::setup_in(&root, &root.join("locks"), HYBRID, "a1", limits)
            .unwrap()
            .unwrap();
        let app = root.join("cpu/cloudlet-a1");
        assert_eq!(
            std::fs::read_to_string(app.join("cpu.cfs_quota_us")).unwrap(),
            "200000"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("memory/svc/abc/cloudlet-a1/memory.limit_in_bytes"))
                .unwrap(),
            ((1024 + 4 * VM_OVERHEAD_MIB) << 20).to_string()
        );
        let vm = c.vm("i-1", 256).unwrap();
        assert_eq!(
            vm.join_files(),
            [
                root.join("memory/svc/abc/cloudlet-a1/vm-i-1/tasks"),
                root.join("pids/cloudlet-a1/vm-i-1/tasks"),
                root.join("cpu/cloudlet-a1/tasks"),
            ]
        );
        assert!(!root.join("cpu/cloudlet-a1/vm-i-1").exists());
        assert_eq!(
            std::fs::read_to_string(
                root.join("memory/svc/abc/cloudlet-a1/vm-i-1/memory.limit_in_bytes")
            )
            .unwrap(),
            ((256 + VM_OVERHEAD_MIB) << 20).to_string()
        );
        assert!(!vm.oom_killed());
        std::fs::write(
            root.join("memory/svc/abc/cloudlet-a1/vm-i-1/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        assert!(vm.oom_killed());
        // Another agent's empty leftovers go, one with a VM inside stays; an agent whose
        // cgroup went makes it again.
        std::fs::create_dir_all(root.join("pids/cloudlet-old")).unwrap();
        // A live agent (it holds its lock) between VMs: its empty cgroup stays.
        std::fs::create_dir_all(root.join("pids/cloudlet-live")).unwrap();
        let live = nix::fcntl::Flock::lock(
            std::fs::File::create(root.join("locks/cloudlet-live.lock")).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        std::fs::create_dir_all(root.join("pids/cloudlet-busy/vm-i-9")).unwrap();
        let again = Cgroups::setup_in(&root, &root.join("locks"), HYBRID, "a2", limits)
            .unwrap()
            .unwrap();
        assert!(!root.join("pids/cloudlet-old").exists());
        assert!(root.join("pids/cloudlet-live").is_dir());
        drop(live);
        assert!(root.join("pids/cloudlet-busy/vm-i-9").exists());
        std::fs::remove_dir_all(root.join("pids/cloudlet-a2")).unwrap();
        assert!(again.vm("i-2", 64).is_some());
        assert!(root.join("pids/cloudlet-a2/vm-i-2").is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_unified_hierarchy_with_controllers_is_v2_and_none_is_none() {
        let root = scratch("v2");
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let (v, dirs) = detect(&root, "0::/agent.service\n").unwrap();
        assert_eq!(v, Version::V2);
        assert_eq!(dirs, vec![(Controller::All, root.join("agent.service"))]);
        std::fs::write(root.join("cgroup.controllers"), "cpu io\n").unwrap();
        assert!(detect(&root, "0::/x\n").is_none());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
