//! The reference oracle (needs `std`): the answers the guest's service must give, written
//! from the documented formulas and layouts alone. Nothing here calls the guest-side code of
//! this crate ([`crate::model`], [`crate::table`], [`crate::primes`], [`crate::scan`]), so a
//! bug there shows up as a wrong answer instead of being copied into the check.
//!
//! - `query I` on a loaded model: [`model_entry`], as the reply [`query_reply`];
//! - `get I` on a disk written by [`table_image`]: [`table_value`], as the reply
//!   [`get_reply`];
//! - `scan`'s checksum of a range of a disk image: [`word_sum`];
//! - `primes N`'s count: [`prime_count`];
//! - the handoff scenario's RAM: `incr`/`count` ([`incr_reply`], [`count_reply`]), the base
//!   content of `fill MIB` and the sums of `load`, `fill` and `check` ([`fill_word`],
//!   [`model_sum`], [`fill_sum`], [`check_reply`]), and the dirtier's report
//!   ([`parse_dirty_reply`]).

/// Bytes per disk sector.
const SECTOR: usize = 512;

/// Entry `i` of the sample service's model table (`load N`, `query I`): SplitMix64's
/// finaliser of `i + 1`, masked with `0x0f0f…` (docs/micro-guest.md).
pub fn model_entry(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) & 0x0f0f_0f0f_0f0f_0f0f
}

/// The reply to `query I` on a model that holds entry `i`.
pub fn query_reply(i: u64) -> String {
    format!("ok query i={i} value={}", model_entry(i))
}

