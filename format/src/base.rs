//! A base image: a directory that a cloudlet keeps and many service VMs start from.
//!
//! ```text
//! BASE/
//!   base.json   manifest (below), human-readable
//!   kernel      the guest kernel the snapshot was booted from
//!   state       machine state at the ready point (vmm state file)
//!   memory      guest RAM at the ready point, sparse; mapped MAP_PRIVATE by every VM
//!   disk        optional: the root disk, raw, whole 4 KiB blocks; opened read-only by every
//!               VM, whose writes go to its own copy-on-write δ
//! ```
//!
//! The id is the SHA-256 of `kernel`, `state`, `memory` and, when present, `disk` (in that
//! order, each prefixed by its length as u64 LE), hex-encoded. An overlay names the id of the base it applies to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Manifest file name.
pub const MANIFEST: &str = "base.json";
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// Errors reading a base.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The manifest cannot be read.
    #[error("cannot read the base manifest '{0}'")]
    Read(PathBuf, #[source] std::io::Error),
    /// The manifest does not parse.
    #[error("base manifest '{0}' is invalid: {1}")]
    Parse(PathBuf, String),
    /// A file of the base does not match its manifest.
    #[error("base '{0}' is damaged: {1}")]
    Mismatch(PathBuf, String),
}

/// `base.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version.
    pub version: u32,
    /// Content id: hex SHA-256 (see the module doc).
    pub id: String,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Bytes of `kernel`.
    pub kernel_bytes: u64,
    /// Bytes of `state`.
    pub state_bytes: u64,
    /// Logical bytes of `memory` (= mem_mib MiB).
    pub memory_bytes: u64,
    /// Bytes `memory` occupies on disk (it is sparse).
    pub memory_disk_bytes: u64,
    /// Kernel command line it was booted with.
    pub cmdline: String,
    /// Bytes of `disk`, when the base has a root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
}

/// The root disk file of a base directory.
pub const DISK: &str = "disk";
/// The guest kernel file of a base directory.
pub const KERNEL: &str = "kernel";
/// The machine state file (a state file of kind `Machine`) of a base, and of a vmm snapshot
/// directory (a base is a snapshot plus its kernel, disk and manifest).
pub const STATE: &str = "state";
/// The guest RAM image of a base, and of a vmm snapshot directory.
pub const MEMORY: &str = "memory";

impl Manifest {
    /// Reads and checks `BASE/base.json` against the files beside it (sizes only; the id is
    /// recomputed by `image-builder verify`).
    pub fn load(dir: &Path) -> Result<Self, BaseError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| BaseError::Read(path.clone(), e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| BaseError::Parse(path.clone(), e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(BaseError::Parse(
                path,
                format!(
                    "version {} (this build reads {MANIFEST_VERSION})",
                    m.version
                ),
            ));
        }
        if m.id.len() != 64 || !m.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BaseError::Parse(path, "id is not 64 hex digits".into()));
        }
        let size = |name: &str| std::fs::metadata(dir.join(name)).map(|md| md.len());
        for (name, want) in [
            ("kernel", m.kernel_bytes),
            ("state", m.state_bytes),
            ("memory", m.memory_bytes),
        ] {
            match size(name) {
                Ok(n) if n == want => {}
                Ok(n) => {
                    return Err(BaseError::Mismatch(
                        dir.to_owned(),
                        format!("{name} is {n} bytes, the manifest says {want}"),
                    ))
                }
                Err(e) => return Err(BaseError::Mismatch(dir.to_owned(), format!("{name}: {e}"))),
            }
        }
        if let Some(want) = m.disk_bytes {
            match size(DISK) {
                Ok(n) if n == want && n % 4096 == 0 => {}
                Ok(n) => {
                    return Err(BaseError::Mismatch(
                        dir.to_owned(),
                        format!("disk is {n} bytes, the manifest says {want} (whole 4 KiB blocks)"),
                    ))
                }
                Err(e) => return Err(BaseError::Mismatch(dir.to_owned(), format!("disk: {e}"))),
            }
        }
        if m.memory_bytes != m.mem_mib << 20 {
            return Err(BaseError::Mismatch(
                dir.to_owned(),
                "memory size disagrees with mem_mib".into(),
            ));
        }
        Ok(m)
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a flat struct serialises");
        s.push('\n');
        s
    }

    /// The id as 32 bytes.
    pub fn id_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.id[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        out
    }
}

/// Hex encoding of an id.
pub fn hex(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
