//! Two appliances on one machine: a pair of network namespaces joined by a veth pair, with
//! shaping on both ends (rate, delay, loss), a link that can be cut and restored, and
//! everything torn down on drop (also when a test panics). For the handoff tests and
//! `cargo xtask bench handoff`; needs root and iproute2.
//!
//! Shaping uses `tc netem` where the kernel has it. Where it does not (this project's hosts:
//! `CONFIG_NET_SCH_NETEM` is not set, `tc … netem` says "Specified qdisc kind is unknown"), a
//! rate alone is set with a token bucket (`tbf`) instead, which limits the same way on the
//! wire; a delay or a loss then cannot be simulated and [`Pair::shape`] refuses them
//! ([`Error::NoNetem`]) rather than silently ignoring them.
//!
//! ```text
//!   namespace clab<pid>n<k>a                 namespace clab<pid>n<k>b
//!  +-----------------------+                +-----------------------+
//!  | lo (up)               |                | lo (up)               |
//!  | veth0 10.77.0.1/24  ==netem=========netem==  veth0 10.77.0.2/24 |
//!  +-----------------------+                +-----------------------+
//! ```
//!
//! Both addresses exist only inside the namespaces (so every pair can use the same ones) and
//! no traffic leaves them. Names carry the creating process's id, so pairs of concurrent tests
//! and processes never collide, and a pair left behind by a killed process is recognised and
//! removed by the next [`Pair::new`].
//!
//! Code reaches a namespace in two ways: a child process started inside it
//! ([`Ns::command`]: `ip netns exec NAME …`), or a closure run on a thread that entered it
//! ([`Ns::run_in`]); sockets made there stay in that namespace wherever they are used later.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The address of end A (inside its namespace).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The address of end B (inside its namespace).
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of both addresses.
pub const PREFIX: u8 = 24;
/// The veth device's name in each namespace.
pub const DEV: &str = "veth0";
/// Prefix of the namespaces' names.
const PREFIX_NAME: &str = "clab";

/// What went wrong setting up or changing the lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command could not be started (iproute2 missing?).
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The kernel has no netem, which the shape's delay or loss needs.
    #[error("this kernel has no netem qdisc: a delay or a loss cannot be simulated ({0:?})")]
    NoNetem(Shape),
    /// A thread could not enter a namespace.
    #[error("cannot enter network namespace {ns}")]
    Enter {
        /// The namespace.
        ns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Runs `program args…` and fails with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How a link is shaped, in each direction (netem on both ends' egress).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    /// Rate in kbit/s (0: unlimited).
    pub rate_kbit: u64,
    /// One-way delay.
    pub delay: Duration,
    /// Random loss, percent.
    pub loss_pct: f64,
}

impl Shape {
    /// A link of `mbit` Mbit/s, no delay, no loss.
    pub fn mbit(mbit: u64) -> Self {
        Shape {
            rate_kbit: mbit * 1000,
            delay: Duration::ZERO,
            loss_pct: 0.0,
        }
    }

    /// The same with a one-way `delay`.
    pub fn delay(self, delay: Duration) -> Self {
        Shape { delay, ..self }
    }

    /// The same with `pct` % random loss.
    pub fn loss(self, pct: f64) -> Self {
        Shape {
            loss_pct: pct,
            ..self
        }
    }

    /// The tbf arguments (after `tbf`) for the rate alone: a bucket of 10 ms at the rate
    /// (at least 16 KiB: room for the largest GSO segment's MTU pieces) and up to 100 ms of
    /// queue, as a link's buffer would hold.
    fn tbf_args(&self) -> Vec<String> {
        let bytes_per_s = self.rate_kbit * 1000 / 8;
        let burst = (bytes_per_s / 100).max(16 << 10);
        vec![
            "rate".into(),
            format!("{}kbit", self.rate_kbit),
            "burst".into(),
            burst.to_string(),
            "latency".into(),
            "100ms".into(),
        ]
    }

    /// The netem arguments (after `netem`).
    fn netem_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.rate_kbit > 0 {
            a.extend(["rate".into(), format!("{}kbit", self.rate_kbit)]);
        }
        a.extend(["delay".into(), format!("{}us", self.delay.as_micros())]);
        a.extend(["loss".into(), format!("{}%", self.loss_pct)]);
        // Room for a few hundred ms of queue at the top rates (netem's default is 1000).
        a.extend(["limit".into(), "10000".into()]);
        a
    }
}

