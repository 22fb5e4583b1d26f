//! Reading a trace: little-endian fields, the byte offset, and truncation told apart from
//! I/O errors. Callers cap every length before asking for the bytes.

use std::io::{ErrorKind, Read};

use super::error::TraceErrorKind;

/// A reader that knows its offset and what part of the file it is in.
#[derive(Debug)]
pub(crate) struct Input<R> {
    inner: R,
    pos: u64,
    part: &'static str,
}

impl<R: Read> Input<R> {
    /// Reads `inner` from offset 0.
    pub(crate) fn new(inner: R) -> Input<R> {
        Input {
            inner,
            pos: 0,
            part: "magic",
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn pos(&self) -> u64 {
        self.pos
    }

    /// Names the part being read, for truncation errors (`"header"`, `"record"`).
    pub(crate) fn set_part(&mut self, part: &'static str) {
        self.part = part;
    }

    /// Reads until `buf` is full or the data ends; returns the bytes read.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) -> Result<usize, TraceErrorKind> {
        let mut n = 0;
        while n < buf.len() {
            match self.inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    let k = k.min(buf.len() - n);
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(TraceErrorKind::Io {
                        kind: e.kind(),
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(n)
    }

    /// Fills `buf` or reports how many bytes were missing.
    pub(crate) fn exact(&mut self, buf: &mut [u8]) -> Result<(), TraceErrorKind> {
        let n = self.fill(buf)?;
        if n < buf.len() {
            return Err(TraceErrorKind::Truncated {
                what: self.part,
                needed: (buf.len() - n) as u64,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TraceErrorKind> {
        let mut b = [0u8; N];
        self.exact(&mut b)?;
        Ok(b)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, TraceErrorKind> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, TraceErrorKind> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, TraceErrorKind> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, TraceErrorKind> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// `n` bytes; the caller has capped `n`.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<Vec<u8>, TraceErrorKind> {
        let mut v = vec![0u8; n];
        self.exact(&mut v)?;
        Ok(v)
    }
}
