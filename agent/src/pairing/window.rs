//! The pairing window: the operator opens it for a while; only then does the appliance pair.
//!
//! ```text
//! Closed ──open(d)──▶ Open { until, claim code (one use), confirmation code }
//! Open ──d passes / close() / too many wrong claim codes──▶ Closed
//! Open ──a claim succeeds──▶ Open with the claim code spent (USB pairing goes on)
//! ```
//!
//! Time is passed in (`now`), so the transitions are tested without waiting.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::PairingError;

/// Shortest window.
pub const MIN_WINDOW: Duration = Duration::from_secs(1);
/// Longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// Wrong claim codes a window takes before it closes.
pub const MAX_WRONG_CODES: u32 = 10;
/// Characters of a claim code (no 0/O, 1/I/L, U: read aloud or typed without confusion).
pub const CLAIM_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTVWXYZ23456789";
/// Length of a claim code (about 49 bits).
pub const CLAIM_LEN: usize = 10;
/// Digits of the confirmation code.
pub const CONFIRM_LEN: usize = 6;

/// A device seen in a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSeen {
    /// Its id (from its Hello).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its model.
    pub model: String,
    /// "usb" or "claim".
    pub via: String,
    /// "pairing", "paired" or "refused".
    pub state: String,
}

/// An open window.
#[derive(Clone, Debug)]
pub struct PairingWindow {
    until: Instant,
    claim_code: String,
    claim_used: bool,
    confirm: String,
    wrong_codes: u32,
    /// The device pairing now (or last).
    pub pending: Option<DeviceSeen>,
    /// Devices paired in this window.
    pub paired: Vec<DeviceSeen>,
}

/// What a claim code check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeCheck {
    /// The window's code, unused.
    Good,
    /// Not this window's code.
    Wrong,
    /// This window's code, already used.
    Used,
}

fn pick(random: &[u8], alphabet: &[u8], n: usize) -> Option<String> {
    // Rejection sampling keeps every character equally likely.
    let limit = 256 - 256 % alphabet.len();
    let s: String = random
        .iter()
        .filter(|b| usize::from(**b) < limit)
        .take(n)
        .map(|b| char::from(alphabet[usize::from(*b) % alphabet.len()]))
        .collect();
    (s.len() == n).then_some(s)
}

impl PairingWindow {
    /// A window open from `now` for `d`, with codes drawn from `random` (at least 64 bytes
    /// of the kernel's randomness).
    pub fn open(now: Instant, d: Duration, random: &[u8]) -> Result<PairingWindow, PairingError> {
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&d) {
            return Err(PairingError::BadDuration(d));
        }
        let (a, b) = random.split_at(random.len() / 2);
        let claim_code = pick(a, CLAIM_ALPHABET, CLAIM_LEN).ok_or(PairingError::ShortRandom)?;
        let confirm = pick(b, b"0123456789", CONFIRM_LEN).ok_or(PairingError::ShortRandom)?;
        Ok(PairingWindow {
            until: now + d,
            claim_code,
            claim_used: false,
            confirm,
            wrong_codes: 0,
            pending: None,
            paired: Vec::new(),
        })
    }

    /// Whether it is still open at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        now < self.until && self.wrong_codes < MAX_WRONG_CODES
    }

    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.until.saturating_duration_since(now)
    }

    /// The one-time claim code (for the QR code).
    pub fn claim_code(&self) -> &str {
        &self.claim_code
    }

    /// Whether the claim code was used.
    pub fn claim_used(&self) -> bool {
        self.claim_used
    }

    /// The confirmation code the manager shows.
    pub fn confirm(&self) -> &str {
        &self.confirm
    }

    /// Checks a presented claim code (in time independent of where it differs); a wrong one
    /// counts towards closing the window.
    pub fn check_code(&mut self, code: &str) -> CodeCheck {
        if !crate::auth::constant_time_eq(code.as_bytes(), self.claim_code.as_bytes()) {
            self.wrong_codes += 1;
            CodeCheck::Wrong
        } else if self.claim_used {
            CodeCheck::Used
        } else {
            CodeCheck::Good
        }
    }

    /// Spends the claim code.
    pub fn use_code(&mut self) {
        self.claim_used = true;
    }

    /// Wrong claim codes presented so far.
    pub fn wrong_codes(&self) -> u32 {
        self.wrong_codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random() -> Vec<u8> {
        (0..=255u8).rev().chain(0..=255).collect()
    }

    #[test]
    fn a_window_closes_when_its_time_is_up() {
        let t0 = Instant::now();
        let w = PairingWindow::open(t0, Duration::from_secs(300), &random()).unwrap();
        assert!(w.is_open(t0));
        assert!(w.is_open(t0 + Duration::from_secs(299)));
        assert!(!w.is_open(t0 + Duration::from_secs(300)));
        assert_eq!(w.remaining(t0 + Duration::from_secs(100)).as_secs(), 200);
        assert_eq!(w.claim_code().len(), CLAIM_LEN);
        assert!(w.claim_code().bytes().all(|b| CLAIM_ALPHABET.contains(&b)));
        assert_eq!(w.confirm().len(), CONFIRM_LEN);
        assert!(w.confirm().bytes().all(|b| b.is_ascii_digit()));
        assert!(matches!(
            PairingWindow::open(t0, Duration::from_secs(7200), &random()),
            Err(PairingError::BadDuration(_))
        ));
        assert!(matches!(
            PairingWindow::open(t0, Duration::from_secs(60), &[255; 64]),
            Err(PairingError::ShortRandom)
        ));
    }

    #[test]
    fn a_claim_code_is_good_once_and_wrong_ones_close_the_window() {
        let t0 = Instant::now();
        let mut w = PairingWindow::open(t0, Duration::from_secs(300), &random()).unwrap();
        let code = w.claim_code().to_string();
        assert_eq!(w.check_code(&code), CodeCheck::Good);
        w.use_code();
        assert_eq!(w.check_code(&code), CodeCheck::Used);
        assert!(w.claim_used());
        for i in 0..MAX_WRONG_CODES {
            assert!(w.is_open(t0), "after {i} wrong codes");
            assert_eq!(w.check_code("AAAAAAAAAA"), CodeCheck::Wrong);
        }
        assert!(!w.is_open(t0), "closed after {MAX_WRONG_CODES} wrong codes");
    }
}
