//! Driving a guest through its serial console: the VM writes its console to a file, we feed
//! its input and wait for reply lines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use vmm::machine::Machine;

/// A guest console: the log file the VM writes and how many lines were consumed.
pub struct Console {
    log: PathBuf,
    seen: usize,
}

impl Console {
    /// Watches `log` (written by the VM's serial port).
    pub fn new(log: &Path) -> Self {
        Console {
            log: log.to_owned(),
            seen: 0,
        }
    }

    /// Waits up to `timeout` for a new line starting with one of `prefixes`; lines before it
    /// are skipped. Fails early when the VM stopped.
    pub fn wait_line(
        &mut self,
        m: &Machine,
        prefixes: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let complete =
                text.lines().count() - usize::from(!text.ends_with('\n') && !text.is_empty());
            for (n, line) in text.lines().enumerate().take(complete).skip(self.seen) {
                self.seen = n + 1;
                if prefixes.iter().any(|p| line.starts_with(p)) {
                    return Ok(line.to_string());
                }
            }
            if let Some(reason) = m.exit_reason() {
                bail!(
                    "the guest stopped ({reason:?}); its console said:\n{}",
                    tail(&text)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {prefixes:?} line from the guest within {timeout:?}; its console said:\n{}",
                    tail(&text)
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends one command line and waits for its `ok`/`err` reply; an `err` is an error.
    pub fn command(&mut self, m: &Machine, cmd: &str, timeout: Duration) -> Result<String> {
        let line = format!("{cmd}\n");
        let mut sent = 0;
        let deadline = Instant::now() + timeout;
        while sent < line.len() {
            sent += m.serial_input(&line.as_bytes()[sent..]);
            if sent < line.len() {
                if Instant::now() >= deadline {
                    bail!("the guest does not read its console");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let reply = self.wait_line(m, &["ok ", "err "], timeout)?;
        if reply.starts_with("err ") {
            bail!("the guest refused '{cmd}': {reply}");
        }
        Ok(reply)
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
