//! The dispatcher: a request in, a reply line out, plus what the guest must do next.
//!
//! Time is passed in through [`Clock`] (the guest reads the TSC; tests use a fake), so the
//! whole service runs on the host.

use crate::primes::count_primes;
use crate::reply::{LineBuf, Reply};
use crate::request::{ParseError, Request};
use crate::stats::Stats;
use crate::time::Elapsed;

/// A source of time.
pub trait Clock {
    /// Current TSC value.
    fn ticks(&self) -> u64;
    /// TSC frequency in Hz, when known.
    fn hz(&self) -> Option<u64>;
}

/// What the guest does after sending the reply line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait for the next request.
    Continue,
    /// Power off with this exit status.
    PowerOff(u8),
}

/// The service state: its [`Stats`].
#[derive(Clone, Copy, Debug)]
pub struct Service {
    stats: Stats,
}

impl Service {
    /// A service for a guest whose first instruction ran at TSC value `boot_ticks`.
    pub const fn new(boot_ticks: u64) -> Self {
        Self {
            stats: Stats::new(boot_ticks),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Handles a serial request line: writes the reply into `out`.
    pub fn handle_line<C: Clock, const N: usize>(
        &mut self,
        line: &[u8],
        clock: &C,
        out: &mut LineBuf<N>,
    ) -> Action {
        self.handle(Request::parse_line(line), clock, out)
    }

    /// Handles one `micro.run` command (`primes:1000`): writes the reply into `out`.
    pub fn handle_run_command<C: Clock, const N: usize>(
        &mut self,
        command: &[u8],
        clock: &C,
        out: &mut LineBuf<N>,
    ) -> Action {
        self.handle(Request::parse_run_command(command), clock, out)
    }

    /// Answers a request line that was too long to read.
    pub fn handle_too_long<const N: usize>(&mut self, out: &mut LineBuf<N>) -> Action {
        self.stats.record_request();
        Reply::LineTooLong.write_to(out);
        Action::Continue
    }

    /// Handles a parsed (or rejected) request: writes the reply into `out`.
    pub fn handle<C: Clock, const N: usize>(
        &mut self,
        request: Result<Request<'_>, ParseError<'_>>,
        clock: &C,
        out: &mut LineBuf<N>,
    ) -> Action {
        self.stats.record_request();
        let (reply, action) = match request {
            Ok(Request::Primes(n)) => {
                let start = clock.ticks();
                // The parser caps N at primes::MAX_N, so counting cannot fail here; answer
                // with an error rather than panicking should that ever change.
                match count_primes(n) {
                    Some(count) => {
                        let ticks = clock.ticks().saturating_sub(start);
                        let elapsed = Elapsed::from_ticks(ticks, clock.hz());
                        (Reply::Primes { n, count, elapsed }, Action::Continue)
                    }
                    None => {
                        let too_large = ParseError::TooLarge {
                            value: b"N",
                            max: crate::primes::MAX_N,
                        };
                        (Reply::Invalid(too_large), Action::Continue)
                    }
                }
            }
            Ok(Request::Echo(text)) => (Reply::Echo(text), Action::Continue),
            Ok(Request::Stats) => {
                let uptime = self.stats.uptime(clock.ticks(), clock.hz());
                let requests = self.stats.requests();
                (Reply::Stats { requests, uptime }, Action::Continue)
            }
            Ok(Request::PowerOff(code)) => (Reply::PowerOff(code), Action::PowerOff(code)),
            Err(error) => (Reply::Invalid(error), Action::Continue),
        };
        reply.write_to(out);
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_REPLY;
    use core::cell::Cell;

    /// A clock that advances by `step` ticks on every read.
    struct FakeClock {
        now: Cell<u64>,
        step: u64,
        hz: Option<u64>,
    }

    impl Clock for FakeClock {
        fn ticks(&self) -> u64 {
            let now = self.now.get();
            self.now.set(now + self.step);
            now
        }
        fn hz(&self) -> Option<u64> {
            self.hz
        }
    }

    fn run(service: &mut Service, clock: &FakeClock, line: &str) -> (String, Action) {
        let mut out = LineBuf::<MAX_REPLY>::new();
        let action = service.handle_line(line.as_bytes(), clock, &mut out);
        (String::from_utf8(out.as_bytes().to_vec()).unwrap(), action)
    }

    #[test]
    fn a_session() {
        let clock = FakeClock {
            now: Cell::new(5_000),
            step: 1_000,
            hz: Some(1_000_000),
        };
        let mut s = Service::new(1_000);
        assert_eq!(
            run(&mut s, &clock, "primes 100"),
            ("ok primes N=100 count=25 us=1000".into(), Action::Continue)
        );
        assert_eq!(
            run(&mut s, &clock, "echo hi"),
            ("ok echo hi".into(), Action::Continue)
        );
        assert_eq!(
            run(&mut s, &clock, "bogus"),
            ("err unknown command 'bogus'".into(), Action::Continue)
        );
        // Four requests so far, this one included; the clock now reads 7000.
        assert_eq!(
            run(&mut s, &clock, "stats"),
            (
                "ok stats requests=4 uptime_us=6000".into(),
                Action::Continue
            )
        );
        assert_eq!(
            run(&mut s, &clock, "poweroff 7"),
            ("ok poweroff code=7".into(), Action::PowerOff(7))
        );
        assert_eq!(s.stats().requests(), 5);
    }

    #[test]
    fn run_commands_and_long_lines() {
        let clock = FakeClock {
            now: Cell::new(0),
            step: 10,
            hz: None,
        };
        let mut s = Service::new(0);
        let mut out = LineBuf::<MAX_REPLY>::new();
        assert_eq!(
            s.handle_run_command(b"primes:10", &clock, &mut out),
            Action::Continue
        );
        assert_eq!(out.as_bytes(), b"ok primes N=10 count=4 cycles=10");
        assert_eq!(
            s.handle_run_command(b"poweroff:0", &clock, &mut out),
            Action::PowerOff(0)
        );
        assert_eq!(out.as_bytes(), b"ok poweroff code=0");
        assert_eq!(s.handle_too_long(&mut out), Action::Continue);
        assert_eq!(out.as_bytes(), b"err line too long (max 255 bytes)");
        assert_eq!(s.stats().requests(), 3);
    }
}
