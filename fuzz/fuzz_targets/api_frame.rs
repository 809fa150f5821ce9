//! Any bytes on the control socket.
#![no_main]

use libfuzzer_sys::fuzz_target;
use format::control::{read_frame, ApiRequest};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Ok(_)) = read_frame::<ApiRequest>(&mut r) {}
});
