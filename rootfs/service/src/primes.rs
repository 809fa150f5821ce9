//! The sample compute job: π(N), the number of primes ≤ N, by a segmented sieve over odd
//! numbers. Memory is fixed (a 32 KiB segment and the base primes up to √N), so the guest can
//! keep the counter in a static; N is limited to [`MAX_N`].

/// Largest N accepted (√N = 10^5, whose primes fit in the base table).
pub const MAX_N: u64 = 10_000_000_000;
/// Odd numbers per sieve segment.
const SEGMENT: usize = 32 * 1024;
/// π(10^5) = 9592 base primes at most.
const BASE_CAP: usize = 9600;

/// A prime counter with its working memory.
pub struct PrimeCounter {
    base: [u32; BASE_CAP],
    segment: [u8; SEGMENT],
}

impl Default for PrimeCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// Integer square root (largest r with r² ≤ n).
pub fn isqrt(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    // Newton's method from an overestimate.
    let mut x = n;
    let mut y = x.div_ceil(2);
    while y < x {
        x = y;
        y = (x + n / x) / 2;
    }
    x
}

impl PrimeCounter {
    /// A counter with zeroed working memory.
    pub const fn new() -> Self {
        PrimeCounter {
            base: [0; BASE_CAP],
            segment: [0; SEGMENT],
        }
    }

    /// Odd primes ≤ `limit` into `self.base` by trial division; returns how many.
    fn base_primes(&mut self, limit: u64) -> usize {
        let mut count = 0;
        let mut c = 3u64;
        while c <= limit && count < BASE_CAP {
            let mut prime = true;
            for &p in &self.base[..count] {
                let p = u64::from(p);
                if p * p > c {
                    break;
                }
                if c % p == 0 {
                    prime = false;
                    break;
                }
            }
            if prime {
                self.base[count] = c as u32;
                count += 1;
            }
            c += 2;
        }
        count
    }

    /// π(n): the number of primes ≤ `n`, or `None` when `n` > [`MAX_N`].
    pub fn count(&mut self, n: u64) -> Option<u64> {
        if n > MAX_N {
            return None;
        }
        if n < 2 {
            return Some(0);
        }
        let nbase = self.base_primes(isqrt(n));
        let mut total = 1; // the prime 2
                           // Segment k covers the odd numbers low, low+2, …, low + 2(SEGMENT-1).
        let mut low = 3u64;
        while low <= n {
            let span = (((n - low) / 2) + 1).min(SEGMENT as u64) as usize;
            let high = low + 2 * (span as u64 - 1);
            let seg = &mut self.segment[..span];
            seg.fill(1);
            for &p in &self.base[..nbase] {
                let p = u64::from(p);
                if p * p > high {
                    break;
                }
                // First odd multiple of p that is ≥ max(p², low).
                let mut m = (p * p).max(low.div_ceil(p) * p);
                if m % 2 == 0 {
                    m += p;
                }
                let mut i = ((m - low) / 2) as usize;
                while i < span {
                    seg[i] = 0;
                    i += p as usize;
                }
            }
            total += seg.iter().map(|&b| u64::from(b)).sum::<u64>();
            low = high + 2;
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(n: u64) -> u64 {
        (2..=n)
            .filter(|&c| (2..c).take_while(|d| d * d <= c).all(|d| c % d != 0))
            .count() as u64
    }

    #[test]
    fn matches_naive_counting_for_small_n() {
        let mut pc = PrimeCounter::new();
        for n in 0..3000 {
            assert_eq!(pc.count(n), Some(naive(n)), "n = {n}");
        }
    }

    #[test]
    fn known_values() {
        let mut pc = Box::new(PrimeCounter::new());
        for (n, pi) in [
            (10, 4),
            (100, 25),
            (1_000, 168),
            (65_537, 6543),
            (100_000, 9592),
            (1_000_000, 78_498),
            (10_000_000, 664_579),
        ] {
            assert_eq!(pc.count(n), Some(pi), "π({n})");
        }
        // Segment boundaries: 3 + 2·32768 and around it.
        let edge = 3 + 2 * SEGMENT as u64;
        assert_eq!(pc.count(edge), Some(naive_sieve(edge)));
        assert_eq!(pc.count(edge + 2), Some(naive_sieve(edge + 2)));
    }

    fn naive_sieve(n: u64) -> u64 {
        let n = n as usize;
        let mut is = vec![true; n + 1];
        is[0] = false;
        is[1] = false;
        let mut i = 2;
        while i * i <= n {
            if is[i] {
                (i * i..=n).step_by(i).for_each(|j| is[j] = false);
            }
            i += 1;
        }
        is.iter().filter(|&&b| b).count() as u64
    }

    #[test]
    fn rejects_too_large_and_isqrt_is_exact() {
        let mut pc = Box::new(PrimeCounter::new());
        assert_eq!(pc.count(MAX_N + 1), None);
        for n in [0u64, 1, 2, 3, 4, 15, 16, 17, 99_999_999_999, u64::MAX] {
            let r = isqrt(n);
            assert!(
                r * r <= n && (r + 1).checked_mul(r + 1).is_none_or(|s| s > n),
                "{n}"
            );
        }
    }
}
