//! Durations as the guest reports them: microseconds when the TSC frequency is known,
//! otherwise raw TSC cycles (the reply fields are then named `…cycles=` instead of `…us=`).

use core::fmt;

/// A measured duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elapsed {
    /// Microseconds.
    Micros(u64),
    /// TSC cycles (the TSC frequency is unknown).
    Cycles(u64),
}

impl Elapsed {
    /// Converts `ticks` TSC cycles at `hz` cycles per second (`None` or 0: unknown).
    pub fn from_ticks(ticks: u64, hz: Option<u64>) -> Self {
        match hz {
            Some(hz) if hz > 0 => {
                let us = u128::from(ticks) * 1_000_000 / u128::from(hz);
                Elapsed::Micros(u64::try_from(us).unwrap_or(u64::MAX))
            }
            _ => Elapsed::Cycles(ticks),
        }
    }

    /// Writes the reply field `<prefix>us=<N>` or `<prefix>cycles=<N>`.
    pub fn write_field(&self, out: &mut impl fmt::Write, prefix: &str) -> fmt::Result {
        match self {
            Elapsed::Micros(v) => write!(out, "{prefix}us={v}"),
            Elapsed::Cycles(v) => write!(out, "{prefix}cycles={v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_known_frequency() {
        assert_eq!(
            Elapsed::from_ticks(2_000_000, Some(2_000_000_000)),
            Elapsed::Micros(1000)
        );
        assert_eq!(
            Elapsed::from_ticks(1999, Some(2_000_000_000)),
            Elapsed::Micros(0)
        );
        // No overflow for the largest tick count.
        assert_eq!(
            Elapsed::from_ticks(u64::MAX, Some(1_000_000)),
            Elapsed::Micros(u64::MAX)
        );
        assert_eq!(
            Elapsed::from_ticks(u64::MAX, Some(1)),
            Elapsed::Micros(u64::MAX)
        );
    }

    #[test]
    fn falls_back_to_cycles() {
        assert_eq!(Elapsed::from_ticks(42, None), Elapsed::Cycles(42));
        assert_eq!(Elapsed::from_ticks(42, Some(0)), Elapsed::Cycles(42));
    }

    #[test]
    fn field_names() {
        let mut s = String::new();
        Elapsed::Micros(5).write_field(&mut s, "boot_").unwrap();
        s.push(' ');
        Elapsed::Cycles(7).write_field(&mut s, "").unwrap();
        assert_eq!(s, "boot_us=5 cycles=7");
    }
}
