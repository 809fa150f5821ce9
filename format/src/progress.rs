//! The progress stream of a long build (`image-builder overlay --progress json`): what a
//! supervisor (the agent) reads from the builder's standard output instead of its logs.
//!
//! ```text
//! one JSON object per line, UTF-8, '\n'-terminated; every line carries the version:
//!
//!   {"v":1,"step":"file","index":1,"total":1,"path":"/dev/vda@568","bytes":8}  placed on its disk
//!   {"v":1,"step":"restore"}                                        the base is being restored
//!   {"v":1,"step":"command","index":1,"total":3,"line":"load 16","reply":"ok loaded 16"}
//!   {"v":1,"step":"snapshot"}                                       the customised guest is saved
//!   {"v":1,"step":"diff"}                                           δ against the base, compressed
//!   {"v":1,"step":"done","bytes":1234567,"pages":250}               the overlay is written
//!   {"v":1,"step":"failed","error":"the guest refused 'x': err …"}  nothing usable was written
//! ```
//!
//! A reader skips lines that are not JSON (and says so) and refuses another version; the
//! stream ends with exactly one `done` or `failed` (a builder that dies without one failed).

use serde::{Deserialize, Serialize};

/// The version every line carries.
pub const PROGRESS_VERSION: u32 = 1;

/// One step of a build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// File `index` of `total` (1-based) was placed on the guest's disk (before the restore).
    File {
        /// 1-based.
        index: u32,
        /// Files placed.
        total: u32,
        /// Where (`format::disk_file`).
        path: String,
        /// Its length.
        bytes: u64,
    },
    /// The base is being restored.
    Restore,
    /// Console command `index` of `total` (1-based) ran: its line and the guest's reply.
    Command {
        /// 1-based.
        index: u32,
        /// Commands in the script.
        total: u32,
        /// The line sent.
        line: String,
        /// The guest's reply.
        reply: String,
    },
    /// The customised guest is being snapshotted.
    Snapshot,
    /// The δ against the base is being computed and compressed.
    Diff,
    /// The overlay is written: its size and the guest pages it carries.
    Done {
        /// Bytes of the overlay file.
        bytes: u64,
        /// Guest pages stored as data.
        pages: u64,
    },
    /// The build failed; nothing usable was written.
    Failed {
        /// What failed, with its causes.
        error: String,
    },
}

/// A line of the stream: the version and the step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// [`PROGRESS_VERSION`].
    pub v: u32,
    /// The step.
    #[serde(flatten)]
    pub step: Step,
}

/// Errors reading a line.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// Not a progress line.
    #[error("not a progress line: {0}")]
    Parse(#[source] serde_json::Error),
    /// Another version of the stream.
    #[error("progress stream version {0}, this reader knows {PROGRESS_VERSION}")]
    Version(u32),
}

impl Step {
    /// The line of this step (with its `\n`).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(&Line {
            v: PROGRESS_VERSION,
            step: self.clone(),
        })
        .expect("a progress step serialises");
        s.push('\n');
        s
    }

    /// Parses one line of the stream.
    pub fn parse(line: &str) -> Result<Step, ProgressError> {
        #[derive(Deserialize)]
        struct V {
            v: u32,
        }
        let v: V = serde_json::from_str(line).map_err(ProgressError::Parse)?;
        if v.v != PROGRESS_VERSION {
            return Err(ProgressError::Version(v.v));
        }
        let l: Line = serde_json::from_str(line).map_err(ProgressError::Parse)?;
        Ok(l.step)
    }

    /// Whether the stream ends with this step.
    pub fn is_last(&self) -> bool {
        matches!(self, Step::Done { .. } | Step::Failed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_lines() {
        let cases = [
            (Step::Restore, r#"{"v":1,"step":"restore"}"#),
            (
                Step::Command {
                    index: 1,
                    total: 2,
                    line: "load 16".into(),
                    reply: "ok loaded".into(),
                },
                r#"{"v":1,"step":"command","index":1,"total":2,"line":"load 16","reply":"ok loaded"}"#,
            ),
            (
                Step::File {
                    index: 1,
                    total: 1,
                    path: "/dev/vda@568".into(),
                    bytes: 8,
                },
                r#"{"v":1,"step":"file","index":1,"total":1,"path":"/dev/vda@568","bytes":8}"#,
            ),
            (Step::Snapshot, r#"{"v":1,"step":"snapshot"}"#),
            (Step::Diff, r#"{"v":1,"step":"diff"}"#),
            (
                Step::Done {
                    bytes: 10,
                    pages: 2,
                },
                r#"{"v":1,"step":"done","bytes":10,"pages":2}"#,
            ),
            (
                Step::Failed { error: "x".into() },
                r#"{"v":1,"step":"failed","error":"x"}"#,
            ),
        ];
        for (step, want) in cases {
            assert_eq!(step.to_line(), format!("{want}\n"));
            assert_eq!(Step::parse(want).unwrap(), step);
        }
    }

    #[test]
    fn other_versions_and_junk_are_refused() {
        assert!(matches!(
            Step::parse(r#"{"v":2,"step":"restore"}"#),
            Err(ProgressError::Version(2))
        ));
        for junk in ["", "restore", "{}", r#"{"v":1,"step":"fly"}"#, r#"{"v":1}"#] {
            assert!(Step::parse(junk).is_err(), "{junk}");
        }
        assert!(Step::Failed { error: "e".into() }.is_last());
        assert!(!Step::Diff.is_last());
    }
}
