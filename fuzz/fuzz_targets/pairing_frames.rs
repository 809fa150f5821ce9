//! Any bytes as pairing frames, as the appliance reads them from a phone's bulk endpoint (one
//! frame after another) or from a claim request (one frame). A frame that parses must emit
//! the same message back. The same bytes also fill the fields of messages to emit (any
//! lengths, any counts): emitting refuses what is out of bounds, never panics, and what it
//! writes parses back.
#![no_main]

use format::pairing::{frame_len, Hello, Message, Welcome, WifiProfile};
use libfuzzer_sys::fuzz_target;

fn emit_round_trip(m: &Message) {
    if let Ok(b) = m.emit() {
        assert_eq!(&Message::parse(&b).expect("an emitted frame parses"), m);
    }
}

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

    if let [a, b, c, tail @ ..] = data {
        let text = String::from_utf8_lossy(tail).into_owned();
        let cut = |n: u8| text.chars().take(usize::from(n)).collect::<String>();
        let nonce = tail.get(..usize::from(*a)).unwrap_or(tail).to_vec();
        emit_round_trip(&Message::Hello(Hello {
            nonce: nonce.clone(),
            device_id: cut(*b),
            name: cut(*c),
            model: cut(a ^ b),
        }));
        let mut fingerprint = [0u8; 32];
        for (f, x) in fingerprint.iter_mut().zip(tail) {
            *f = *x;
        }
        emit_round_trip(&Message::Welcome(Welcome {
            appliance_id: cut(*a),
            api: vec![cut(*b); usize::from(c % 12)],
            fingerprint,
            secret: cut(b.wrapping_add(*c)),
            expires_unix: u64::from(*a) << 40,
            wifi: (c & 1 == 1).then(|| WifiProfile {
                ssid: cut(*b),
                passphrase: cut(*c),
            }),
        }));
    }
});
