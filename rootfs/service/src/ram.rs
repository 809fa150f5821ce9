//! The RAM the handoff scenario moves: where the base content, the model table and the
//! dirtier's buffer lie, what the base content holds, and how the dirtier paces itself.
//!
//! ```text
//!  0        16 MiB                         fill_start      dirty_start        room end
//!  | guest  | model table (`load MIB`) ... | base content    | dirtier buffer   |
//!  | image  | grows up from MODEL_BASE     | (`fill MIB`)    | (32 MiB, `dirty`)|
//! ```
//!
//! The room is the RAM range holding [`MODEL_BASE`] (from the firmware memory map). The
//! dirtier's buffer is its top [`DIRTY_BYTES`]; the base content (`fill MIB`: what a real
//! base carries for its OS and runtime) lies right below it; the model table (`load MIB`, the
//! application's δ against such a base) grows up from 16 MiB. None may overlap another that
//! is in use: the guest refuses a `fill`, a `load` or a `dirty RATE` that would.
//!
//! Word `i` of the base content is [`fill_entry`]`(i)`: the model's formula at indices
//! shifted by [`FILL_OFFSET`], so the base content and a model table never hold the same
//! page (a model page is not a base page at any address) while compressing alike (about
//! 2:1).

use crate::model::{self, MODEL_BASE};

/// Bytes per page: the unit the dirtier writes and the handoff tracks.
pub const PAGE: u64 = 4096;
/// Size of the dirtier's buffer at the top of the room (32 MiB).
pub const DIRTY_BYTES: u64 = 32 << 20;
/// Largest `fill` in MiB.
pub const MAX_FILL_MIB: u64 = 4096;
/// Highest dirtier rate, pages per second.
pub const MAX_DIRTY_RATE: u64 = 1_000_000;
/// Index offset of the base content in the model's formula (2^48: beyond any model index).
pub const FILL_OFFSET: u64 = 1 << 48;

/// Word `i` of the base content (`fill`).
pub const fn fill_entry(i: u64) -> u64 {
    model::entry(i + FILL_OFFSET)
}

/// Fills `words` (words `first..first + words.len()` of the base content) and returns the
/// wrapping sum of what it wrote.
pub fn fill(words: &mut [u64], first: u64) -> u64 {
    // The base content is the model's formula shifted by FILL_OFFSET (see `fill_entry`).
    model::fill(words, first + FILL_OFFSET)
}

/// The wrapping sum of `words` (the `check` request's sums).
pub fn sum(words: &[u64]) -> u64 {
    words.iter().fold(0, |s, &w| s.wrapping_add(w))
}

/// Why a region does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The room above 16 MiB is too small: (MiB needed, MiB there are).
    TooSmall(u64, u64),
    /// The region would overlap one in use: (what is in the way).
    Overlaps(&'static str),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LayoutError::TooSmall(need, have) => write!(
                f,
                "not enough memory: needs {need} MiB above 16 MiB, the guest has {have} MiB there"
            ),
            LayoutError::Overlaps(what) => write!(f, "it would overlap {what}"),
        }
    }
}

/// The regions in use in the room above [`MODEL_BASE`] (all sizes in bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of RAM from `MODEL_BASE` to the end of its RAM range.
    pub room: u64,
    /// Bytes of the loaded model table.
    pub model: u64,
    /// Bytes of the base content (0: none).
    pub fill: u64,
    /// Whether the dirtier's buffer is in use (the dirtier was started once).
    pub dirty: bool,
}

impl Layout {
    /// The guest-physical address where the dirtier's buffer starts.
    pub fn dirty_start(&self) -> u64 {
        MODEL_BASE + self.room.saturating_sub(DIRTY_BYTES)
    }

    /// The guest-physical address where `fill` bytes of base content start.
    pub fn fill_start(&self, fill: u64) -> u64 {
        self.dirty_start().saturating_sub(fill)
    }

    /// Checks that a model table of `bytes` fits below the base content and the dirtier's
    /// buffer when they are in use.
    pub fn check_model(&self, bytes: u64) -> Result<(), LayoutError> {
        let end = MODEL_BASE + bytes;
        if self.fill > 0 && end > self.fill_start(self.fill) {
            return Err(LayoutError::Overlaps("the base content (fill)"));
        }
        if self.dirty && end > self.dirty_start() {
            return Err(LayoutError::Overlaps("the dirtier's buffer"));
        }
        Ok(())
    }

    /// Checks that `bytes` of base content fit between the model table and the dirtier's
    /// buffer; returns where they start.
    pub fn check_fill(&self, bytes: u64) -> Result<u64, LayoutError> {
        let need = bytes + DIRTY_BYTES;
        if need > self.room {
            return Err(LayoutError::TooSmall(need >> 20, self.room >> 20));
        }
        let start = self.fill_start(bytes);
        if start < MODEL_BASE + self.model {
            return Err(LayoutError::Overlaps("the model table (load)"));
        }
        Ok(start)
    }

