//! Assembling serial input into request lines: bytes up to `\n`, `\r` dropped, lines longer
//! than the buffer reported as too long (their bytes are consumed up to the `\n`).

/// A line being assembled in a fixed buffer of `N` bytes.
pub struct LineReader<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflow: bool,
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
            buf: [0; N],
            len: 0,
            overflow: false,
        }
    }

    /// Takes one input byte; returns the line it completes, if any.
    pub fn push(&mut self, b: u8) -> Option<Line<'_>> {
        match b {
            b'\n' => {
                let (len, overflow) = (self.len, self.overflow);
                self.len = 0;
                self.overflow = false;
                Some(if overflow {
                    Line::TooLong
                } else {
                    Line::Done(&self.buf[..len])
                })
            }
            b'\r' => None,
            b => {
                if self.len < N {
                    self.buf[self.len] = b;
                    self.len += 1;
                } else {
                    self.overflow = true;
                }
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
