//! Any bytes on the control socket, or on a report channel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use format::control::{read_frame, ApiRequest, Frame, Report};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Ok(_)) = read_frame::<ApiRequest>(&mut r) {}
    let _ = Frame::new_checked(data).and_then(|f| f.message::<Report>());
});