    /// Checks that the dirtier's buffer fits above the model table and the base content.
    pub fn check_dirty(&self) -> Result<u64, LayoutError> {
        if DIRTY_BYTES > self.room {
            return Err(LayoutError::TooSmall(DIRTY_BYTES >> 20, self.room >> 20));
        }
        let start = self.dirty_start();
        if start < MODEL_BASE + self.model {
            return Err(LayoutError::Overlaps("the model table (load)"));
        }
        Ok(start)
    }
}

/// Shortest sleep between two batches of the dirtier's writes, µs: above this rate
/// (1000 pages/s) the pages due in a millisecond are written together, so the guest still
/// sleeps between writes and a request waits at most one such batch.
pub const MIN_TICK_US: u64 = 1_000;
/// Most writes owed that the dirtier catches up on after the guest was held up (paused,
/// descheduled): 50 ms worth at the current rate; older ones are skipped, not burst.
pub const CATCH_UP_US: u64 = 50_000;

/// The steady page dirtier's pacing (`dirty RATE`): which page to write next and when. The
/// guest calls [`Dirtier::due`] on every pass of its loop, writes that many pages (each
/// offset from [`Dirtier::next_offset`]) and sleeps at most [`Dirtier::wake_in`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dirtier {
    /// Pages per second (0: stopped).
    rate: u64,
    /// When the current rate was set, µs since boot.
    since: u64,
    /// Write slots of the current rate accounted for (written or skipped).
    slots: u64,
    /// Page writes done since boot.
    total: u64,
    /// Next page of the buffer (index).
    next: u64,
    /// The latest time seen, µs since boot.
    last: u64,
}

impl Dirtier {
    /// A stopped dirtier.
    pub const fn new() -> Self {
        Dirtier {
            rate: 0,
            since: 0,
            slots: 0,
            total: 0,
            next: 0,
            last: 0,
        }
    }

    /// Sets the rate (pages per second; 0 stops) from `now_us` on.
    pub fn set_rate(&mut self, rate: u64, now_us: u64) {
        self.rate = rate.min(MAX_DIRTY_RATE);
        self.since = now_us;
        self.slots = 0;
        self.last = now_us;
    }

    /// The current rate, pages per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Page writes done since boot.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Write slots of the current rate that have come by `now_us`.
    fn slots_by(&self, now_us: u64) -> u64 {
        let elapsed = u128::from(now_us.saturating_sub(self.since));
        (elapsed * u128::from(self.rate) / 1_000_000) as u64
    }

