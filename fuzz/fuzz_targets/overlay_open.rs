//! Any bytes as an overlay file: open (header, index, bounds) and, when that succeeds, apply
//! to a sink that only checks page bounds, check every chunk and decode the disk δ. Must never
//! panic, hang or allocate without bound.
#![no_main]

use format::overlay::{Overlay, PageSink, SinkError};
use libfuzzer_sys::fuzz_target;

struct Bounds(u64);

impl PageSink for Bounds {
    fn write_pages(&self, first: u64, data: &[u8]) -> Result<(), SinkError> {
        let end = first + (data.len() / 4096) as u64;
        if data.len() % 4096 != 0 || end > self.0 {
            return Err(SinkError::OutsideMemory(first.saturating_mul(4096)));
        }
        Ok(())
    }
    fn zero_pages(&self, first: u64, count: u64) -> Result<(), SinkError> {
        (first + count <= self.0)
            .then_some(())
            .ok_or(SinkError::OutsideMemory(first.saturating_mul(4096)))
    }
    fn copy_from_base(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        (dst < self.0 && src < self.0)
            .then_some(())
            .ok_or(SinkError::OutsideMemory(dst.saturating_mul(4096)))
    }
    fn copy_page(&self, dst: u64, src: u64) -> Result<(), SinkError> {
        (dst < self.0 && src < self.0)
            .then_some(())
            .ok_or(SinkError::OutsideMemory(dst.saturating_mul(4096)))
    }
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("fuzz-overlay-{}", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let opened = Overlay::open(&path);
    // The overlay works on its mapping from here on; leave no file behind when the run ends.
    let _ = std::fs::remove_file(&path);
    if let Ok(ov) = opened {
        let pages = ov.index().mem_pages;
        let _ = ov.apply(&Bounds(pages), 1);
        // The up-front checksum pass and the disk δ (synthesis puts it under the VM's disk).
        let _ = ov.verify_chunks(1);
        let _ = ov.disk_blocks();
    }
});
