//! The first step of synthesis: base and overlay read and checked against each other (header,
//! index, page numbers, chunk bounds, base id, machine state) before any VM exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use format::base::Manifest;
use format::overlay::Overlay;
use format::state::{self, Kind};

use crate::snapshot::state::MachineState;

/// Why a base and an overlay were refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The base is unusable.
    #[error(transparent)]
    Base(#[from] format::base::BaseError),
    /// The overlay is unusable.
    #[error(transparent)]
    Overlay(#[from] format::overlay::OverlayError),
    /// The overlay's machine state is unusable.
    #[error("the overlay's machine state is unusable")]
    State(#[source] state::StateError),
    /// Base and overlay disagree.
    #[error("overlay '{0}' does not fit base '{1}': {2}")]
    Mismatch(PathBuf, PathBuf, String),
}

/// A checked base + overlay, with the decoded machine state.
pub struct Checked {
    /// The base manifest.
    pub manifest: Manifest,
    /// The overlay.
    pub overlay: Arc<Overlay>,
    /// Machine state of the customised VM.
    pub state: MachineState,
}

/// Checks `base` and `overlay` against each other without touching any VM.
pub fn check(base: &Path, overlay: &Path) -> Result<Checked, CheckError> {
    let manifest = Manifest::load(base)?;
    let ov = Overlay::open(overlay)?;
    ov.check_base(&manifest.id_bytes())?;
    let mismatch = |why: String| CheckError::Mismatch(overlay.to_owned(), base.to_owned(), why);
    let pages = manifest.mem_mib << 8;
    if ov.index().mem_pages != pages {
        return Err(mismatch(format!(
            "it describes {} pages, the base has {pages}",
            ov.index().mem_pages
        )));
    }
    if ov.index().disk_bytes != manifest.disk_bytes.unwrap_or(0) {
        return Err(mismatch(format!(
            "its disk δ is for a {}-byte disk, the base's disk has {} bytes",
            ov.index().disk_bytes,
            manifest.disk_bytes.unwrap_or(0)
        )));
    }
    let state: MachineState =
        state::decode(Kind::Machine, &ov.index().state).map_err(CheckError::State)?;
    if state.mem_mib != manifest.mem_mib {
        return Err(mismatch(format!(
            "its VM state has {} MiB of RAM, the base {}",
            state.mem_mib, manifest.mem_mib
        )));
    }
    Ok(Checked {
        manifest,
        overlay: Arc::new(ov),
        state,
    })
}
