//! The `scan FIRST_SECTOR SECTORS REQ_KIB` request: a sequential read of a range of the disk
//! in requests of `REQ_KIB` KiB, answered with a checksum of the bytes read (so a client can
//! check every byte arrived) and the time it took.
//!
//! This module holds what the host can test: the request-size limits, how a range is cut into
//! requests ([`Chunks`]) and the checksum ([`Checksum`]: the wrapping sum of the little-endian
//! `u64` words read). The guest does the reading.

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Smallest request size, KiB.
pub const MIN_REQ_KIB: u64 = 4;
/// Largest request size, KiB (the guest's scan buffer).
pub const MAX_REQ_KIB: u64 = 64;
/// Request sizes are a multiple of this many KiB.
pub const REQ_KIB_STEP: u64 = 4;

/// Whether `kib` is an allowed request size.
pub fn valid_req_kib(kib: u64) -> bool {
    (MIN_REQ_KIB..=MAX_REQ_KIB).contains(&kib) && kib % REQ_KIB_STEP == 0
}

/// Whether `[first, first + sectors)` lies on a disk of `capacity` sectors.
pub fn in_range(first: u64, sectors: u64, capacity: u64) -> bool {
    first
        .checked_add(sectors)
        .is_some_and(|end| end <= capacity)
}

/// The requests of a scan, in order: `(first sector, sectors)`, each `req_kib` KiB except a
/// shorter last one when the range is not a whole number of requests.
#[derive(Clone, Debug)]
pub struct Chunks {
    next: u64,
    end: u64,
    per_request: u64,
}

impl Chunks {
    /// The requests reading `sectors` sectors from `first` with `req_kib` KiB each
    /// (`req_kib` ≥ 1; an overflowing range is cut at `u64::MAX`).
    pub fn new(first: u64, sectors: u64, req_kib: u64) -> Chunks {
        Chunks {
            next: first,
            end: first.saturating_add(sectors),
            per_request: (req_kib.max(1) * 1024 / SECTOR).max(1),
        }
    }
}

impl Iterator for Chunks {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.next >= self.end {
            return None;
        }
        let n = (self.end - self.next).min(self.per_request);
        let at = self.next;
        self.next += n;
        Some((at, n))
    }
}

/// The scan checksum: the wrapping sum of the little-endian `u64` words of the bytes read, in
/// any order (the bytes come in whole sectors, so always in whole words).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checksum(pub u64);

impl Checksum {
    /// Adds the words of `bytes` (a trailing partial word counts as if zero-padded).
    pub fn add(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        let mut s = self.0;
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            s = s.wrapping_add(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            s = s.wrapping_add(u64::from_le_bytes(b));
        }
        self.0 = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_sizes() {
        for k in [4u64, 8, 12, 32, 60, 64] {
            assert!(valid_req_kib(k), "{k}");
        }
        for k in [0u64, 1, 2, 3, 5, 6, 63, 65, 68, 128, u64::MAX] {
            assert!(!valid_req_kib(k), "{k}");
        }
    }

    #[test]
    fn ranges() {
        assert!(in_range(0, 10, 10));
        assert!(in_range(9, 1, 10));
        assert!(!in_range(9, 2, 10));
        assert!(!in_range(10, 1, 10));
        assert!(in_range(10, 0, 10));
        assert!(!in_range(u64::MAX, 2, u64::MAX));
    }

    #[test]
    fn chunks_cover_the_range_in_order() {
        let c: Vec<_> = Chunks::new(5, 300, 64).collect();
        assert_eq!(c, vec![(5, 128), (133, 128), (261, 44)]);
        let c: Vec<_> = Chunks::new(0, 16, 4).collect();
        assert_eq!(c, vec![(0, 8), (8, 8)]);
        assert_eq!(Chunks::new(7, 0, 4).count(), 0);
        assert_eq!(Chunks::new(0, 3, 4).collect::<Vec<_>>(), vec![(0, 3)]);
        // 64 MiB in 4 KiB and 64 KiB requests.
        assert_eq!(Chunks::new(0, 131_072, 4).count(), 16_384);
        assert_eq!(Chunks::new(0, 131_072, 64).count(), 1_024);
        let total: u64 = Chunks::new(1, 131_071, 12).map(|(_, n)| n).sum();
        assert_eq!(total, 131_071);
        // An overflowing range is cut at u64::MAX, never wraps.
        let c: Vec<_> = Chunks::new(u64::MAX - 10, 100, 4).collect();
        assert_eq!(c, vec![(u64::MAX - 10, 8), (u64::MAX - 2, 2)]);
    }

    #[test]
    fn checksum_is_the_wrapping_sum_of_le_words() {
        let mut c = Checksum::default();
        let mut bytes = Vec::new();
        for w in [1u64, u64::MAX, 0x0102_0304_0506_0708] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        c.add(&bytes);
        assert_eq!(c.0, 0x0102_0304_0506_0708);
        // Split anywhere on word boundaries: the same sum.
        let mut d = Checksum::default();
        d.add(&bytes[..8]);
        d.add(&bytes[8..]);
        assert_eq!(c, d);
        let mut e = Checksum::default();
        e.add(&[1, 2, 3]);
        assert_eq!(e.0, 0x0003_0201);
    }
}
