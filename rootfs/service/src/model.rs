//! The sample application's warm state: a "model" table the service builds once (`load N`)
//! and answers queries from (`query I`), like a recognition service with its weights in RAM.
//! It makes an application overlay realistic: several MiB of data that differ from the base.
//!
//! Entry `i` of the table (u64) is `mix(i) & 0x0f0f_0f0f_0f0f_0f0f`: half the bits random,
//! so it compresses about 2:1 like real model data. `mix` is SplitMix64's finaliser of
//! `i + 1`, documented here so a client can check answers independently.

/// Where the table starts in guest physical memory (16 MiB).
pub const MODEL_BASE: u64 = 16 << 20;
/// Largest table.
pub const MAX_MODEL_MIB: u64 = 4096;

/// SplitMix64's output function.
pub const fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Entry `i` of the table.
pub const fn entry(i: u64) -> u64 {
    mix(i) & 0x0f0f_0f0f_0f0f_0f0f
}

/// Fills `table` (entries `first..first + table.len()`) and returns the wrapping sum of what
/// it wrote.
pub fn fill(table: &mut [u64], first: u64) -> u64 {
    let mut sum = 0u64;
    for (k, slot) in table.iter_mut().enumerate() {
        let v = entry(first + k as u64);
        *slot = v;
        sum = sum.wrapping_add(v);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_fill() {
        // SplitMix64 with seed 0: the first output is mix(0).
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(entry(0), 0x0200_0809_0b0d_0d0f);
        let mut t = [0u64; 4];
        let sum = fill(&mut t, 10);
        assert_eq!(t[2], entry(12));
        assert_eq!(sum, (10..14).map(entry).fold(0u64, u64::wrapping_add));
    }
}