/// One end: a network namespace holding `veth0` with its address.
#[derive(Debug)]
pub struct Ns {
    name: String,
    addr: Ipv4Addr,
}

impl Ns {
    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This end's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// A command that runs `program` inside this namespace (`ip netns exec NAME program`);
    /// add arguments and spawn it as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that entered this namespace and returns its result; sockets `f`
    /// makes belong to the namespace. A panic in `f` is passed on.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        let enter = || -> io::Result<()> {
            let file = File::open(format!("/run/netns/{}", self.name))?;
            // SAFETY: setns(2) on a descriptor we hold open; it changes only the calling
            // thread's network namespace (a thread of our own, ending with this scope).
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        std::thread::scope(|s| {
            let t = s.spawn(|| enter().map(|()| f()));
            match t.join() {
                Ok(r) => r.map_err(|source| Error::Enter {
                    ns: self.name.clone(),
                    source,
                }),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A TCP listener on this end's address and `port` (0: any free port).
    pub fn listen(&self, port: u16) -> Result<TcpListener, Error> {
        let addr = SocketAddr::from((self.addr, port));
        self.run_in(|| TcpListener::bind(addr))?
            .map_err(|source| Error::Enter {
                ns: self.name.clone(),
                source,
            })
    }

    /// A TCP connection from this namespace to `to`, giving up after `timeout`.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run_in(|| TcpStream::connect_timeout(&to, timeout))
            .map_err(io::Error::other)?
    }

    /// Bytes this end's veth has sent and received so far, from its counters: Ethernet
    /// frames as the kernel hands them over, so a segmentation-offloaded frame (up to 64 KiB
    /// of TCP payload) counts its headers once. Bytes still queued by the shaping are not
    /// sent yet.
    pub fn link_bytes(&self) -> Result<(u64, u64), Error> {
        let out = run("ip", &["-n", &self.name, "-s", "-j", "link", "show", DEV])?;
        let field = |dir: &str| -> Option<u64> {
            let at = out.find(&format!("\"{dir}\":{{"))?;
            let rest = &out[at..];
            let b = rest.find("\"bytes\":")? + "\"bytes\":".len();
            let digits: String = rest[b..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        match (field("tx"), field("rx")) {
            (Some(tx), Some(rx)) => Ok((tx, rx)),
            _ => Err(Error::Failed {
                cmd: format!("ip -n {} -s -j link show {DEV}", self.name),
                stderr: format!("no byte counters in {out:?}"),
            }),
        }
    }

    /// The ids of the processes inside this namespace.
    pub fn pids(&self) -> Vec<u32> {
        run("ip", &["netns", "pids", &self.name])
            .map(|out| {
                out.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Which end of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// End A (10.77.0.1).
    A,
    /// End B (10.77.0.2).
    B,
}

/// Two namespaces joined by a veth pair; dropped, it kills the processes left inside them and
/// deletes both (the veth pair goes with them).
#[derive(Debug)]
pub struct Pair {
    a: Ns,
    b: Ns,
}

/// Pairs made by this process so far (for unique names).
static MADE: AtomicU32 = AtomicU32::new(0);

impl Pair {
    /// Creates the two namespaces, the veth pair between them with its addresses, and brings
    /// every link up (loopback too); no shaping yet ([`Pair::shape`]). Removes pairs left by
    /// processes that no longer run first.
    pub fn new() -> Result<Pair, Error> {
        remove_stale();
        let k = MADE.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX_NAME}{}n{k}", std::process::id());
        let pair = Pair {
            a: Ns {
                name: format!("{base}a"),
                addr: ADDR_A,
            },
            b: Ns {
                name: format!("{base}b"),
                addr: ADDR_B,
            },
        };
        // From here on a failure drops `pair`, which removes whatever was made.
        for ns in [&pair.a, &pair.b] {
            run("ip", &["netns", "add", &ns.name])?;
        }
        run(
            "ip",
            &[
                "-n",
                &pair.a.name,
                "link",
                "add",
                DEV,
                "type",
                "veth",
                "peer",
                "name",
                DEV,
                "netns",
                &pair.b.name,
            ],
        )?;
        for ns in [&pair.a, &pair.b] {
            let cidr = format!("{}/{PREFIX}", ns.addr);
            run("ip", &["-n", &ns.name, "addr", "add", &cidr, "dev", DEV])?;
            run("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &ns.name, "link", "set", DEV, "up"])?;
        }
        Ok(pair)
    }

    /// End A.
    pub fn a(&self) -> &Ns {
        &self.a
    }

    /// End B.
    pub fn b(&self) -> &Ns {
        &self.b
    }

    /// The given end.
    pub fn side(&self, side: Side) -> &Ns {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// Shapes both directions with `shape` (replacing any shaping, also while traffic
    /// flows): netem, or without it a token bucket for the rate alone (see the module's
    /// doc).
    pub fn shape(&self, shape: Shape) -> Result<(), Error> {
        for ns in [&self.a, &self.b] {
            let netem = shape.netem_args();
            let mut args = vec![
                "-n", &ns.name, "qdisc", "replace", "dev", DEV, "root", "netem",
            ];
            args.extend(netem.iter().map(String::as_str));
            match run("tc", &args) {
                Ok(_) => {}
                Err(Error::Failed { stderr, .. }) if stderr.contains("qdisc kind is unknown") => {
                    if shape.delay > Duration::ZERO || shape.loss_pct > 0.0 {
                        return Err(Error::NoNetem(shape));
                    }
                    if shape.rate_kbit == 0 {
                        let _ = run("tc", &["-n", &ns.name, "qdisc", "del", "dev", DEV, "root"]);
                        continue;
                    }
                    let tbf = shape.tbf_args();
                    let mut args = vec![
                        "-n", &ns.name, "qdisc", "replace", "dev", DEV, "root", "tbf",
                    ];
                    args.extend(tbf.iter().map(String::as_str));
                    run("tc", &args)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the kernel has netem (so [`Shape`]'s delay and loss can be simulated).
    pub fn has_netem(&self) -> bool {
        let ok = run(
            "tc",
            &[
                "-n",
                &self.a.name,
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
            ],
        )
        .is_ok();
        if ok {
            let _ = run(
                "tc",
                &["-n", &self.a.name, "qdisc", "del", "dev", "lo", "root"],
            );
        }
        ok
    }

    /// Removes the shaping (the veth's default queue again).
    pub fn unshape(&self) -> Result<(), Error> {
        for ns in [&self.a, &self.b] {
            // Deleting a root qdisc that is not there fails; that is fine here.
            let _ = run("tc", &["-n", &ns.name, "qdisc", "del", "dev", DEV, "root"]);
        }
        Ok(())
    }

    /// Cuts the link: both ends down (their routes go with them, so sends fail or stall).
    pub fn link_down(&self) -> Result<(), Error> {
        self.set_link("down")
    }

    /// Restores the link (addresses, routes and shaping are kept).
    pub fn link_up(&self) -> Result<(), Error> {
        self.set_link("up")
    }

    fn set_link(&self, state: &str) -> Result<(), Error> {
        for ns in [&self.a, &self.b] {
            run("ip", &["-n", &ns.name, "link", "set", DEV, state])?;
        }
        Ok(())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            remove(&ns.name);
        }
    }
}

/// Kills the processes inside namespace `name` (started there by whoever made it) and
/// deletes it; quietly does nothing for a namespace that is not there.
fn remove(name: &str) {
    let pids = run("ip", &["netns", "pids", name]).unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) has no memory effects; the pid was listed as inside our namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = run("ip", &["netns", "del", name]);
}

/// The namespaces of pairs whose creating process no longer runs (killed before its `Drop`).
pub fn stale() -> Vec<String> {
    let list = run("ip", &["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            name.strip_prefix(PREFIX_NAME)
                .and_then(|rest| rest.split_once('n'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(str::to_string)
        .collect()
}

/// Removes what [`stale`] finds.
pub fn remove_stale() {
    for name in stale() {
        remove(&name);
    }
}

/// Whether the namespace `name` exists.
pub fn exists(name: &str) -> bool {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_arguments() {
        let s = Shape::mbit(25).delay(Duration::from_millis(5)).loss(0.5);
        assert_eq!(
            s.netem_args().join(" "),
            "rate 25000kbit delay 5000us loss 0.5% limit 10000"
        );
        let unlimited = Shape {
            rate_kbit: 0,
            ..Shape::mbit(1)
        };
        assert_eq!(
            unlimited.netem_args().join(" "),
            "delay 0us loss 0% limit 10000"
        );
        assert_eq!(
            Shape::mbit(25).tbf_args().join(" "),
            "rate 25000kbit burst 31250 latency 100ms"
        );
        assert_eq!(
            Shape::mbit(1).tbf_args().join(" "),
            "rate 1000kbit burst 16384 latency 100ms"
        );
    }
}
