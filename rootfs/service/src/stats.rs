//! What `stats` reports: the number of requests served and the uptime.

use crate::time::Elapsed;

/// Counters of the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    requests: u64,
    boot_ticks: u64,
}

impl Stats {
    /// Fresh counters for a guest whose first instruction ran at TSC value `boot_ticks`.
    pub const fn new(boot_ticks: u64) -> Self {
        Self {
            requests: 0,
            boot_ticks,
        }
    }

    /// Counts one request (answered with `ok` or `err`).
    pub fn record_request(&mut self) {
        self.requests = self.requests.saturating_add(1);
    }

    /// Requests counted so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Time since boot at TSC value `now_ticks`, with TSC frequency `hz` if known.
    pub fn uptime(&self, now_ticks: u64, hz: Option<u64>) -> Elapsed {
        Elapsed::from_ticks(now_ticks.saturating_sub(self.boot_ticks), hz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_measures() {
        let mut s = Stats::new(1_000);
        assert_eq!(s.requests(), 0);
        s.record_request();
        s.record_request();
        assert_eq!(s.requests(), 2);
        assert_eq!(s.uptime(3_000, Some(1_000_000)), Elapsed::Micros(2_000));
        assert_eq!(s.uptime(3_000, None), Elapsed::Cycles(2_000));
        // A TSC that went backwards (e.g. after a restore) reads as zero, not a huge number.
        assert_eq!(s.uptime(10, None), Elapsed::Cycles(0));
    }
}
