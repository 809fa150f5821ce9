//! One save/restore pair for every stateful component of a machine (after Firecracker's
//! `Persist`): the COM1 serial device, a virtio transport with its device, the VM, a vCPU.
//! Each component's state type lives beside its code; the snapshot module's `MachineState`
//! gathers them into the state file a snapshot or an overlay carries.
//!
//! These states are postcard-encoded into state files and overlays: a state's field order
//! and types are its encoding, and changing them changes the format (`format::state`).

/// A component whose state can be saved and a component rebuilt from it.
pub trait Persist: Sized {
    /// The serialisable state.
    type State;
    /// What rebuilding needs besides the state (a fresh component, its wiring).
    type Args<'a>;
    /// Why saving or restoring failed.
    type Error;

    /// The component's state (take it with the vCPUs paused).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// The component rebuilt from `args` with `state`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}
