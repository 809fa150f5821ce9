//! The kernel command line: space-separated `key=value` parameters, Linux-style (a value may
//! be double-quoted to contain spaces; keys the guest does not know are ignored).
//!
//! The guest reads one key, `micro.run=CMD[,CMD...]`: requests to run at start, as if typed on
//! the serial port, with `:` standing for the space between a command and its arguments
//! (`micro.run=primes:1000000,poweroff:0`). When the key appears more than once, the last one
//! wins. Empty commands (`a,,b`, a trailing comma) are skipped.

/// The key of the start-up commands.
pub const RUN_KEY: &[u8] = b"micro.run";

/// Iterator over the `key=value` (or bare `key`) parameters of a command line, as
/// `(key, value)` with surrounding quotes removed; a bare key has an empty value.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    rest: &'a [u8],
}

/// The parameters of `cmdline` (stops at the first NUL byte, if any).
pub fn params(cmdline: &[u8]) -> Params<'_> {
    let end = cmdline
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(cmdline.len());
    Params {
        rest: &cmdline[..end],
    }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let start = self.rest.iter().position(|&b| !b.is_ascii_whitespace())?;
        let rest = &self.rest[start..];
        let mut quoted = false;
        let mut end = rest.len();
        for (i, &b) in rest.iter().enumerate() {
            if b == b'"' {
                quoted = !quoted;
            } else if b.is_ascii_whitespace() && !quoted {
                end = i;
                break;
            }
        }
        self.rest = &rest[end..];
        let mut token = &rest[..end];
        // A quote may open the whole token ("key=a b") or the value (key="a b").
        let whole_quoted = token.first() == Some(&b'"');
        if whole_quoted {
            token = &token[1..];
        }
        let (key, mut value) = match token.iter().position(|&b| b == b'=') {
            Some(i) => (&token[..i], &token[i + 1..]),
            None => (token, &token[token.len()..]),
        };
        if !whole_quoted && value.first() == Some(&b'"') {
            value = &value[1..];
        }
        if let Some(stripped) = value.strip_suffix(b"\"") {
            value = stripped;
        }
        Some((key, value))
    }
}

/// The value of the last `key=` parameter of `cmdline`.
pub fn param<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    params(cmdline)
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .last()
}

/// The start-up commands of `micro.run=` (none when the key is absent).
pub fn run_commands(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    param(cmdline, RUN_KEY)
        .unwrap_or_default()
        .split(|&b| b == b',')
        .filter(|c| !c.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(cmdline: &str) -> Vec<&str> {
        run_commands(cmdline.as_bytes())
            .map(|c| core::str::from_utf8(c).unwrap())
            .collect()
    }

    #[test]
    fn finds_run_commands_among_other_params() {
        assert_eq!(
            commands("console=ttyS0 micro.run=primes:1000000,poweroff:0 quiet"),
            vec!["primes:1000000", "poweroff:0"]
        );
        assert_eq!(commands("micro.run=stats"), vec!["stats"]);
        assert!(commands("console=ttyS0 reboot=k").is_empty());
        assert!(commands("").is_empty());
        assert!(commands("micro.run").is_empty());
        assert!(commands("micro.run=").is_empty());
        assert!(commands("micro.runner=stats").is_empty());
    }

    #[test]
    fn last_occurrence_wins_and_empty_items_are_skipped() {
        assert_eq!(commands("micro.run=stats micro.run=echo:x"), vec!["echo:x"]);
        assert_eq!(
            commands("micro.run=,stats,,poweroff:1,"),
            vec!["stats", "poweroff:1"]
        );
    }

    #[test]
    fn quotes_and_whitespace() {
        assert_eq!(
            commands("a=\"x y\" micro.run=\"echo:a b,stats\" z"),
            vec!["echo:a b", "stats"]
        );
        assert_eq!(commands("\"micro.run=echo:q r\""), vec!["echo:q r"]);
        assert_eq!(commands("\t micro.run=stats\n"), vec!["stats"]);
        // An unterminated quote runs to the end of the line.
        assert_eq!(commands("micro.run=\"echo:a b"), vec!["echo:a b"]);
    }

    #[test]
    fn stops_at_nul() {
        assert_eq!(commands("micro.run=stats\0micro.run=echo:x"), vec!["stats"]);
    }

    #[test]
    fn params_yield_keys_and_values() {
        let all: Vec<_> = params(b"a=1 b c=\"2 3\" =4").collect();
        assert_eq!(
            all,
            vec![
                (&b"a"[..], &b"1"[..]),
                (&b"b"[..], &b""[..]),
                (&b"c"[..], &b"2 3"[..]),
                (&b""[..], &b"4"[..])
            ]
        );
        assert_eq!(param(b"x=1 x=2", b"x"), Some(&b"2"[..]));
        assert_eq!(param(b"x=1", b"y"), None);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = [0u8; 48];
        for _ in 0..20_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Bias towards the bytes the tokenizer cares about.
                *b = match x % 8 {
                    0 => b'"',
                    1 => b'=',
                    2 => b' ',
                    3 => b',',
                    _ => (x >> 8) as u8,
                };
            }
            let n = (x % 48) as usize;
            let _ = params(&buf[..n]).count();
            let _ = run_commands(&buf[..n]).count();
        }
    }
}
