//! The guest's kernel command line: space-separated `key=value` words; the guest reads
//! `micro.run=CMD[,CMD…]` and ignores the rest (Linux-style).

/// The key naming the commands to run at start.
pub const RUN_KEY: &[u8] = b"micro.run=";

/// The commands listed in `micro.run=` (the last occurrence wins, as in Linux), in order.
pub fn run_commands(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    let value = cmdline
        .split(|c| c.is_ascii_whitespace())
        .filter_map(|w| w.strip_prefix(RUN_KEY))
        .next_back()
        .unwrap_or(b"");
    value.split(|&c| c == b',').filter(|c| !c.is_empty())
}

/// The command line as bytes up to its NUL terminator (at most `max` bytes).
pub fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_run_list() {
        let c: Vec<&[u8]> =
            run_commands(b"console=ttyS0 micro.run=primes:10,poweroff:0 quiet").collect();
        assert_eq!(c, [&b"primes:10"[..], b"poweroff:0"]);
        assert_eq!(run_commands(b"console=ttyS0").count(), 0);
        assert_eq!(run_commands(b"").count(), 0);
        let last: Vec<&[u8]> = run_commands(b"micro.run=a micro.run=b,,c").collect();
        assert_eq!(last, [&b"b"[..], b"c"]);
        assert_eq!(until_nul(b"abc\0def"), b"abc");
        assert_eq!(until_nul(b"abc"), b"abc");
    }
}
