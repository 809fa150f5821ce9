//! A minimal QMP client (QEMU's machine protocol over a Unix socket: one JSON object per
//! line), for the benchmarks that drive QEMU: migration files (synthesis) and live migration
//! (handoff).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long to wait for the socket to appear and for each reply.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One QMP connection, past the capabilities negotiation.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (waiting for QEMU to create it).
    pub fn connect(path: &Path) -> Result<Self> {
        let deadline = Instant::now() + TIMEOUT;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).context("QMP socket"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.read()?; // greeting
        q.exec(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("QMP said {line:?}"))
    }

    /// Sends a command and returns its `return` (events in between are skipped).
    pub fn exec(&mut self, cmd: &str) -> Result<serde_json::Value> {
        self.w.write_all(cmd.as_bytes())?;
        self.w.write_all(b"\n")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd} failed: {e}");
            }
        }
    }
}
