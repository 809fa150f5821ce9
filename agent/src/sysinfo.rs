//! What the host offers right now: cores, load, memory (from /proc).

use serde::Serialize;

/// A snapshot of the host's load.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HostLoad {
    /// Online CPUs.
    pub cores: u32,
    /// 1-minute load average.
    pub load1: f64,
    /// Total memory, MiB.
    pub mem_total_mib: u64,
    /// Available memory (MemAvailable), MiB.
    pub mem_free_mib: u64,
}

/// Reads /proc/loadavg and /proc/meminfo (zeros where they cannot be read).
pub fn host_load() -> HostLoad {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        mem.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib / 1024)
            .unwrap_or(0)
    };
    HostLoad {
        cores,
        load1,
        mem_total_mib: field("MemTotal:"),
        mem_free_mib: field("MemAvailable:"),
    }
}

/// Resident set size of this process, KiB (VmRSS).
pub fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_host() {
        let h = super::host_load();
        assert!(h.cores >= 1);
        assert!(h.mem_total_mib > 0 && h.mem_free_mib <= h.mem_total_mib);
        assert!(super::own_rss_kib() > 0);
    }
}
