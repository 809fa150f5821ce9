//! Any bytes as an update artifact (`.cup`): the prefix and header, then every part the
//! header names decompressed and checked, at most 16 MiB of each.
#![no_main]

use std::io::{Cursor, Read};

use format::update::{open_part, read_header, UpdateHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    let Ok(head) = read_header(&mut c) else {
        return;
    };
    let _ = UpdateHeader::encode_head(&head.header);
    for p in &head.header.parts {
        if let Ok(r) = open_part(Cursor::new(data), &head, p.kind) {
            let _ = std::io::copy(&mut r.take(16 << 20), &mut std::io::sink());
        }
    }
});
