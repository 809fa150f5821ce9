//! Building cloudlet images: base images (a guest booted to its ready point and snapshotted)
//! and application overlays (the δ between a base and the same guest customised).
//!
//! `image-builder base` and `image-builder overlay` are thin wrappers around [`base::build`],
//! [`overlay::from_snapshot`] and [`overlay::from_script`].

pub mod base;
pub mod console;
pub mod overlay;
