//! Assembling serial input into request lines.
//!
//! A line ends at `\n` or `\r` (so `\r\n`, `\n` and a bare `\r` from a terminal all work);
//! empty lines are skipped. A line longer than the buffer is dropped whole and reported once,
//! when its terminator arrives, as [`LineEvent::TooLong`].

/// What a byte completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineEvent<'a> {
    /// A complete, non-empty line, without its terminator.
    Line(&'a [u8]),
    /// A line that did not fit in the buffer ended; its bytes were dropped.
    TooLong,
}

/// Line assembler with room for `N` bytes per line.
#[derive(Clone, Debug)]
pub struct LineReader<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflowed: bool,
}

impl<const N: usize> LineReader<N> {
    /// An empty reader.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            overflowed: false,
        }
    }

    /// Feeds one input byte; returns the event it completes, if any.
    pub fn push(&mut self, byte: u8) -> Option<LineEvent<'_>> {
        if byte == b'\n' || byte == b'\r' {
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.overflowed) {
                return Some(LineEvent::TooLong);
            }
            return (len > 0).then(|| LineEvent::Line(&self.buf[..len]));
        }
        if self.len < N {
            self.buf[self.len] = byte;
            self.len += 1;
        } else {
            self.overflowed = true;
        }
        None
    }
}

impl<const N: usize> Default for LineReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed<const N: usize>(reader: &mut LineReader<N>, input: &[u8]) -> Vec<Option<Vec<u8>>> {
        let mut events = Vec::new();
        for &b in input {
            match reader.push(b) {
                Some(LineEvent::Line(l)) => events.push(Some(l.to_vec())),
                Some(LineEvent::TooLong) => events.push(None),
                None => {}
            }
        }
        events
    }

    #[test]
    fn splits_lines_on_any_terminator() {
        let mut r = LineReader::<16>::new();
        let events = feed(&mut r, b"echo a\nstats\r\n\r\nx\rpartial");
        assert_eq!(
            events,
            vec![
                Some(b"echo a".to_vec()),
                Some(b"stats".to_vec()),
                Some(b"x".to_vec())
            ]
        );
        assert_eq!(feed(&mut r, b"\n"), vec![Some(b"partial".to_vec())]);
    }

    #[test]
    fn drops_long_lines_whole() {
        let mut r = LineReader::<4>::new();
        assert_eq!(feed(&mut r, b"abcd\n"), vec![Some(b"abcd".to_vec())]);
        assert_eq!(
            feed(&mut r, b"abcdefgh\nok\n"),
            vec![None, Some(b"ok".to_vec())]
        );
        // A long line ended by \r\n is reported once.
        assert_eq!(
            feed(&mut r, b"abcdefgh\r\nok\n"),
            vec![None, Some(b"ok".to_vec())]
        );
    }
}
