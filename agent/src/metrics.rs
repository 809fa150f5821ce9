//! `/metrics` in the Prometheus text format (version 0.0.4), kept by hand: API requests by
//! route and status, a histogram of synthesis → first reply latency, handoffs (by role and
//! outcome, bytes, rounds, a downtime histogram), and (filled in at render time) instances
//! by state.
//!
//! ```text
//! cloudlet_handoffs_total{role="source",outcome="moved"} 1
//! cloudlet_handoff_downtime_ms_bucket{le="20"} 1
//! cloudlet_api_requests_total{route="/v1/instances",method="POST",status="201"} 3
//! cloudlet_start_latency_ms_bucket{le="10"} 1
//! cloudlet_start_latency_ms_sum 42.5
//! cloudlet_start_latency_ms_count 3
//! cloudlet_instances{state="running"} 2
//! ```

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds of the start-latency histogram, ms.
pub const BUCKETS_MS: [f64; 12] = [
    5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// Bucket bounds of the handoff downtime histogram, ms.
pub const DOWNTIME_BUCKETS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 30000.0,
];

/// A cumulative histogram.
struct Histogram<const N: usize> {
    buckets: [u64; N],
    sum: f64,
    count: u64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: [0; N],
            sum: 0.0,
            count: 0,
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&mut self, bounds: &[f64; N], v: f64) {
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, s: &mut String, name: &str, help: &str, bounds: &[f64; N]) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in bounds.iter().enumerate() {
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {}", self.buckets[i]);
        }
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(s, "{name}_sum {}", self.sum);
        let _ = writeln!(s, "{name}_count {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    buckets: [u64; BUCKETS_MS.len()],
    sum_ms: f64,
    count: u64,
    failures: u64,
    handoffs: BTreeMap<(&'static str, &'static str), u64>,
    handoff_bytes: u64,
    handoff_rounds: u64,
    downtime: Histogram<{ DOWNTIME_BUCKETS_MS.len() }>,
    /// What happened since the last history sample.
    window: crate::history::Window,
}

/// The agent's counters, and the last hour of samples of them ([`crate::history`]).
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    history: crate::history::History,
}

