//! An I/O bus: non-overlapping address ranges, each owned by one device.

use std::sync::{Arc, Mutex};

/// A device on the bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// Zero-length range.
    #[error("device range at {0:#x} has zero length")]
    Empty(u64),
}

/// One device range.
#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Routes accesses by address. Lookups are a binary search over sorted ranges.
#[derive(Clone, Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.base, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.saturating_add(len);
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr - e.base < e.len).then_some((e, addr - e.base))
    }

    /// Dispatches a read. Returns false (and fills `data` with 0xff, as an unclaimed ISA
    /// port reads) when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let claimed = self.dispatch(addr, |d, off| d.read(off, data));
        if !claimed {
            data.fill(0xff);
        }
        claimed
    }

    /// Dispatches a write. Returns false when no device owns `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.dispatch(addr, |d, off| d.write(off, data))
    }

    /// Runs `access` on the device owning `addr` (locked) with the offset into its range;
    /// false when none does.
    fn dispatch(&self, addr: u64, access: impl FnOnce(&mut dyn BusDevice, u64)) -> bool {
        let Some((e, off)) = self.find(addr) else {
            return false;
        };
        access(
            &mut *e.device.lock().unwrap_or_else(|p| p.into_inner()),
            off,
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(a.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(!bus.read(0x65, &mut d));
        assert_eq!(d, [0xff]);
        assert!(!bus.write(0x400, &[1]));
        assert!(!bus.read(0x3f7, &mut d));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        assert!(matches!(
            bus.insert(a.clone(), 0x3ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(a.clone(), 0x3f0, 9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(a.clone(), 0x10, 0),
            Err(BusError::Empty(0x10))
        ));
        bus.insert(a, 0x3f0, 8).unwrap();
    }
}
