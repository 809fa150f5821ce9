//! Any bytes a handoff target receives: the preamble, then frames until the first error,
//! each page batch checked against a 64 MiB guest.
#![no_main]

use format::handoff::{FrameReader, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = FrameReader::new(data);
    if r.read_preamble().is_err() {
        // Also read frames from the very first byte (the target's answers have no preamble).
        let mut r = FrameReader::new(data);
        while r.read().is_ok() {}
        return;
    }
    while let Ok(m) = r.read() {
        if let Message::Pages(p) = m {
            let _ = p.check(64 << 8);
        }
    }
});