/// The value [`table_image`] stores in entry `i` (as `microclient.py mkdisk` does).
pub fn table_value(i: u64) -> u64 {
    (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The reply to `get I` when entry `i` holds `value`.
pub fn get_reply(i: u64, value: u64) -> String {
    format!("ok get i={i} value={value}")
}

/// The most entries a table on a disk of `bytes` bytes holds (64 per sector after sector 0).
pub fn table_capacity(bytes: usize) -> u64 {
    (bytes / SECTOR).saturating_sub(1) as u64 * (SECTOR / 8) as u64
}

/// A disk image of `bytes` bytes holding a table of `entries` entries: sector 0 is
/// `CLDTABLE`, `u32` version 1, `u32` 0, `u64` entry count; entry `i` is [`table_value`]`(i)`
/// as a little-endian `u64` at byte `512 + 8 i`. Panics when the entries do not fit
/// ([`table_capacity`]).
pub fn table_image(entries: u64, bytes: usize) -> Vec<u8> {
    assert!(
        entries <= table_capacity(bytes),
        "{entries} entries do not fit a table of {bytes} bytes"
    );
    let mut img = vec![0u8; bytes];
    img[..8].copy_from_slice(b"CLDTABLE");
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[16..24].copy_from_slice(&entries.to_le_bytes());
    for (i, e) in (0..entries).zip(img[SECTOR..].chunks_exact_mut(8)) {
        e.copy_from_slice(&table_value(i).to_le_bytes());
    }
    img
}

/// The `scan` checksum of `bytes`: the wrapping sum of its little-endian `u64` words (a
/// trailing part word is ignored; a scan reads whole sectors).
pub fn word_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
        .fold(0, u64::wrapping_add)
}

/// The number of primes ≤ `n` (a sieve of Eratosthenes).
pub fn prime_count(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let mut composite = vec![false; n + 1];
    let mut count = 0;
    for i in 2..=n {
        if !composite[i] {
            count += 1;
            for j in (i.saturating_mul(i)..=n).step_by(i) {
                composite[j] = true;
            }
        }
    }
    count
}

/// The reply to `incr` when the counter was `before`.
pub fn incr_reply(before: u64) -> String {
    format!("ok incr n={}", before.wrapping_add(1))
}

/// The reply to `count` when the counter is `n`.
pub fn count_reply(n: u64) -> String {
    format!("ok count n={n}")
}

/// Word `i` of the base content (`fill MIB`): the model's formula at index `i + 2^48`
/// (docs/micro-guest.md).
pub fn fill_word(i: u64) -> u64 {
    model_entry(i + (1 << 48))
}

/// Words in `mib` MiB.
fn words(mib: u64) -> u64 {
    mib << 17
}

/// The `sum` of `load MIB`: the wrapping sum of the model table's entries.
pub fn model_sum(mib: u64) -> u64 {
    (0..words(mib)).map(model_entry).fold(0, u64::wrapping_add)
}

/// The `sum` of `fill MIB`: the wrapping sum of the base content's words.
pub fn fill_sum(mib: u64) -> u64 {
    (0..words(mib)).map(fill_word).fold(0, u64::wrapping_add)
}

/// The reply to `check` with `fill_mib` MiB of base content and a model table of `model_mib`
/// MiB, both intact.
pub fn check_reply(fill_mib: u64, model_mib: u64) -> String {
    format!(
        "ok check fill_mib={fill_mib} fill_sum={} model_mib={model_mib} model_sum={}",
        fill_sum(fill_mib),
        model_sum(model_mib)
    )
}

/// `(rate, pages)` from a reply to `dirty [RATE]` (`ok dirty rate=R pages=P`).
pub fn parse_dirty_reply(reply: &str) -> Option<(u64, u64)> {
    let rest = reply.strip_prefix("ok dirty rate=")?;
    let (rate, pages) = rest.split_once(" pages=")?;
    Some((rate.parse().ok()?, pages.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values() {
        assert_eq!(query_reply(5), "ok query i=5 value=219285551139652106");
        assert_eq!(model_entry(5), 219_285_551_139_652_106);
        assert_eq!(model_entry(0), 0x0200_0809_0b0d_0d0f);
        assert_eq!(table_value(7), 17_418_742_259_747_381_416);
        assert_eq!(get_reply(7, 42), "ok get i=7 value=42");
        assert_eq!(
            [0, 1, 2, 10, 1000, 65_537, 1_000_000].map(prime_count),
            [0, 0, 1, 4, 168, 6543, 78_498]
        );
        assert_eq!(
            word_sum(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9]),
            3
        );
        assert_eq!(word_sum(&[0xff; 16]), u64::MAX - 1);
    }

    #[test]
    fn table_image_layout() {
        let img = table_image(5000, 1 << 20);
        assert_eq!(img.len(), 1 << 20);
        assert_eq!(
            &img[..24],
            b"CLDTABLE\x01\0\0\0\0\0\0\0\x88\x13\0\0\0\0\0\0"
        );
        assert_eq!(&img[512 + 56..512 + 64], &table_value(7).to_le_bytes());
        assert_eq!(&img[512 + 8 * 5000..512 + 8 * 5001], &[0; 8]);
        assert_eq!(table_capacity(2 << 20), 4095 * 64);
        let full = table_image(table_capacity(4096), 4096);
        assert_eq!(&full[4088..], &table_value(447).to_le_bytes());
    }

    #[test]
    fn handoff_scenario_values() {
        assert_eq!(incr_reply(41), "ok incr n=42");
        assert_eq!(incr_reply(u64::MAX), "ok incr n=0");
        assert_eq!(count_reply(7), "ok count n=7");
        assert_eq!(fill_word(0), model_entry(1 << 48));
        assert_ne!(fill_word(3), model_entry(3));
        assert_eq!(
            check_reply(0, 0),
            "ok check fill_mib=0 fill_sum=0 model_mib=0 model_sum=0"
        );
        assert_eq!(
            parse_dirty_reply("ok dirty rate=2000 pages=123"),
            Some((2000, 123))
        );
        assert_eq!(parse_dirty_reply("ok dirty rate=x pages=1"), None);
        assert_eq!(parse_dirty_reply("err dirty"), None);
    }

    /// The oracle agrees with the guest's own code (which it must not call itself).
    #[test]
    fn agrees_with_the_guest_side() {
        let mut words = vec![0u64; 1 << 17];
        assert_eq!(crate::ram::fill(&mut words, 0), fill_sum(1));
        assert_eq!(crate::model::fill(&mut words, 0), model_sum(1));
        for i in [0, 1, 5, 77_777, 2_097_151, u64::MAX - 1] {
            assert_eq!(model_entry(i), crate::model::entry(i), "model entry {i}");
        }
        let img = table_image(300, 8192);
        let head = crate::table::Header::parse(&img[..512], 16).unwrap();
        assert_eq!(head.entries, 300);
        assert_eq!(table_capacity(8192), crate::table::max_entries(16));
        let mut counter = crate::PrimeCounter::new();
        for n in [10, 1000, 65_537] {
            assert_eq!(
                counter.count(n as u64),
                Some(prime_count(n) as u64),
                "π({n})"
            );
        }
    }
}
