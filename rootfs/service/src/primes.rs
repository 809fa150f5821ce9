//! Counting the primes ≤ N (π(N)) with a segmented sieve of Eratosthenes.
//!
//! Only odd numbers are sieved: bit `i` of the sieve stands for the number `2i + 1`. The
//! memory is fixed and O(√N) for the largest N accepted ([`MAX_N`] = 10^10, √N = 10^5), all of
//! it on the stack of [`count_primes`]:
//!
//! | buffer | size |
//! | --- | --- |
//! | odd base primes ≤ √N (9 591 of them for 10^5), `u32` | 38 KiB |
//! | offset of each base prime's next multiple in the coming segment, `u32` | 38 KiB |
//! | one segment: 2^18 bits = 2^19 consecutive numbers | 32 KiB |
//! | small sieve finding the base primes (50 000 bits) | 6 KiB |
//!
//! A base prime `p` first marks `p²` and then every `2p` (every `p` in bit-index space); it
//! joins the sieve in the segment that contains `p²`, so the offsets always fit in `u32`.

/// Largest N accepted by [`count_primes`].
pub const MAX_N: u64 = 10_000_000_000;
/// √[`MAX_N`]: the largest base prime needed.
const MAX_ROOT: u64 = 100_000;
/// Room for the odd primes ≤ [`MAX_ROOT`] (π(10^5) = 9 592, minus the prime 2).
const MAX_BASE_PRIMES: usize = 9_592;
/// Words of the small sieve: one bit per odd number ≤ [`MAX_ROOT`].
const SMALL_WORDS: usize = (MAX_ROOT as usize / 2) / 64 + 1;
/// Words of one segment (32 KiB, about an L1 data cache).
const SEGMENT_WORDS: usize = 4096;
/// Bits (odd numbers) in one segment.
const SEGMENT_BITS: u64 = SEGMENT_WORDS as u64 * 64;

/// Returns π(n), the number of primes ≤ `n`, or `None` when `n` > [`MAX_N`].
pub fn count_primes(n: u64) -> Option<u64> {
    if n > MAX_N {
        return None;
    }
    if n < 3 {
        return Some(if n == 2 { 1 } else { 0 });
    }
    let mut base = [0u32; MAX_BASE_PRIMES];
    let base_len = odd_primes_up_to(n.isqrt(), &mut base);
    let base = &base[..base_len];
    let mut next = [0u32; MAX_BASE_PRIMES];
    let mut active = 0usize;
    let mut segment = [0u64; SEGMENT_WORDS];

    // Bit indices 0..total stand for the odd numbers 1, 3, …, ≤ n.
    let total = n.div_ceil(2);
    let mut count = 1; // the prime 2
    let mut low = 0u64;
    while low < total {
        let len = SEGMENT_BITS.min(total - low);
        segment.fill(0);
        // Primes whose square falls into this segment start sieving here.
        while let Some(&p) = base.get(active) {
            let first = (u64::from(p) * u64::from(p) - 1) / 2;
            if first >= low + len {
                break;
            }
            next[active] = (first - low) as u32;
            active += 1;
        }
        for (&p, offset) in base[..active].iter().zip(next.iter_mut()) {
            let step = u64::from(p);
            let mut j = u64::from(*offset);
            while j < len {
                segment[(j / 64) as usize] |= 1 << (j % 64);
                j += step;
            }
            // j - len < step ≤ 10^5; only the last segment can be shorter, and after it the
            // offsets are no longer used.
            *offset = (j - len) as u32;
        }
        if low == 0 {
            segment[0] |= 1; // 1 is not a prime
        }
        count += len - composites(&segment, len);
        low += len;
    }
    Some(count)
}

/// Number of set bits among the first `len` bits of `segment`.
fn composites(segment: &[u64; SEGMENT_WORDS], len: u64) -> u64 {
    let full = (len / 64) as usize;
    let mut set: u64 = segment[..full]
        .iter()
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let rest = len % 64;
    if rest != 0 {
        set += u64::from((segment[full] & ((1u64 << rest) - 1)).count_ones());
    }
    set
}

