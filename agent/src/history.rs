//! The last hour at a glance: a ring buffer of samples of the agent's own metrics, one every
//! [`INTERVAL`], that `GET /v1/metrics/history` returns and the manager draws.
//!
//! ```text
//!   every 10 s: Metrics::take_window() (starts' latencies, requests since the last sample)
//!               + the supervisor's running instances and VM memory + the agent's RSS
//!               ──▶ Sample ──▶ ring of 360 (one hour); the oldest falls out
//! ```

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Samples kept: one hour.
pub const KEPT: usize = 360;

/// One sample.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    /// When (Unix seconds, fractional).
    pub unix: f64,
    /// Instances running.
    pub running: u32,
    /// Instances holding a slot (running, starting, handing off, receiving).
    pub active: u32,
    /// Starts since the previous sample.
    pub starts: u64,
    /// Their latency (vmm spawn or standby hand-out → first verified reply), p50, ms.
    pub start_p50_ms: Option<f64>,
    /// Their latency, p99, ms.
    pub start_p99_ms: Option<f64>,
    /// Starts that failed since the previous sample.
    pub start_failures: u64,
    /// API requests since the previous sample, not counting the web manager's own reads
    /// (those marked [`REFRESH_HEADER`]).
    pub requests: u64,
    /// The web manager's own reads since the previous sample (its refreshes, the console's
    /// long polls), kept apart so they do not swell `requests`.
    #[serde(default)]
    pub manager_reads: u64,
    /// Guest memory of the active instances, MiB.
    pub vm_memory_mib: u64,
    /// The agent's resident memory, MiB.
    pub agent_rss_mib: f64,
}

/// What the metrics gathered since the previous sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    /// The starts' latencies, ms.
    pub start_ms: Vec<f64>,
    /// Failed starts.
    pub failures: u64,
    /// API requests (not the manager's reads).
    pub requests: u64,
    /// The manager's reads.
    pub manager_reads: u64,
}

/// The header the web manager puts on its own reads (`X-Cloudlet-Refresh: 1`): they are
/// counted as `manager_reads`, not `requests`.
pub const REFRESH_HEADER: &str = "x-cloudlet-refresh";

/// The value at quantile `q` (0..=1) of `v` (nearest rank), None when empty.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

/// The ring of samples.
#[derive(Default)]
pub struct History {
    ring: Mutex<VecDeque<Sample>>,
}

/// The gauges read at sampling time: (running, active, VM memory MiB, agent RSS MiB).
pub type Gauges = (u32, u32, u64, f64);

impl History {
    /// A sample made of `w` and the gauges `g`, at `unix`.
    pub fn sample_of(w: &Window, g: Gauges, unix: f64) -> Sample {
        let r2 = |v: Option<f64>| v.map(|x| (x * 100.0).round() / 100.0);
        Sample {
            unix,
            running: g.0,
            active: g.1,
            starts: w.start_ms.len() as u64,
            start_p50_ms: r2(quantile(&w.start_ms, 0.5)),
            start_p99_ms: r2(quantile(&w.start_ms, 0.99)),
            start_failures: w.failures,
            requests: w.requests,
            manager_reads: w.manager_reads,
            vm_memory_mib: g.2,
            agent_rss_mib: (g.3 * 10.0).round() / 10.0,
        }
    }

    /// Appends `s`, dropping the oldest beyond [`KEPT`].
    pub fn push(&self, s: Sample) {
        let mut r = self.ring.lock().expect("history lock");
        if r.len() == KEPT {
            r.pop_front();
        }
        r.push_back(s);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.ring
            .lock()
            .expect("history lock")
            .iter()
            .cloned()
            .collect()
    }
}

/// The gauges of `sup` now.
pub fn gauges(sup: &crate::supervisor::Supervisor) -> Gauges {
    let running = sup
        .counts()
        .iter()
        .find(|(s, _)| *s == "running")
        .map_or(0, |(_, n)| *n as u32);
    let (active, mem) = sup.usage();
    let rss = crate::sysinfo::own_rss_kib() as f64 / 1024.0;
    (running, active, mem, rss)
}

/// Samples `sup`'s metrics every [`INTERVAL`] (the first at once) until the task is dropped.
pub async fn sampler(sup: std::sync::Arc<crate::supervisor::Supervisor>) {
    let mut t = tokio::time::interval(INTERVAL);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        sup.metrics().sample(gauges(&sup));
    }
}

/// Seconds since the Unix epoch, fractional.
pub fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
    }

    #[test]
    fn the_ring_keeps_the_last_hour() {
        let h = History::default();
        for i in 0..KEPT + 5 {
            let w = Window {
                start_ms: vec![1.0, 2.0, 30.0],
                failures: 0,
                requests: i as u64,
                manager_reads: 0,
            };
            h.push(History::sample_of(&w, (1, 2, 64, 12.34), i as f64));
        }
        let s = h.samples();
        assert_eq!(s.len(), KEPT);
        assert_eq!(s[0].unix, 5.0, "the oldest fell out");
        assert_eq!(s[KEPT - 1].requests, (KEPT + 4) as u64);
        assert_eq!(s[0].start_p50_ms, Some(2.0));
        assert_eq!(s[0].start_p99_ms, Some(30.0));
        assert_eq!(s[0].agent_rss_mib, 12.3);
    }
}
