//! Any bytes as a machine state file (the format of snapshots and of an overlay's VM state).
#![no_main]

use libfuzzer_sys::fuzz_target;
use format::state::{decode, Kind, StateFile};
use vmm::snapshot::MachineState;

fuzz_target!(|data: &[u8]| {
    let _ = StateFile::new_checked(data);
    let _ = decode::<MachineState>(Kind::Machine, data);
});
