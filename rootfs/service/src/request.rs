//! Requests: one serial line (`primes 1000`) or one `micro.run` command (`primes:1000`) →
//! [`Request`]. Parsing works on bytes, never allocates and never panics; anything it cannot
//! make sense of is a [`ParseError`], answered with an `err …` line.
//!
//! Grammar (command names are case-sensitive; `SP` is one or more spaces or tabs):
//! ```text
//! line    = [SP] command [SP args] [SP]
//! command = "primes" | "echo" | "stats" | "poweroff"
//! primes  args = N           decimal, 0 ≤ N ≤ 10^10
//! echo    args = TEXT        the rest of the line, as is (may be empty)
//! stats   no args
//! poweroff args = [CODE]     decimal 0..=255, default 0
//! ```

use crate::primes::MAX_N;

/// A parsed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// `primes N`: count the primes ≤ N.
    Primes(u64),
    /// `echo TEXT`: send TEXT back.
    Echo(&'a [u8]),
    /// `stats`: requests served and uptime.
    Stats,
    /// `poweroff [CODE]`: reply, then power off with exit status CODE.
    PowerOff(u8),
}

/// Why a request was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError<'a> {
    /// Nothing but blanks (e.g. an empty `micro.run` item).
    Empty,
    /// The first word is not a command.
    UnknownCommand(&'a [u8]),
    /// The command needs an argument, e.g. `primes` without N; holds the usage.
    MissingArgument(&'static str),
    /// The command takes no argument but got one.
    UnexpectedArgument(&'a [u8]),
    /// The argument is not a decimal number.
    BadNumber(&'a [u8]),
    /// The number is above the command's maximum.
    TooLarge {
        /// The argument as given.
        value: &'a [u8],
        /// The largest accepted value.
        max: u64,
    },
}

impl<'a> Request<'a> {
    /// Parses a request line (without its `\n`; a trailing `\r` is ignored too).
    pub fn parse_line(line: &'a [u8]) -> Result<Self, ParseError<'a>> {
        let line = trim(line);
        match line.iter().position(|&b| is_blank(b)) {
            Some(i) => Self::from_parts(&line[..i], trim(&line[i..])),
            None => Self::from_parts(line, &[]),
        }
    }

    /// Parses one `micro.run` command, where the first `:` stands for the space between the
    /// command and its arguments (`primes:1000`, `echo:a:b` → `echo a:b`).
    pub fn parse_run_command(command: &'a [u8]) -> Result<Self, ParseError<'a>> {
        let command = trim(command);
        match command.iter().position(|&b| b == b':') {
            Some(i) => Self::from_parts(&command[..i], &command[i + 1..]),
            None => Self::from_parts(command, &[]),
        }
    }

    /// Builds a request from its command name and its (trimmed) arguments.
    pub fn from_parts(name: &'a [u8], args: &'a [u8]) -> Result<Self, ParseError<'a>> {
        match name {
            b"" => Err(ParseError::Empty),
            b"primes" if args.is_empty() => Err(ParseError::MissingArgument("primes N")),
            b"primes" => parse_number(args, MAX_N).map(Request::Primes),
            b"echo" => Ok(Request::Echo(args)),
            b"stats" if args.is_empty() => Ok(Request::Stats),
            b"stats" => Err(ParseError::UnexpectedArgument(args)),
            b"poweroff" if args.is_empty() => Ok(Request::PowerOff(0)),
            // The maximum is 255, so the conversion cannot fail.
            b"poweroff" => parse_number(args, 255).map(|c| Request::PowerOff(c as u8)),
            other => Err(ParseError::UnknownCommand(other)),
        }
    }
}

/// Parses a decimal number in `0..=max`.
fn parse_number(text: &[u8], max: u64) -> Result<u64, ParseError<'_>> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadNumber(text));
    }
    let too_large = ParseError::TooLarge { value: text, max };
    let mut value = 0u64;
    for &digit in text {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or(too_large)?;
    }
    if value > max {
        return Err(too_large);
    }
    Ok(value)
}

/// Spaces, tabs and the `\r` of a `\r\n` line end.
fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

/// `bytes` without leading and trailing blanks.
fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_blank(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_blank(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(
            Request::parse_line(b"primes 1000"),
            Ok(Request::Primes(1000))
        );
        assert_eq!(
            Request::parse_line(b"echo hello world"),
            Ok(Request::Echo(b"hello world"))
        );
        assert_eq!(Request::parse_line(b"echo"), Ok(Request::Echo(b"")));
        assert_eq!(Request::parse_line(b"stats"), Ok(Request::Stats));
        assert_eq!(Request::parse_line(b"poweroff"), Ok(Request::PowerOff(0)));
        assert_eq!(Request::parse_line(b"poweroff 7"), Ok(Request::PowerOff(7)));
        assert_eq!(
            Request::parse_line(b"poweroff 255"),
            Ok(Request::PowerOff(255))
        );
    }

    #[test]
    fn tolerates_blanks_and_crlf() {
        assert_eq!(
            Request::parse_line(b"  primes \t 10 \r"),
            Ok(Request::Primes(10))
        );
        assert_eq!(Request::parse_line(b"stats\r"), Ok(Request::Stats));
        assert_eq!(
            Request::parse_line(b"echo  a  b \r"),
            Ok(Request::Echo(b"a  b"))
        );
    }

    #[test]
    fn rejects_bad_requests() {
        assert_eq!(Request::parse_line(b""), Err(ParseError::Empty));
        assert_eq!(Request::parse_line(b" \r"), Err(ParseError::Empty));
        assert_eq!(
            Request::parse_line(b"foo bar"),
            Err(ParseError::UnknownCommand(b"foo"))
        );
        assert_eq!(
            Request::parse_line(b"PRIMES 1"),
            Err(ParseError::UnknownCommand(b"PRIMES"))
        );
        assert_eq!(
            Request::parse_line(b"primes"),
            Err(ParseError::MissingArgument("primes N"))
        );
        assert_eq!(
            Request::parse_line(b"primes x"),
            Err(ParseError::BadNumber(b"x"))
        );
        assert_eq!(
            Request::parse_line(b"primes -1"),
            Err(ParseError::BadNumber(b"-1"))
        );
        assert_eq!(
            Request::parse_line(b"primes 1 2"),
            Err(ParseError::BadNumber(b"1 2"))
        );
        assert_eq!(
            Request::parse_line(b"stats now"),
            Err(ParseError::UnexpectedArgument(b"now"))
        );
        assert_eq!(
            Request::parse_line(b"poweroff 256"),
            Err(ParseError::TooLarge {
                value: b"256",
                max: 255
            })
        );
        assert_eq!(
            Request::parse_line(b"primes 10000000001"),
            Err(ParseError::TooLarge {
                value: b"10000000001",
                max: MAX_N
            })
        );
        assert_eq!(
            Request::parse_line(b"primes 99999999999999999999999"),
            Err(ParseError::TooLarge {
                value: b"99999999999999999999999",
                max: MAX_N
            })
        );
    }

    #[test]
    fn accepts_the_largest_n() {
        assert_eq!(
            Request::parse_line(b"primes 10000000000"),
            Ok(Request::Primes(MAX_N))
        );
        assert_eq!(Request::parse_line(b"primes 0007"), Ok(Request::Primes(7)));
    }

    #[test]
    fn run_commands_use_a_colon() {
        assert_eq!(
            Request::parse_run_command(b"primes:1000000"),
            Ok(Request::Primes(1_000_000))
        );
        assert_eq!(
            Request::parse_run_command(b"poweroff:0"),
            Ok(Request::PowerOff(0))
        );
        assert_eq!(
            Request::parse_run_command(b"poweroff"),
            Ok(Request::PowerOff(0))
        );
        assert_eq!(
            Request::parse_run_command(b"echo:a:b"),
            Ok(Request::Echo(b"a:b"))
        );
        assert_eq!(Request::parse_run_command(b"stats"), Ok(Request::Stats));
        assert_eq!(Request::parse_run_command(b""), Err(ParseError::Empty));
        assert_eq!(Request::parse_run_command(b":5"), Err(ParseError::Empty));
        assert_eq!(
            Request::parse_run_command(b"primes:"),
            Err(ParseError::MissingArgument("primes N"))
        );
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every short sequence over an alphabet of interesting
        // bytes, plus pseudo-random longer ones.
        let alphabet = [
            b' ', b'\r', b'\t', b':', b'0', b'9', b'p', b'e', 0u8, 0xff, b'-',
        ];
        let mut buf = [0u8; 4];
        for len in 0..=4 {
            let combos = alphabet.len().pow(len as u32);
            for mut k in 0..combos {
                for slot in buf.iter_mut().take(len) {
                    *slot = alphabet[k % alphabet.len()];
                    k /= alphabet.len();
                }
                let _ = Request::parse_line(&buf[..len]);
                let _ = Request::parse_run_command(&buf[..len]);
            }
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut long = [0u8; 64];
        for _ in 0..20_000 {
            for b in long.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = (x % 64) as usize;
            let _ = Request::parse_line(&long[..n]);
            let _ = Request::parse_run_command(&long[..n]);
            // Valid prefixes followed by garbage.
            long[..7].copy_from_slice(b"primes ");
            let _ = Request::parse_line(&long[..n]);
        }
    }
}
