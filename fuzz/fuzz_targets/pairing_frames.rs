//! Any bytes as pairing frames, as the appliance reads them from a phone's bulk endpoint (one
//! frame after another) or from a claim request (one frame). A frame that parses must emit
//! the same message back.
#![no_main]

use format::pairing::{frame_len, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Message::parse(data);
    let mut rest = data;
    while let Ok(Some(n)) = frame_len(rest) {
        let Some(frame) = rest.get(..n) else { break };
        if let Ok(m) = Message::parse(frame) {
            let again = m.emit().expect("a parsed message emits");
            assert_eq!(Message::parse(&again).expect("an emitted frame parses"), m);
        }
        rest = &rest[n..];
    }
});
