//! Any bytes as Ethernet frames from a guest to the user-mode network (records of a
//! big-endian `u16` length and that many bytes; outbound relaying off). Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    netback::fuzz_frames(data);
});
