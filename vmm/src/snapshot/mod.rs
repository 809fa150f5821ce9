//! Machine snapshots: a directory with
//!
//! - `state`: a state file ([`format::state`], kind `Machine`) holding [`MachineState`];
//! - `memory`: guest RAM, regions back to back (region i at the sum of the sizes before it),
//!   written sparsely — all-zero 4 KiB pages are holes — and mapped `MAP_PRIVATE` on restore,
//!   so VMs restored from one snapshot share its clean pages through the page cache.
//! - `disk.delta`: with a disk, the blocks the guest wrote (a δ file).
//!
//! [`save`] writes one from a running machine (`Machine::snapshot`);
//! [`restore`] reads and checks one and rebuilds devices and vCPUs from it (for a snapshot
//! directory, and for synthesis from a base and an overlay's state). The file names are
//! [`format::base`]'s: a base is a snapshot plus its kernel, disk and manifest.

pub mod restore;
pub mod save;
pub mod state;

pub use restore::{read_disk_delta, read_state};
pub use state::{MachineState, SnapshotError, SnapshotInfo, DISK_DELTA_FILE};