/// Writes the odd primes ≤ `limit` (≤ [`MAX_ROOT`]) into `out` in increasing order and returns
/// how many there are.
fn odd_primes_up_to(limit: u64, out: &mut [u32; MAX_BASE_PRIMES]) -> usize {
    let limit = limit.min(MAX_ROOT);
    if limit < 3 {
        return 0;
    }
    let mut composite = [0u64; SMALL_WORDS];
    let last = ((limit - 1) / 2) as usize; // bit index of the largest odd number ≤ limit
    let mut found = 0;
    for i in 1..=last {
        if composite[i / 64] >> (i % 64) & 1 != 0 {
            continue;
        }
        let p = 2 * i + 1;
        if let Some(slot) = out.get_mut(found) {
            *slot = p as u32;
            found += 1;
        }
        let (p, last) = (p as u64, last as u64);
        let mut j = (p * p - 1) / 2;
        while j <= last {
            composite[(j / 64) as usize] |= 1 << (j % 64);
            j += p;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// π(n) by trial division, for small n.
    fn naive(n: u64) -> u64 {
        (2..=n)
            .filter(|&k| (2..).take_while(|d| d * d <= k).all(|d| k % d != 0))
            .count() as u64
    }

    /// π(n) by a plain (unsegmented) sieve.
    fn plain_sieve(n: u64) -> u64 {
        let n = n as usize;
        let mut composite = vec![false; n + 1];
        let mut count = 0;
        for k in 2..=n {
            if !composite[k] {
                count += 1;
                let mut j = k * k;
                while j <= n {
                    composite[j] = true;
                    j += k;
                }
            }
        }
        count
    }

    #[test]
    fn known_values() {
        assert_eq!(count_primes(0), Some(0));
        assert_eq!(count_primes(1), Some(0));
        assert_eq!(count_primes(2), Some(1));
        assert_eq!(count_primes(3), Some(2));
        assert_eq!(count_primes(4), Some(2));
        assert_eq!(count_primes(10), Some(4));
        assert_eq!(count_primes(100), Some(25));
        assert_eq!(count_primes(1_000), Some(168));
        assert_eq!(count_primes(1_000_000), Some(78_498));
        assert_eq!(count_primes(10_000_000), Some(664_579));
    }

    #[test]
    fn matches_trial_division_for_small_n() {
        for n in 0..3000 {
            assert_eq!(count_primes(n), Some(naive(n)), "n = {n}");
        }
    }

    #[test]
    fn segment_boundaries() {
        // Numbers covered by one and two segments, and around them.
        let one = 2 * SEGMENT_BITS;
        for n in [
            one - 3,
            one - 2,
            one - 1,
            one,
            one + 1,
            one + 2,
            2 * one - 1,
            2 * one,
            2 * one + 1,
        ] {
            assert_eq!(count_primes(n), Some(plain_sieve(n)), "n = {n}");
        }
    }

    #[test]
    fn squares_of_primes() {
        // p² itself must be marked composite: 9, 25, 49, 121, 97² …
        for p in [3u64, 5, 7, 11, 97, 1009] {
            let n = p * p;
            assert_eq!(count_primes(n), Some(plain_sieve(n)), "n = {n}");
            assert_eq!(count_primes(n - 1), count_primes(n), "n = {n}");
        }
    }

    #[test]
    fn rejects_too_large() {
        assert_eq!(count_primes(MAX_N + 1), None);
        assert_eq!(count_primes(u64::MAX), None);
    }

    #[test]
    fn base_primes_fit_for_max_n() {
        let mut out = [0u32; MAX_BASE_PRIMES];
        let n = odd_primes_up_to(MAX_N.isqrt(), &mut out);
        assert_eq!(n, 9_591);
        assert_eq!(out[0], 3);
        assert_eq!(out[n - 1], 99_991);
    }

    #[test]
    #[ignore = "takes a few seconds in a debug build; run with --ignored --release"]
    fn large_known_values() {
        assert_eq!(count_primes(100_000_000), Some(5_761_455));
        assert_eq!(count_primes(1_000_000_000), Some(50_847_534));
    }
}
