//! Reply lines, formatted into a caller-provided fixed buffer ([`LineBuf`]).
//!
//! ```text
//! micro-guest 0.1.0 ready boot_us=N          (banner; boot_cycles=N without TSC frequency)
//! ok primes N=<N> count=<π(N)> us=<T>        (cycles=<T> without TSC frequency)
//! ok echo TEXT                               ("ok echo" when TEXT is empty)
//! ok stats requests=<R> uptime_us=<T>        (uptime_cycles=<T> without TSC frequency)
//! ok poweroff code=<C>
//! err <reason>
//! ```
//! Bytes that came from the request (echo text, quoted arguments) are copied as they are,
//! except control characters, which become `?` so one request can never produce more than
//! one reply line. Quoted arguments are cut at [`QUOTE_MAX`] bytes (`...` marks the cut).

use core::fmt::{self, Write};

use crate::request::ParseError;
use crate::time::Elapsed;

/// Longest argument quoted in an `err` line.
pub const QUOTE_MAX: usize = 40;

/// A line being built in a fixed buffer of `N` bytes. Output past the end is dropped (and
/// remembered in [`LineBuf::truncated`]) rather than failing, so formatting never panics.
#[derive(Clone, Debug)]
pub struct LineBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> LineBuf<N> {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            truncated: false,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Whether some output did not fit.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Empties the line.
    pub fn clear(&mut self) {
        self.len = 0;
        self.truncated = false;
    }

    /// Appends raw bytes, as many as fit.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let room = N - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        if n < bytes.len() {
            self.truncated = true;
        }
    }

    /// Appends bytes with control characters (below 0x20, and 0x7f) replaced by `?`.
    pub fn push_sanitized(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let b = if b < 0x20 || b == 0x7f { b'?' } else { b };
            self.push_bytes(&[b]);
        }
    }

    /// Appends `'bytes'`, sanitized and cut at [`QUOTE_MAX`] bytes.
    pub fn push_quoted(&mut self, bytes: &[u8]) {
        self.push_bytes(b"'");
        if bytes.len() > QUOTE_MAX {
            self.push_sanitized(&bytes[..QUOTE_MAX]);
            self.push_bytes(b"...");
        } else {
            self.push_sanitized(bytes);
        }
        self.push_bytes(b"'");
    }
}

impl<const N: usize> Default for LineBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for LineBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// One reply line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Result of `primes N`.
    Primes {
        /// N.
        n: u64,
        /// π(N).
        count: u64,
        /// Time spent counting.
        elapsed: Elapsed,
    },
    /// Result of `echo TEXT`.
    Echo(&'a [u8]),
    /// Result of `stats`.
    Stats {
        /// Requests served so far, this one included.
        requests: u64,
        /// Time since the first instruction of the guest.
        uptime: Elapsed,
    },
    /// Acknowledges `poweroff CODE`; the guest powers off after sending it.
    PowerOff(u8),
    /// The request could not be parsed.
    Invalid(ParseError<'a>),
    /// The request line was longer than [`crate::MAX_LINE`] bytes and was dropped.
    LineTooLong,
}

impl Reply<'_> {
    /// Writes the reply, without the line terminator, after clearing `out`.
    pub fn write_to<const N: usize>(&self, out: &mut LineBuf<N>) {
        out.clear();
        // LineBuf's fmt::Write never fails.
        let _ = self.format(out);
    }

    fn format<const N: usize>(&self, out: &mut LineBuf<N>) -> fmt::Result {
        match *self {
            Reply::Primes { n, count, elapsed } => {
                write!(out, "ok primes N={n} count={count} ")?;
                elapsed.write_field(out, "")
            }
            Reply::Echo(text) => {
                out.push_bytes(b"ok echo");
                if !text.is_empty() {
                    out.push_bytes(b" ");
                    out.push_sanitized(text);
                }
                Ok(())
            }
            Reply::Stats { requests, uptime } => {
                write!(out, "ok stats requests={requests} ")?;
                uptime.write_field(out, "uptime_")
            }
            Reply::PowerOff(code) => write!(out, "ok poweroff code={code}"),
            Reply::Invalid(error) => write_error(out, error),
            Reply::LineTooLong => write!(out, "err line too long (max {} bytes)", crate::MAX_LINE),
        }
    }
}

fn write_error<const N: usize>(out: &mut LineBuf<N>, error: ParseError<'_>) -> fmt::Result {
    match error {
        ParseError::Empty => out.push_bytes(b"err empty request"),
        ParseError::UnknownCommand(name) => {
            out.push_bytes(b"err unknown command ");
            out.push_quoted(name);
        }
        ParseError::MissingArgument(usage) => write!(out, "err missing argument (usage: {usage})")?,
        ParseError::UnexpectedArgument(args) => {
            out.push_bytes(b"err unexpected argument ");
            out.push_quoted(args);
        }
        ParseError::BadNumber(text) => {
            out.push_bytes(b"err bad number ");
            out.push_quoted(text);
        }
        ParseError::TooLarge { value, max } => {
            out.push_bytes(b"err number too large ");
            out.push_quoted(value);
            write!(out, " (max {max})")?;
        }
    }
    Ok(())
}

