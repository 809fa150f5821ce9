//! Building cloudlet images: base images (a guest booted to its ready point and snapshotted)
//! and application overlays (the δ between a base and the same guest customised).
//!
//! `image-builder base`, `overlay` and `import` are thin wrappers around [`base::build`],
//! [`overlay::from_snapshot`], [`overlay::from_script`] and [`import::import`] (an existing
//! qcow2 or raw disk made into a base's disk).

pub mod base;
pub mod console;
pub mod import;
pub mod overlay;
