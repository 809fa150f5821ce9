//! A `core::fmt::Write` sink over a fixed byte array: formatting never allocates and never
//! fails; output beyond the capacity is cut and marked as truncated.

/// A fixed-capacity byte buffer.
pub struct FixedBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> Default for FixedBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FixedBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        FixedBuf {
            buf: [0; N],
            len: 0,
            truncated: false,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// True when some output did not fit.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Empties the buffer.
    pub fn clear(&mut self) {
        self.len = 0;
        self.truncated = false;
    }

    /// Appends one byte, or marks the buffer truncated when it is full.
    pub fn push(&mut self, b: u8) {
        match self.buf.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.truncated = true,
        }
    }

    /// Empties the buffer; returns what it held, or `None` when bytes were cut.
    pub fn take(&mut self) -> Option<&[u8]> {
        let (len, truncated) = (self.len, self.truncated);
        self.clear();
        (!truncated).then_some(&self.buf[..len])
    }

    /// Appends raw bytes (cut at the capacity).
    pub fn push_bytes(&mut self, b: &[u8]) {
        let room = N - self.len;
        let n = room.min(b.len());
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        if n < b.len() {
            self.truncated = true;
        }
    }
}

impl<const N: usize> core::fmt::Write for FixedBuf<N> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_and_truncates() {
        let mut b = FixedBuf::<8>::new();
        write!(b, "ab{}", 12).unwrap();
        assert_eq!(b.as_bytes(), b"ab12");
        write!(b, "3456789").unwrap();
        assert_eq!(b.as_bytes(), b"ab123456");
        assert!(b.truncated());
        b.clear();
        assert_eq!(b.as_bytes(), b"");
        assert!(!b.truncated());
        write!(b, "xy").unwrap();
        assert_eq!(b.take(), Some(&b"xy"[..]));
        write!(b, "123456789").unwrap();
        assert_eq!(b.take(), None);
        assert_eq!(b.take(), Some(&b""[..]));
    }
}