/// Writes the banner `micro-guest <version> ready boot_us=<N>` (or `boot_cycles=<N>`).
pub fn write_banner<const N: usize>(out: &mut LineBuf<N>, version: &str, boot: Elapsed) {
    out.clear();
    let _ = write!(out, "micro-guest {version} ready ");
    let _ = boot.write_field(out, "boot_");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_REPLY;

    fn text(reply: Reply<'_>) -> String {
        let mut out = LineBuf::<MAX_REPLY>::new();
        reply.write_to(&mut out);
        String::from_utf8(out.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn formats_ok_replies() {
        let primes = Reply::Primes {
            n: 1_000_000,
            count: 78_498,
            elapsed: Elapsed::Micros(812),
        };
        assert_eq!(text(primes), "ok primes N=1000000 count=78498 us=812");
        let primes = Reply::Primes {
            n: 10,
            count: 4,
            elapsed: Elapsed::Cycles(99),
        };
        assert_eq!(text(primes), "ok primes N=10 count=4 cycles=99");
        assert_eq!(text(Reply::Echo(b"hi there")), "ok echo hi there");
        assert_eq!(text(Reply::Echo(b"")), "ok echo");
        assert_eq!(
            text(Reply::Stats {
                requests: 3,
                uptime: Elapsed::Micros(1500)
            }),
            "ok stats requests=3 uptime_us=1500"
        );
        assert_eq!(
            text(Reply::Stats {
                requests: 1,
                uptime: Elapsed::Cycles(7)
            }),
            "ok stats requests=1 uptime_cycles=7"
        );
        assert_eq!(text(Reply::PowerOff(7)), "ok poweroff code=7");
    }

    #[test]
    fn formats_errors() {
        assert_eq!(text(Reply::Invalid(ParseError::Empty)), "err empty request");
        assert_eq!(
            text(Reply::Invalid(ParseError::UnknownCommand(b"foo"))),
            "err unknown command 'foo'"
        );
        assert_eq!(
            text(Reply::Invalid(ParseError::MissingArgument("primes N"))),
            "err missing argument (usage: primes N)"
        );
        assert_eq!(
            text(Reply::Invalid(ParseError::UnexpectedArgument(b"x y"))),
            "err unexpected argument 'x y'"
        );
        assert_eq!(
            text(Reply::Invalid(ParseError::BadNumber(b"x"))),
            "err bad number 'x'"
        );
        assert_eq!(
            text(Reply::Invalid(ParseError::TooLarge {
                value: b"256",
                max: 255
            })),
            "err number too large '256' (max 255)"
        );
        assert_eq!(
            text(Reply::LineTooLong),
            "err line too long (max 255 bytes)"
        );
    }

    #[test]
    fn sanitizes_and_cuts_request_bytes() {
        assert_eq!(text(Reply::Echo(b"a\nb\x1b[0m\x7f")), "ok echo a?b?[0m?");
        // Non-ASCII bytes (UTF-8) pass through.
        assert_eq!(text(Reply::Echo("é".as_bytes())), "ok echo é");
        let long = [b'x'; 100];
        let quoted = text(Reply::Invalid(ParseError::UnknownCommand(&long)));
        assert_eq!(
            quoted,
            format!("err unknown command '{}...'", "x".repeat(QUOTE_MAX))
        );
    }

    #[test]
    fn longest_echo_fits() {
        let long = [b'y'; crate::MAX_LINE];
        let mut out = LineBuf::<MAX_REPLY>::new();
        Reply::Echo(&long).write_to(&mut out);
        assert!(!out.truncated());
        assert_eq!(out.as_bytes().len(), "ok echo ".len() + crate::MAX_LINE);
    }

    #[test]
    fn overflow_truncates_without_panicking() {
        let mut out = LineBuf::<8>::new();
        Reply::Echo(b"0123456789").write_to(&mut out);
        assert_eq!(out.as_bytes(), b"ok echo ");
        assert!(out.truncated());
        write!(out, "{}", 12345).unwrap();
        assert_eq!(out.as_bytes().len(), 8);
        let mut zero = LineBuf::<0>::new();
        Reply::PowerOff(1).write_to(&mut zero);
        assert_eq!(zero.as_bytes(), b"");
    }

    #[test]
    fn banner() {
        let mut out = LineBuf::<64>::new();
        write_banner(&mut out, "0.1.0", Elapsed::Micros(1234));
        assert_eq!(out.as_bytes(), b"micro-guest 0.1.0 ready boot_us=1234");
        write_banner(&mut out, "0.1.0", Elapsed::Cycles(99));
        assert_eq!(out.as_bytes(), b"micro-guest 0.1.0 ready boot_cycles=99");
    }
}
