//! Shared RAM images: a service's base memory with its overlay applied, written once beside
//! the overlay (`format::ram_image`), then mapped `MAP_PRIVATE` by every synthesis of that
//! service. Instances then share the image's clean pages through the page cache, the δ
//! included (decompressed once, not once per instance), and a synthesis applies nothing: it
//! maps the image, restores and runs. An image whose id does not match the base and the
//! overlay file as they are now is ignored (the overlay is then applied as usual).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use format::ram_image::{self, RamImageId};

use super::check::{self, CheckError, Checked};
use super::eager::{self, EagerError};

/// Errors while writing a RAM image.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Base or overlay refused.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// Applying the overlay failed (a damaged chunk, …).
    #[error("failed to apply the overlay")]
    Apply(#[from] EagerError),
    /// The overlay was read from memory, not a file: it has no identity to record.
    #[error("the overlay has no file identity")]
    NoIdentity,
    /// Writing the image failed.
    #[error("cannot write the RAM image")]
    Image(#[source] crate::snapshot::SnapshotError),
    /// Writing the image or its id failed.
    #[error("cannot write the RAM image '{0}'")]
    Write(PathBuf, #[source] std::io::Error),
}

/// What writing an image did.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    /// Guest RAM, bytes (the image's length).
    pub ram_bytes: u64,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
    /// The whole job.
    pub took: Duration,
    /// The image there was up to date: nothing was written.
    pub up_to_date: bool,
}

/// The id an image for this base and overlay must carry.
fn expected_id(checked: &Checked) -> Option<RamImageId> {
    Some(RamImageId {
        base_id: checked.manifest.id_bytes(),
        overlay: checked.overlay.identity()?,
        ram_bytes: checked.manifest.mem_mib << 20,
    })
}

/// The RAM image of `overlay` (checked as `checked`), when one made from this base and this
/// very overlay file is there, complete.
pub fn find(overlay: &Path, checked: &Checked) -> Option<PathBuf> {
    let want = expected_id(checked)?;
    if ram_image::read_id(overlay)? != want {
        return None;
    }
    let image = ram_image::image_path(overlay);
    let len = std::fs::metadata(&image).ok()?.len();
    (len == want.ram_bytes).then_some(image)
}

/// Writes the RAM image of `base` + `overlay` beside the overlay (every chunk checked as it
/// is applied, on `threads` threads), then its id; each renamed into place, so readers see
/// the old state or the new one, never a part. An image already up to date is kept unless
/// `force`.
pub fn write(
    base: &Path,
    overlay: &Path,
    threads: usize,
    force: bool,
) -> Result<Written, SharedError> {
    let t0 = Instant::now();
    let checked = check::check(base, overlay)?;
    let id = expected_id(&checked).ok_or(SharedError::NoIdentity)?;
    if !force && find(overlay, &checked).is_some() {
        return Ok(Written {
            ram_bytes: id.ram_bytes,
            data_bytes: 0,
            took: t0.elapsed(),
            up_to_date: true,
        });
    }
    let m = eager::materialise(base, &checked, threads)?;
    let image = ram_image::image_path(overlay);
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |e| SharedError::Write(p, e)
    };
    let tmp = with_suffix(&image, &format!(".{}.tmp", std::process::id()));
    // The image has the layout of a snapshot's memory file: regions back to back, sparse.
    let data_bytes = crate::snapshot::save::write_memory(&m.memory, &tmp)
        .map_err(SharedError::Image)
        .and_then(|d| {
            std::fs::rename(&tmp, &image).map_err(werr(&image))?;
            Ok(d)
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    let id_path = ram_image::id_path(overlay);
    let id_tmp = with_suffix(&id_path, &format!(".{}.tmp", std::process::id()));
    std::fs::write(&id_tmp, id.to_bytes())
        .and_then(|_| File::open(&id_tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&id_tmp, &id_path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&id_tmp);
            werr(&id_path)(e)
        })?;
    // Every chunk passed its check on the way in: say so beside the overlay, since jailed
    // syntheses (which see the overlay's directory read-only) cannot record it themselves.
    checked.overlay.record_verified();
    Ok(Written {
        ram_bytes: id.ram_bytes,
        data_bytes,
        took: t0.elapsed(),
        up_to_date: false,
    })
}

/// `p` with `suffix` appended to its file name.
fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}
