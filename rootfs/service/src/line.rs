//! Assembling serial input into request lines: bytes up to `\n`, `\r` dropped, lines longer
//! than the buffer reported as too long (their bytes are consumed up to the `\n`).

use crate::FixedBuf;

/// A line being assembled in a fixed buffer of `N` bytes.
pub struct LineReader<const N: usize> {
    /// The line so far; truncated once it outgrew `N` bytes.
    line: FixedBuf<N>,
}

impl<const N: usize> Default for LineReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// What one input byte completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A whole line, without its `\n` (and without `\r`s).
    Done(&'a [u8]),
    /// A line longer than the buffer ended.
    TooLong,
}

impl<const N: usize> LineReader<N> {
    /// An empty reader.
    pub const fn new() -> Self {
        LineReader {
            line: FixedBuf::new(),
        }
    }

    /// Takes one input byte; returns the line it completes, if any.
    pub fn push(&mut self, b: u8) -> Option<Line<'_>> {
        match b {
            b'\n' => Some(self.line.take().map_or(Line::TooLong, Line::Done)),
            b'\r' => None,
            b => {
                self.line.push(b);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_lines_and_reports_long_ones() {
        let mut r = LineReader::<4>::new();
        let mut got = Vec::new();
        for &b in b"ab\r\ncdef\nghijk\n\nx" {
            match r.push(b) {
                Some(Line::Done(l)) => got.push(Some(l.to_vec())),
                Some(Line::TooLong) => got.push(None),
                None => {}
            }
        }
        assert_eq!(
            got,
            [
                Some(b"ab".to_vec()),
                Some(b"cdef".to_vec()),
                None,
                Some(vec![])
            ]
        );
        assert_eq!(r.push(b'\n'), Some(Line::Done(b"x")));
    }
}
