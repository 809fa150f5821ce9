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

    /// The last `n` events, newest first, read from the end of the log (at most its last
    /// `n` KiB: a line is well under 1 KiB), so the cost does not grow with
    /// the log.
    pub fn recent(&self, n: usize) -> Vec<Value> {
        use std::io::{Read, Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let window = (n as u64).saturating_mul(1024).max(4096);
        let from = len.saturating_sub(window);
        let mut text = String::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_string(&mut text).is_err() {
            return Vec::new();
        }
        // A window that starts mid-line drops that partial first line.
        let body = if from > 0 {
            text.split_once('\n').map_or("", |(_, rest)| rest)
        } else {
            &text
        };
        body.lines()
            .rev()
            .filter_map(|l| serde_json::from_str(l).ok())
            .take(n)
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_events_come_from_the_end_newest_first() {
        let d = std::env::temp_dir().join(format!("agent-audit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let a = Audit::in_dir(&d);
        assert!(a.recent(5).is_empty());
        for i in 0..3000u32 {
            a.record(
                "instance.started",
                serde_json::json!({"n": i, "pad": "x".repeat(200)}),
            );
        }
        let r = a.recent(3);
        let ns: Vec<u64> = r.iter().map(|e| e["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, [2999, 2998, 2997]);
        assert_eq!(a.recent(1000).len(), 1000);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