impl Metrics {
    /// Counts one API request.
    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.request_from(route, method, status, false);
    }

    /// Counts one API request; `manager_read`: one of the web manager's own reads, which the
    /// history keeps apart (the Prometheus counters count every request).
    pub fn request_from(&self, route: &str, method: &str, status: u16, manager_read: bool) {
        let mut g = self.inner.lock().expect("metrics lock");
        *g.requests
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        if manager_read {
            g.window.manager_reads += 1;
        } else {
            g.window.requests += 1;
        }
    }

    /// Records one instance start (synthesis → first verified reply).
    pub fn start_latency(&self, ms: f64) {
        let mut g = self.inner.lock().expect("metrics lock");
        g.window.start_ms.push(ms);
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                g.buckets[i] += 1;
            }
        }
        g.sum_ms += ms;
        g.count += 1;
    }

    /// Counts a start that failed.
    pub fn start_failed(&self) {
        let mut g = self.inner.lock().expect("metrics lock");
        g.failures += 1;
        g.window.failures += 1;
    }

    /// Closes the current window into a history sample with the gauges `g`.
    pub fn sample(&self, g: crate::history::Gauges) {
        let w = std::mem::take(&mut self.inner.lock().expect("metrics lock").window);
        let s = crate::history::History::sample_of(&w, g, crate::history::unix_f64());
        self.history.push(s);
    }

    /// The history's samples, oldest first, then one of the window so far (now) with the
    /// gauges `g`.
    pub fn history(&self, g: crate::history::Gauges) -> Vec<crate::history::Sample> {
        let w = self.inner.lock().expect("metrics lock").window.clone();
        let mut v = self.history.samples();
        v.push(crate::history::History::sample_of(
            &w,
            g,
            crate::history::unix_f64(),
        ));
        v
    }

    /// Counts a handoff's end: `role` "source" or "target", `outcome` "moved", "received"
    /// or "failed".
    pub fn handoff(&self, role: &'static str, outcome: &'static str) {
        *self
            .inner
            .lock()
            .expect("metrics lock")
            .handoffs
            .entry((role, outcome))
            .or_default() += 1;
    }

    /// Records a handoff that moved a VM away from here: its bytes on the wire, rounds and
    /// downtime.
    pub fn handoff_moved(&self, bytes: u64, rounds: u32, downtime_ms: f64) {
        self.handoff("source", "moved");
        let mut g = self.inner.lock().expect("metrics lock");
        g.handoff_bytes += bytes;
        g.handoff_rounds += u64::from(rounds);
        g.downtime.observe(&DOWNTIME_BUCKETS_MS, downtime_ms);
    }

    /// The text exposition; `instances` are (state, count) pairs, `extra` more gauges.
    pub fn render(&self, instances: &[(&str, usize)], extra: &[(&str, &str, f64)]) -> String {
        let g = self.inner.lock().expect("metrics lock");
        let mut s = String::new();
        s.push_str(
            "# HELP cloudlet_api_requests_total API requests by route, method and status.\n",
        );
        s.push_str("# TYPE cloudlet_api_requests_total counter\n");
        for ((route, method, status), n) in &g.requests {
            let _ = writeln!(
                s,
                "cloudlet_api_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                route.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
        s.push_str("# HELP cloudlet_start_latency_ms Instance start: vmm spawn to the guest's first verified reply, ms.\n");
        s.push_str("# TYPE cloudlet_start_latency_ms histogram\n");
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                s,
                "cloudlet_start_latency_ms_bucket{{le=\"{b}\"}} {}",
                g.buckets[i]
            );
        }
        let _ = writeln!(
            s,
            "cloudlet_start_latency_ms_bucket{{le=\"+Inf\"}} {}",
            g.count
        );
        let _ = writeln!(s, "cloudlet_start_latency_ms_sum {}", g.sum_ms);
        let _ = writeln!(s, "cloudlet_start_latency_ms_count {}", g.count);
        s.push_str("# HELP cloudlet_start_failures_total Instance starts that failed.\n");
        s.push_str("# TYPE cloudlet_start_failures_total counter\n");
        let _ = writeln!(s, "cloudlet_start_failures_total {}", g.failures);
        s.push_str("# HELP cloudlet_handoffs_total Handoffs ended, by role (source, target) and outcome (moved, received, failed).\n");
        s.push_str("# TYPE cloudlet_handoffs_total counter\n");
        for ((role, outcome), n) in &g.handoffs {
            let _ = writeln!(
                s,
                "cloudlet_handoffs_total{{role=\"{role}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        s.push_str("# HELP cloudlet_handoff_bytes_total Bytes on the wire of the handoffs that moved a VM away.\n");
        s.push_str("# TYPE cloudlet_handoff_bytes_total counter\n");
        let _ = writeln!(s, "cloudlet_handoff_bytes_total {}", g.handoff_bytes);
        s.push_str("# HELP cloudlet_handoff_rounds_total Rounds of pages sent by the handoffs that moved a VM away.\n");
        s.push_str("# TYPE cloudlet_handoff_rounds_total counter\n");
        let _ = writeln!(s, "cloudlet_handoff_rounds_total {}", g.handoff_rounds);
        g.downtime.render(
            &mut s,
            "cloudlet_handoff_downtime_ms",
            "Handoff downtime: the source's pause to the target's resume, ms.",
            &DOWNTIME_BUCKETS_MS,
        );
        s.push_str("# HELP cloudlet_instances Service-VM instances by state.\n");
        s.push_str("# TYPE cloudlet_instances gauge\n");
        for (state, n) in instances {
            let _ = writeln!(s, "cloudlet_instances{{state=\"{state}\"}} {n}");
        }
        for (name, help, v) in extra {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request("/v1/instances", "POST", 201);
        m.request("/v1/instances", "POST", 201);
        m.request("/v1/services/{name}", "GET", 404);
        m.start_latency(7.0);
        m.start_latency(40.0);
        let t = m.render(
            &[("running", 2), ("failed", 0)],
            &[("cloudlet_x", "x.", 1.5)],
        );
        assert_lines(
            &t,
            &[
                "cloudlet_api_requests_total{route=\"/v1/instances\",method=\"POST\",status=\"201\"} 2",
                "status=\"404\"} 1",
                "cloudlet_start_latency_ms_bucket{le=\"5\"} 0",
                "cloudlet_start_latency_ms_bucket{le=\"10\"} 1",
                "cloudlet_start_latency_ms_bucket{le=\"50\"} 2",
                "cloudlet_start_latency_ms_bucket{le=\"+Inf\"} 2",
                "cloudlet_start_latency_ms_count 2",
                "cloudlet_instances{state=\"running\"} 2",
                "cloudlet_x 1.5",
            ],
        );
    }

    #[test]
    fn renders_handoffs_by_outcome_bytes_rounds_and_downtime() {
        let m = Metrics::default();
        m.handoff_moved(1 << 20, 3, 12.5);
        m.handoff_moved(1000, 2, 3.0);
        m.handoff("source", "failed");
        m.handoff("target", "received");
        let t = m.render(&[], &[]);
        assert_lines(
            &t,
            &[
                "cloudlet_handoffs_total{role=\"source\",outcome=\"moved\"} 2",
                "cloudlet_handoffs_total{role=\"source\",outcome=\"failed\"} 1",
                "cloudlet_handoffs_total{role=\"target\",outcome=\"received\"} 1",
                "cloudlet_handoff_bytes_total 1049576",
                "cloudlet_handoff_rounds_total 5",
                "cloudlet_handoff_downtime_ms_bucket{le=\"2\"} 0",
                "cloudlet_handoff_downtime_ms_bucket{le=\"5\"} 1",
                "cloudlet_handoff_downtime_ms_bucket{le=\"20\"} 2",
                "cloudlet_handoff_downtime_ms_bucket{le=\"+Inf\"} 2",
                "cloudlet_handoff_downtime_ms_sum 15.5",
                "# TYPE cloudlet_handoff_downtime_ms histogram",
            ],
        );
    }

    #[test]
    fn samples_close_windows_of_starts_and_requests() {
        let m = Metrics::default();
        m.request("/v1/instances", "POST", 201);
        m.start_latency(4.0);
        m.start_latency(8.0);
        m.start_failed();
        m.sample((1, 1, 64, 10.0));
        m.request("/v1/system", "GET", 200);
        m.request_from("/v1/system", "GET", 200, true);
        m.request_from("/v1/services", "GET", 200, true);
        let h = m.history((0, 0, 0, 10.0));
        assert_eq!(h.len(), 2, "the sample and now");
        assert_eq!((h[0].starts, h[0].requests, h[0].start_failures), (2, 1, 1));
        assert_eq!(
            (h[0].start_p50_ms, h[0].start_p99_ms),
            (Some(4.0), Some(8.0))
        );
        assert_eq!((h[0].running, h[0].vm_memory_mib), (1, 64));
        assert_eq!((h[1].starts, h[1].requests), (0, 1), "the open window");
        assert_eq!(h[1].manager_reads, 2, "the manager's reads apart");
        assert!(
            m.render(&[], &[])
                .contains("route=\"/v1/system\",method=\"GET\",status=\"200\"} 2"),
            "Prometheus counts them all"
        );
        assert_eq!(h[1].start_p50_ms, None);
    }

    /// Every one of `want` is in the rendered text `t`.
    fn assert_lines(t: &str, want: &[&str]) {
        for w in want {
            assert!(t.contains(w), "{w:?} is not in:\n{t}");
        }
    }
}
