//! Any bytes as guest memory and queue positions for the virtio-blk, virtio-net and
//! virtio-console request paths (layout in `vmm::devices::virtio::fuzz::fuzz_process`). Must never panic or hang,
//! whatever the guest writes into its rings and descriptors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::devices::virtio::fuzz::fuzz_process(data);
});
