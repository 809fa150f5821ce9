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
//!
//! The manifest, `base.json` (pretty JSON, unknown fields refused; sizes in bytes):
//!
//! ```text
//! {
//!   "version": 1,                      manifest format version
//!   "id": "3f0c…(64 hex digits)",      content id (above)
//!   "mem_mib": 128,                    guest RAM in MiB
//!   "kernel_bytes": 1234567,           size of `kernel`
//!   "state_bytes": 11023,              size of `state`
//!   "memory_bytes": 134217728,         logical size of `memory` (mem_mib MiB)
//!   "memory_disk_bytes": 2502656,      bytes `memory` occupies on disk (sparse)
//!   "cmdline": "console=ttyS0 …",      kernel command line it was booted with
//!   "disk_bytes": 65536                size of `disk`; absent without a disk
//! }
//! ```

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
    #[error("base manifest '{0}' is invalid")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// The manifest is of another format version.
    #[error("base manifest '{0}' is version {1} (this build reads {MANIFEST_VERSION})")]
    Version(PathBuf, u32),
    /// The id is not an id.
    #[error("base manifest '{0}' is invalid: id is not 64 hex digits")]
    Id(PathBuf),
    /// A file of the base does not match its manifest.
    #[error("base '{0}' is damaged: {1}")]
    Mismatch(PathBuf, String),
    /// A file of the base cannot be inspected.
    #[error("base '{0}' is damaged: cannot inspect {1}")]
    Missing(PathBuf, &'static str, #[source] std::io::Error),
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
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| BaseError::Parse(path.clone(), e))?;
        if m.version != MANIFEST_VERSION {
            return Err(BaseError::Version(path, m.version));
        }
        if m.id.len() != 64 || !m.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BaseError::Id(path));
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
                Err(e) => return Err(BaseError::Missing(dir.to_owned(), name, e)),
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
                Err(e) => return Err(BaseError::Missing(dir.to_owned(), DISK, e)),
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

/// The content id of the base directory `dir` (see the module doc): SHA-256 over `kernel`,
/// `state`, `memory` and, when present, `disk`, each prefixed by its length (u64 LE).
pub fn content_id(dir: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let with_disk = dir.join(DISK).exists();
    for name in [KERNEL, STATE, MEMORY, DISK] {
        if name == DISK && !with_disk {
            continue;
        }
        let path = dir.join(name);
        let mut f = std::fs::File::open(&path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open '{}': {e}", path.display()))
        })?;
        h.update(f.metadata()?.len().to_le_bytes());
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().into())
}

/// Hex encoding of an id.
pub fn hex(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: 1,
            id: "0123456789abcdef".repeat(4),
            mem_mib: 1,
            kernel_bytes: 3,
            state_bytes: 2,
            memory_bytes: 1 << 20,
            memory_disk_bytes: 4096,
            cmdline: "console=ttyS0".into(),
            disk_bytes: None,
        }
    }

    #[test]
    fn golden_manifest() {
        let json = sample().to_json();
        let want = r#"{
  "version": 1,
  "id": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
  "mem_mib": 1,
  "kernel_bytes": 3,
  "state_bytes": 2,
  "memory_bytes": 1048576,
  "memory_disk_bytes": 4096,
  "cmdline": "console=ttyS0"
}
"#;
        assert_eq!(json, want);
        assert_eq!(
            sample().id_bytes()[..4],
            [0x01, 0x23, 0x45, 0x67],
            "the id's bytes are its hex digits in order"
        );
        assert_eq!(hex(&sample().id_bytes()), sample().id);
        let with_disk = Manifest {
            disk_bytes: Some(65536),
            ..sample()
        };
        assert!(with_disk
            .to_json()
            .ends_with("  \"disk_bytes\": 65536\n}\n"));
    }

    #[test]
    fn load_checks_the_files_against_the_manifest() {
        let dir = std::env::temp_dir().join(format!("format-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel"), b"abc").unwrap();
        std::fs::write(dir.join("state"), b"st").unwrap();
        let memory = std::fs::File::create(dir.join("memory")).unwrap();
        memory.set_len(1 << 20).unwrap();
        let write = |m: &Manifest| std::fs::write(dir.join(MANIFEST), m.to_json()).unwrap();
        write(&sample());
        assert_eq!(Manifest::load(&dir).unwrap(), sample());
        write(&Manifest {
            state_bytes: 5,
            ..sample()
        });
        assert!(matches!(Manifest::load(&dir), Err(BaseError::Mismatch(..))));
        write(&Manifest {
            disk_bytes: Some(4096),
            ..sample()
        });
        assert!(matches!(
            Manifest::load(&dir),
            Err(BaseError::Missing(_, DISK, _))
        ));
        write(&Manifest {
            version: 2,
            ..sample()
        });
        assert!(matches!(
            Manifest::load(&dir),
            Err(BaseError::Version(_, 2))
        ));
        write(&Manifest {
            id: "xyz".into(),
            ..sample()
        });
        assert!(matches!(Manifest::load(&dir), Err(BaseError::Id(_))));
        std::fs::write(dir.join(MANIFEST), "{").unwrap();
        assert!(matches!(Manifest::load(&dir), Err(BaseError::Parse(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
