//! The guest's clock: microseconds since boot from the TSC, for smoltcp's timers and the
//! idle timeouts.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;

/// TSC ticks per second; a guess of 1 GHz until [`init`] knows better.
static TSC_HZ: AtomicU64 = AtomicU64::new(1_000_000_000);
/// TSC at boot.
static TSC_0: AtomicU64 = AtomicU64::new(0);

/// Sets the TSC frequency (when CPUID gives it) and the zero point.
pub fn init(tsc_hz: Option<u64>, entry_tsc: u64) {
    if let Some(hz) = tsc_hz {
        TSC_HZ.store(hz.max(1), Ordering::Relaxed);
    }
    TSC_0.store(entry_tsc, Ordering::Relaxed);
}

/// Microseconds since boot.
pub fn micros() -> u64 {
    let t = cpu::rdtsc().wrapping_sub(TSC_0.load(Ordering::Relaxed));
    (u128::from(t) * 1_000_000 / u128::from(TSC_HZ.load(Ordering::Relaxed))) as u64
}

/// Now, for smoltcp.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(micros() as i64)
}
