//! The audit trail: who paired, who was revoked, by whom.
//!
//! Each event goes to the log (tracing target `audit`) and, as one JSON object per line, to
//! the append-only `DATA/audit.log` (mode 0600): `{"unix": 1760000000, "event":
//! "device.paired", ...fields}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// File name of the audit log in the data directory.
pub const AUDIT_FILE: &str = "audit.log";

/// The audit log of a data directory.
#[derive(Clone, Debug)]
pub struct Audit {
    path: PathBuf,
}

impl Audit {
    /// The audit log of the data directory `data`.
    pub fn in_dir(data: &Path) -> Audit {
        Audit {
            path: data.join(AUDIT_FILE),
        }
    }

    /// Where the log is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `event` with `fields` (an object; other values are recorded under `value`).
    /// A log that cannot be written is reported in the agent's log and does not fail the
    /// operation.
    pub fn record(&self, event: &str, fields: Value) {
        let mut m = Map::new();
        m.insert("unix".into(), crate::store::unix_now().into());
        m.insert("event".into(), event.into());
        match fields {
            Value::Object(f) => m.extend(f),
            Value::Null => {}
            v => {
                m.insert("value".into(), v);
            }
        }
        let line = Value::Object(m).to_string();
        tracing::info!(target: "audit", "{line}");
        if let Err(e) = self.append(&line) {
            tracing::error!(
                "cannot append to the audit log {}: {e}",
                self.path.display()
            );
        }
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        f.write_all(format!("{line}\n").as_bytes())
    }

    /// Every event recorded so far (lines that do not parse are skipped).
    pub fn events(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
