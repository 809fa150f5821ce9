//! Step 3 of `cargo xtask image`: the update artifact of a board (`format::update`): slot A's
//! root filesystem, kernel and initrd, zstd-compressed with their SHA-256, and the artifact's
//! own SHA-256 beside it (`sha256sum -c` format) for the vendor's download page.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use format::update::PartKind;
use sha2::Digest;

/// An artifact written.
pub struct Artifact {
    /// The `.cup` file.
    pub path: PathBuf,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Its size, bytes.
    pub bytes: u64,
}

/// Writes `out/cloudlet-BOARD-GENERATION.cup` (and `.cup.sha256`) from a root filesystem,
/// kernel and initrd.
pub fn write(
    out: &Path,
    board: &str,
    generation: u64,
    version: &str,
    root_fs: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<Artifact> {
    let path = out.join(format!("cloudlet-{board}-{generation}.cup"));
    let part = path.with_extension("cup.part");
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    {
        let f = std::fs::File::create(&part)
            .with_context(|| format!("cannot create {}", part.display()))?;
        let mut w = std::io::BufWriter::new(f);
        format::update::write_artifact(
            &mut w,
            board,
            generation,
            version,
            created,
            &[
                (PartKind::Root, root_fs),
                (PartKind::Kernel, kernel),
                (PartKind::Initrd, initrd),
            ],
        )
        .context("cannot write the update artifact")?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&part, &path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(&path)?, &mut h)?;
    let sha256: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    std::fs::write(
        path.with_extension("cup.sha256"),
        format!("{sha256}  {name}\n"),
    )?;
    let bytes = std::fs::metadata(&path)?.len();
    Ok(Artifact {
        path,
        sha256,
        bytes,
    })
}
