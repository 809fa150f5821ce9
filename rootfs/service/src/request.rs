//! The serial request protocol: one request per line, one reply line per request.
//!
//! | request | reply |
//! | --- | --- |
//! | `primes N` | `ok primes N=<N> count=<π(N)> us=<compute µs>` |
//! | `echo TEXT` | `ok echo TEXT` |
//! | `stats` | `ok stats requests=<served> uptime_us=<µs> console=<virtio or com1>` |
//! | `poweroff [CODE]` | `ok poweroff code=<CODE>`, then the guest powers off |
//! | `load MIB` | `ok load mib=<MIB> sum=<wrapping sum of the entries> us=<µs>` (see [`crate::model`]) |
//! | `query I` | `ok query i=<I> value=<entry I>`, or `err` when I is beyond the loaded table |
//! | `health` | `ok health` |
//! | `get I` | `ok get i=<I> value=<entry I of the disk table>` (see [`crate::table`]) |
//! | `put I V` | `ok put i=<I> value=<V>` once entry I of the disk table holds V (written and flushed) |
//! | `disk` | `ok disk sectors=<S> ro=<0\|1> magic=<CLDTABLE\|none> entries=<C>` |
//! | `scan FIRST_SECTOR SECTORS REQ_KIB` | `ok scan sectors=<N> req_kib=<K> sum=<checksum> us=<µs>`: the disk range read in `REQ_KIB` KiB requests (see [`crate::scan`]) |
//! | `net` | `ok net mac=<MAC> ip=<A.B.C.D/N\|none> port=<P>` |
//! | `incr` | `ok incr n=<the counter after adding 1>` (a counter in RAM) |
//! | `count` | `ok count n=<the counter>` |
//! | `fill MIB` | `ok fill mib=<MIB> sum=<wrapping sum of the words> us=<µs>`: the base content (see [`crate::ram`]) |
//! | `dirty [RATE]` | `ok dirty rate=<pages/s> pages=<page writes since boot>`; RATE sets the steady dirtier's rate (0 stops it) |
//! | `check` | `ok check fill_mib=<F> fill_sum=<sum of the base content> model_mib=<M> model_sum=<sum of the model table>` |
//! | anything else | `err <reason>` |
//!
//! The same requests come from the kernel command line (`micro.run=`), where `:` separates a
//! command from its argument instead of a space.

use crate::primes::MAX_N;

/// A parsed request; `Echo` borrows its text from the input line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Count the primes ≤ N.
    Primes(u64),
    /// Send the text back.
    Echo(&'a [u8]),
    /// Report counters.
    Stats,
    /// Power off with this code.
    Poweroff(u8),
    /// Build the model table of this many MiB.
    Load(u64),
    /// Read entry I of the model table.
    Query(u64),
    /// Liveness check.
    Health,
    /// Read entry I of the disk table.
    Get(u64),
    /// Write entry I of the disk table: (I, V).
    Put(u64, u64),
    /// Describe the disk.
    Disk,
    /// Describe the network interface.
    Net,
    /// Read `sectors` sectors of the disk from `first` in requests of `req_kib` KiB.
    Scan {
        /// First sector.
        first: u64,
        /// Sectors to read (≥ 1).
        sectors: u64,
        /// Request size in KiB (see [`crate::scan::valid_req_kib`]).
        req_kib: u64,
    },
    /// Add 1 to the RAM counter.
    Incr,
    /// Read the RAM counter.
    Count,
    /// Write this many MiB of base content (see [`crate::ram`]).
    Fill(u64),
    /// Set the dirtier's rate (pages per second; 0 stops it), or just report it (`None`).
    Dirty(Option<u64>),
    /// Sum the base content and the model table as they are in RAM now.
    Check,
}

