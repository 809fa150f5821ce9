//! A benchmarked child process: stdin piped, stdout lines delivered on a channel with the
//! instant each arrived (so a measurement is not delayed by the reader).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running child.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stdout lines, with arrival times.
    pub lines: Receiver<(String, Instant)>,
}

impl Proc {
    /// Starts `cmd` with stdin and stdout piped, stderr discarded.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        Proc::spawn_by(cmd, |c| c.spawn())
    }

    /// As [`Proc::spawn`], the process born as pid 1 of a pid namespace of its own, as the
    /// agent starts a jailed vmm (`agent::jail::spawn_in_namespaces`).
    pub fn spawn_in_namespaces(cmd: &mut Command) -> Result<Self> {
        Proc::spawn_by(cmd, |c| agent::jail::spawn_in_namespaces(|| c.spawn()))
    }

    fn spawn_by(
        cmd: &mut Command,
        start: impl FnOnce(&mut Command) -> std::io::Result<Child>,
    ) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = start(cmd).with_context(|| format!("failed to start {cmd:?}"))?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send((l, Instant::now())).is_err() {
                    break;
                }
            }
        });
        Ok(Proc { child, lines: rx })
    }

    /// Writes to the child's stdin (ignoring a child that has gone).
    pub fn send(&mut self, text: &str) {
        if let Some(i) = self.child.stdin.as_mut() {
            let _ = i.write_all(text.as_bytes());
            let _ = i.flush();
        }
    }

    /// Waits up to `timeout` for a line satisfying `pred`; returns it and when it arrived.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((l, at)) if pred(&l) => return Ok((l, at)),
                Ok(_) => {}
                Err(_) => bail!("no expected line within {timeout:?}"),
            }
        }
    }

    /// Sends `stop` (e.g. a power-off request) and waits up to 5 s for the exit; kills after.
    pub fn stop(mut self, stop: &str) {
        self.send(stop);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.kill();
    }

    /// Kills the child and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