    /// How many pages to write now; slots more than [`CATCH_UP_US`] behind are skipped. A
    /// clock that went back (a VM restored where the time counter is lower) restarts the
    /// pacing from now instead of stalling until the clock is back where it was.
    pub fn due(&mut self, now_us: u64) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        if now_us < self.last {
            self.since = now_us;
            self.slots = 0;
        }
        self.last = now_us;
        let owed = self.slots_by(now_us).saturating_sub(self.slots);
        let cap = (self.rate * CATCH_UP_US / 1_000_000).max(1);
        if owed > cap {
            self.slots += owed - cap;
            return cap;
        }
        owed
    }

    /// Byte offset in the buffer of the next page to write (wrapping over [`DIRTY_BYTES`]),
    /// and the word to write there (the write's number, from 1); counts the write.
    pub fn next_write(&mut self) -> (u64, u64) {
        let off = self.next * PAGE;
        self.next = (self.next + 1) % (DIRTY_BYTES / PAGE);
        self.slots += 1;
        self.total += 1;
        (off, self.total)
    }

    /// Microseconds until the next write is due (at least [`MIN_TICK_US`]); `None` when
    /// stopped.
    pub fn wake_in(&self, now_us: u64) -> Option<u64> {
        if self.rate == 0 {
            return None;
        }
        // The first instant at which slot `slots + 1` has come.
        let at = self.since
            + ((u128::from(self.slots + 1) * 1_000_000).div_ceil(u128::from(self.rate)) as u64);
        Some(at.saturating_sub(now_us).max(MIN_TICK_US))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_content_differs_from_the_model_and_is_never_zero() {
        assert_eq!(fill_entry(0), model::entry(1 << 48));
        for i in [0u64, 1, 511, 8 << 20] {
            assert_ne!(fill_entry(i), model::entry(i), "word {i}");
        }
        let mut words = [0u64; 4096];
        let s = fill(&mut words, 512);
        assert_eq!(words[3], fill_entry(515));
        assert_eq!(s, sum(&words));
        assert!(words.iter().all(|&w| w != 0));
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn layout_keeps_regions_apart() {
        // A 256 MiB guest: 240 MiB above 16 MiB.
        let mut l = Layout {
            room: 240 * MIB,
            ..Layout::default()
        };
        assert_eq!(l.dirty_start(), 224 * MIB);
        assert_eq!(l.check_fill(64 * MIB), Ok(160 * MIB));
        assert_eq!(l.check_dirty(), Ok(224 * MIB));
        l.fill = 64 * MIB;
        l.dirty = true;
        assert_eq!(l.check_model(16 * MIB), Ok(()));
        assert_eq!(l.check_model(144 * MIB), Ok(()));
        assert_eq!(
            l.check_model(145 * MIB),
            Err(LayoutError::Overlaps("the base content (fill)"))
        );
        l.fill = 0;
        assert_eq!(
            l.check_model(209 * MIB),
            Err(LayoutError::Overlaps("the dirtier's buffer"))
        );
        l.model = 200 * MIB;
        assert_eq!(
            l.check_fill(16 * MIB),
            Err(LayoutError::Overlaps("the model table (load)"))
        );
        assert_eq!(
            l.check_fill(400 * MIB),
            Err(LayoutError::TooSmall(432, 240))
        );
        l.model = 209 * MIB;
        assert_eq!(
            l.check_dirty(),
            Err(LayoutError::Overlaps("the model table (load)"))
        );
        let small = Layout {
            room: 16 * MIB,
            ..Layout::default()
        };
        assert_eq!(small.check_dirty(), Err(LayoutError::TooSmall(32, 16)));
        assert_eq!(
            format!("{}", LayoutError::TooSmall(96, 48)),
            "not enough memory: needs 96 MiB above 16 MiB, the guest has 48 MiB there"
        );
        // Without fill or dirtier, the model may take the whole room, as before.
        let bare = Layout {
            room: 240 * MIB,
            ..Layout::default()
        };
        assert_eq!(bare.check_model(240 * MIB), Ok(()));
    }

    #[test]
    fn dirtier_keeps_its_rate_and_sleeps_between_batches() {
        let mut d = Dirtier::new();
        assert_eq!((d.due(5_000_000), d.wake_in(5_000_000)), (0, None));
        // 100 pages/s from t = 1 s: one page every 10 ms.
        d.set_rate(100, 1_000_000);
        assert_eq!(d.due(1_000_000), 0);
        assert_eq!(d.wake_in(1_000_000), Some(10_000));
        assert_eq!(d.due(1_010_000), 1);
        assert_eq!(d.next_write(), (0, 1));
        assert_eq!(d.wake_in(1_010_000), Some(10_000));
        assert_eq!(d.due(1_015_000), 0);
        assert_eq!(d.wake_in(1_015_000), Some(5_000));
        // Held up for a second: catches up at most 50 ms worth (5 pages), skips the rest.
        assert_eq!(d.due(2_015_000), 5);
        for k in 0..5 {
            assert_eq!(d.next_write(), (PAGE * (k + 1), k + 2));
        }
        assert_eq!(d.due(2_015_000), 0);
        // Fast rates write in batches of a millisecond's worth.
        d.set_rate(50_000, 3_000_000);
        assert_eq!(d.wake_in(3_000_000), Some(MIN_TICK_US));
        assert_eq!(d.due(3_001_000), 50);
        // Over a simulated second, the pages written match the rate.
        let mut d = Dirtier::new();
        d.set_rate(2_000, 0);
        let mut now = 0;
        while now < 1_000_000 {
            for _ in 0..d.due(now) {
                d.next_write();
            }
            now += d.wake_in(now).unwrap();
        }
        assert!((1_990..=2_000).contains(&d.total()), "{}", d.total());
        d.set_rate(0, now);
        assert_eq!((d.due(now + 1_000_000), d.wake_in(now)), (0, None));
    }

    #[test]
    fn dirtier_survives_a_clock_that_goes_back() {
        let mut d = Dirtier::new();
        d.set_rate(1000, 50_000_000);
        for _ in 0..d.due(50_010_000) {
            d.next_write();
        }
        assert_eq!(d.total(), 10);
        // Restored where the clock reads 1 s: pages keep coming at the rate from there.
        assert_eq!(d.due(1_000_000), 0);
        assert_eq!(d.due(1_005_000), 5);
        assert_eq!(d.wake_in(1_005_000), Some(MIN_TICK_US));
    }

    #[test]
    fn dirtier_wraps_its_buffer() {
        let mut d = Dirtier::new();
        let pages = DIRTY_BYTES / PAGE;
        for _ in 0..pages - 1 {
            d.next_write();
        }
        assert_eq!(d.next_write(), (DIRTY_BYTES - PAGE, pages));
        assert_eq!(d.next_write(), (0, pages + 1));
    }
}