/// Why a request line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError<'a> {
    /// Blank line.
    Empty,
    /// Unknown command word.
    UnknownCommand(&'a [u8]),
    /// A number that does not parse or is out of range.
    BadNumber(&'a [u8]),
    /// A required argument is missing.
    MissingArgument(&'static str),
    /// An argument given to a command that takes none (or one too many).
    UnexpectedArgument(&'a [u8]),
    /// A number outside what the command allows: (the argument, what is allowed).
    OutOfRange(&'a [u8], &'static str),
}

impl core::fmt::Display for ParseError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        fn text(b: &[u8]) -> &str {
            core::str::from_utf8(b).unwrap_or("<not UTF-8>")
        }
        match self {
            ParseError::Empty => write!(f, "empty request"),
            ParseError::UnknownCommand(c) => write!(
                f,
                "unknown command '{}' (try primes, echo, stats, load, query, health, get, put, disk, scan, net, incr, count, fill, dirty, check, poweroff)",
                text(c)
            ),
            ParseError::BadNumber(n) => write!(f, "bad number '{}'", text(n)),
            ParseError::MissingArgument(what) => write!(f, "missing argument: {what}"),
            ParseError::UnexpectedArgument(a) => write!(f, "unexpected argument '{}'", text(a)),
            ParseError::OutOfRange(a, allowed) => {
                write!(f, "bad argument '{}': {allowed}", text(a))
            }
        }
    }
}

fn no_argument<'a>(arg: Option<&'a [u8]>, r: Request<'a>) -> Result<Request<'a>, ParseError<'a>> {
    match arg {
        None => Ok(r),
        Some(a) => Err(ParseError::UnexpectedArgument(a)),
    }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

/// Splits `arg` into exactly `N` words separated by `sep` or whitespace; `usage` names them
/// for the error when there are fewer, the first extra word is the error when there are more.
fn words<'a, const N: usize>(
    arg: Option<&'a [u8]>,
    sep: u8,
    usage: &'static str,
) -> Result<[&'a [u8]; N], ParseError<'a>> {
    let mut rest = arg.ok_or(ParseError::MissingArgument(usage))?;
    let mut out = [&b""[..]; N];
    for w in out.iter_mut() {
        rest = trim(rest);
        if rest.is_empty() {
            return Err(ParseError::MissingArgument(usage));
        }
        let end = rest
            .iter()
            .position(|&c| c == sep || c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        *w = &rest[..end];
        rest = &rest[end..];
        if let [_, after @ ..] = rest {
            rest = after;
        }
    }
    let rest = trim(rest);
    if rest.is_empty() {
        Ok(out)
    } else {
        let end = rest
            .iter()
            .position(|&c| c == sep || c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        Err(ParseError::UnexpectedArgument(&rest[..end]))
    }
}

/// Parses a decimal number no larger than `max`.
pub fn parse_number(b: &[u8], max: u64) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    (v <= max).then_some(v)
}

impl<'a> Request<'a> {
    /// Parses `line`, where `sep` separates the command from its argument (`b' '` on the
    /// serial console, `b':'` on the command line).
    pub fn parse(line: &'a [u8], sep: u8) -> Result<Self, ParseError<'a>> {
        let line = trim(line);
        if line.is_empty() {
            return Err(ParseError::Empty);
        }
        let (cmd, arg) = match line.iter().position(|&c| c == sep) {
            Some(i) => (&line[..i], Some(trim(&line[i + 1..]))),
            None => (line, None),
        };
        let arg = arg.filter(|a| !a.is_empty());
        match cmd {
            b"primes" => {
                let a = arg.ok_or(ParseError::MissingArgument("primes N"))?;
                parse_number(a, MAX_N)
                    .map(Request::Primes)
                    .ok_or(ParseError::BadNumber(a))
            }
            b"echo" => Ok(Request::Echo(arg.unwrap_or(b""))),
            b"stats" => no_argument(arg, Request::Stats),
            b"poweroff" => match arg {
                None => Ok(Request::Poweroff(0)),
                Some(a) => parse_number(a, 255)
                    .map(|c| Request::Poweroff(c as u8))
                    .ok_or(ParseError::BadNumber(a)),
            },
            b"load" => {
                let a = arg.ok_or(ParseError::MissingArgument("load MIB"))?;
                parse_number(a, crate::model::MAX_MODEL_MIB)
                    .filter(|&m| m > 0)
                    .map(Request::Load)
                    .ok_or(ParseError::BadNumber(a))
            }
            b"query" => {
                let a = arg.ok_or(ParseError::MissingArgument("query I"))?;
                parse_number(a, u64::MAX)
                    .map(Request::Query)
                    .ok_or(ParseError::BadNumber(a))
            }
            b"health" => no_argument(arg, Request::Health),
            b"disk" => no_argument(arg, Request::Disk),
            b"net" => no_argument(arg, Request::Net),
            b"get" => {
                let a = arg.ok_or(ParseError::MissingArgument("get I"))?;
                parse_number(a, u64::MAX)
                    .map(Request::Get)
                    .ok_or(ParseError::BadNumber(a))
            }
            b"put" => {
                let a = arg.ok_or(ParseError::MissingArgument("put I V"))?;
                let split = a
                    .iter()
                    .position(|&c| c == sep || c.is_ascii_whitespace())
                    .ok_or(ParseError::MissingArgument("put I V"))?;
                let (i, v) = (&a[..split], trim(&a[split + 1..]));
                let i = parse_number(i, u64::MAX).ok_or(ParseError::BadNumber(i))?;
                let v = parse_number(v, u64::MAX).ok_or(ParseError::BadNumber(v))?;
                Ok(Request::Put(i, v))
            }
            b"scan" => {
                let [f, n, k] = words::<3>(arg, sep, "scan FIRST_SECTOR SECTORS REQ_KIB")?;
                let first = parse_number(f, u64::MAX).ok_or(ParseError::BadNumber(f))?;
                let sectors = parse_number(n, u64::MAX).ok_or(ParseError::BadNumber(n))?;
                if sectors == 0 {
                    return Err(ParseError::OutOfRange(n, "SECTORS must be at least 1"));
                }
                let req_kib = parse_number(k, u64::MAX).ok_or(ParseError::BadNumber(k))?;
                if !crate::scan::valid_req_kib(req_kib) {
                    return Err(ParseError::OutOfRange(
                        k,
                        "REQ_KIB must be a multiple of 4 from 4 to 64",
                    ));
                }
                Ok(Request::Scan {
                    first,
                    sectors,
                    req_kib,
                })
            }
            b"incr" => no_argument(arg, Request::Incr),
            b"count" => no_argument(arg, Request::Count),
            b"check" => no_argument(arg, Request::Check),
            b"fill" => {
                let [a] = words::<1>(arg, sep, "fill MIB")?;
                parse_number(a, crate::ram::MAX_FILL_MIB)
                    .filter(|&m| m > 0)
                    .map(Request::Fill)
                    .ok_or(ParseError::BadNumber(a))
            }
            b"dirty" => match arg {
                None => Ok(Request::Dirty(None)),
                Some(_) => {
                    let [a] = words::<1>(arg, sep, "dirty [RATE]")?;
                    let rate = parse_number(a, u64::MAX).ok_or(ParseError::BadNumber(a))?;
                    if rate > crate::ram::MAX_DIRTY_RATE {
                        return Err(ParseError::OutOfRange(
                            a,
                            "RATE is pages per second, at most 1000000",
                        ));
                    }
                    Ok(Request::Dirty(Some(rate)))
                }
            },
            other => Err(ParseError::UnknownCommand(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed<'a> = Result<Request<'a>, ParseError<'a>>;

    /// A malformed number.
    fn bad(arg: &[u8]) -> Parsed<'_> {
        Err(ParseError::BadNumber(arg))
    }

    /// An argument too many.
    fn extra(arg: &[u8]) -> Parsed<'_> {
        Err(ParseError::UnexpectedArgument(arg))
    }

    /// An argument missing; `usage` is the request's form.
    fn missing(usage: &'static str) -> Parsed<'static> {
        Err(ParseError::MissingArgument(usage))
    }

    /// Checks that each line, split at its separator, parses to its expected result.
    fn check(cases: &[(&[u8], u8, Parsed)]) {
        for &(line, sep, want) in cases {
            let text = core::str::from_utf8(line);
            assert_eq!(Request::parse(line, sep), want, "{text:?}");
        }
    }

    #[test]
    fn parses_every_request() {
        check(&[
            (b"primes 100", b' ', Ok(Request::Primes(100))),
            (b"  primes   7 \r", b' ', Ok(Request::Primes(7))),
            (b"primes:1000000", b':', Ok(Request::Primes(1_000_000))),
            (b"echo hi there", b' ', Ok(Request::Echo(b"hi there"))),
            (b"echo", b' ', Ok(Request::Echo(b""))),
            (b"stats", b' ', Ok(Request::Stats)),
            (b"poweroff", b' ', Ok(Request::Poweroff(0))),
            (b"poweroff 7", b' ', Ok(Request::Poweroff(7))),
            (b"poweroff:255", b':', Ok(Request::Poweroff(255))),
            (b"load 16", b' ', Ok(Request::Load(16))),
            (b"load 0", b' ', bad(b"0")),
            (b"load 5000", b' ', bad(b"5000")),
            (b"query 12345", b' ', Ok(Request::Query(12345))),
            (b"query", b' ', missing("query I")),
            // Disk and network.
            (b"health", b' ', Ok(Request::Health)),
            (b"disk", b' ', Ok(Request::Disk)),
            (b"net", b' ', Ok(Request::Net)),
            (b"get 42", b' ', Ok(Request::Get(42))),
            (b"get:42", b':', Ok(Request::Get(42))),
            (b"put 3 99", b' ', Ok(Request::Put(3, 99))),
            (
                b"put  3   18446744073709551615 ",
                b' ',
                Ok(Request::Put(3, u64::MAX)),
            ),
            (b"put:3:99", b':', Ok(Request::Put(3, 99))),
            (b"put 3", b' ', missing("put I V")),
            (b"put 3 x", b' ', bad(b"x")),
            (b"put 3 4 5", b' ', bad(b"4 5")),
            (b"health now", b' ', extra(b"now")),
            (b"get", b' ', missing("get I")),
            // The handoff scenario.
            (b"incr", b' ', Ok(Request::Incr)),
            (b"count", b' ', Ok(Request::Count)),
            (b"check", b' ', Ok(Request::Check)),
            (b"incr 2", b' ', extra(b"2")),
            (b"count x", b' ', extra(b"x")),
            (b"fill 64", b' ', Ok(Request::Fill(64))),
            (b"fill:64", b':', Ok(Request::Fill(64))),
            (b"fill", b' ', missing("fill MIB")),
            (b"fill 0", b' ', bad(b"0")),
            (b"fill 4097", b' ', bad(b"4097")),
            (b"fill 64 1", b' ', extra(b"1")),
            (b"dirty", b' ', Ok(Request::Dirty(None))),
            (b"dirty 2000", b' ', Ok(Request::Dirty(Some(2000)))),
            (b" dirty   0 ", b' ', Ok(Request::Dirty(Some(0)))),
            (b"dirty:500", b':', Ok(Request::Dirty(Some(500)))),
            (b"dirty 1000000", b' ', Ok(Request::Dirty(Some(1_000_000)))),
            (b"dirty fast", b' ', bad(b"fast")),
            (b"dirty 1 2", b' ', extra(b"2")),
            (
                b"dirty 1000001",
                b' ',
                Err(ParseError::OutOfRange(
                    b"1000001",
                    "RATE is pages per second, at most 1000000",
                )),
            ),
        ]);
    }

    #[test]
    fn parses_scan() {
        let scan = |first, sectors, req_kib| {
            Ok(Request::Scan {
                first,
                sectors,
                req_kib,
            })
        };
        check(&[
            (b"scan 0 131072 4", b' ', scan(0, 131_072, 4)),
            (b"scan 8 16 64", b' ', scan(8, 16, 64)),
            (b"  scan  1   2 \t 12 \r", b' ', scan(1, 2, 12)),
            (b"scan:0:128:64", b':', scan(0, 128, 64)),
            (b"scan 18446744073709551615 1 4", b' ', scan(u64::MAX, 1, 4)),
        ]);
        for k in [4u64, 8, 60, 64] {
            let line = format!("scan 0 1 {k}");
            assert_eq!(Request::parse(line.as_bytes(), b' '), scan(0, 1, k));
        }
        let usage = missing("scan FIRST_SECTOR SECTORS REQ_KIB");
        check(&[
            (b"scan", b' ', usage),
            (b"scan 0", b' ', usage),
            (b"scan 0 8", b' ', usage),
            (b"scan:0:8", b':', usage),
            (b"scan 0 8 4 9", b' ', extra(b"9")),
            (b"scan:0:8:4:9", b':', extra(b"9")),
            (b"scan x 8 4", b' ', bad(b"x")),
            (b"scan 0 -8 4", b' ', bad(b"-8")),
            (b"scan 0 8 4k", b' ', bad(b"4k")),
            (
                b"scan 0 0 4",
                b' ',
                Err(ParseError::OutOfRange(b"0", "SECTORS must be at least 1")),
            ),
        ]);
        for k in ["0", "2", "6", "63", "68", "128", "99999999999"] {
            let line = format!("scan 0 8 {k}");
            assert_eq!(
                Request::parse(line.as_bytes(), b' '),
                Err(ParseError::OutOfRange(
                    k.as_bytes(),
                    "REQ_KIB must be a multiple of 4 from 4 to 64"
                )),
                "{line}"
            );
        }
        assert_eq!(
            format!(
                "{}",
                ParseError::OutOfRange(b"6", "REQ_KIB must be a multiple of 4 from 4 to 64")
            ),
            "bad argument '6': REQ_KIB must be a multiple of 4 from 4 to 64"
        );
    }

    #[test]
    fn refuses_bad_requests_with_reasons() {
        check(&[
            (b"", b' ', Err(ParseError::Empty)),
            (b"   ", b' ', Err(ParseError::Empty)),
            (b"frob", b' ', Err(ParseError::UnknownCommand(b"frob"))),
            (b"primes", b' ', missing("primes N")),
            (b"primes x", b' ', bad(b"x")),
            (b"primes -1", b' ', bad(b"-1")),
            (b"primes 10000000001", b' ', bad(b"10000000001")),
            (
                b"primes 99999999999999999999999",
                b' ',
                bad(b"99999999999999999999999"),
            ),
            (b"poweroff 256", b' ', bad(b"256")),
            (b"stats now", b' ', extra(b"now")),
        ]);
        let msg = format!("{}", ParseError::UnknownCommand(b"frob"));
        assert!(msg.starts_with("unknown command 'frob'"));
        assert_eq!(format!("{}", ParseError::BadNumber(b"x")), "bad number 'x'");
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A deterministic pseudo-random walk over short byte strings.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            let mut line = [0u8; 24];
            let len = (x % 24) as usize;
            for b in line.iter_mut().take(len) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                const ALPHABET: &[u8] =
                    b"primes echo stats poweroff put get scan 0123456789 :\xff\x00";
                *b = ALPHABET[(x as usize) % ALPHABET.len()];
            }
            let _ = Request::parse(&line[..len], b' ');
            let _ = Request::parse(&line[..len], b':');
        }
    }
}
