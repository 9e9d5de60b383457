//! A bounds-checked big-endian cursor over bytes that came from outside (pgoutput
//! payloads, backend messages of the replication connection).
//!
//! Every read checks the length first and fails with [`Truncated`] instead of panicking;
//! each decoder turns that into its own error, naming what it was reading.

/// The input ended before the value named `what` was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    pub what: &'static str,
}

/// Cursor over a byte slice; reads consume from the front.
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    buf: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        ByteReader { buf }
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Truncated> {
        let (head, rest) = self.buf.split_first_chunk::<N>().ok_or(Truncated { what })?;
        self.buf = rest;
        Ok(*head)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Truncated> {
        Ok(u8::from_be_bytes(self.array(what)?))
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn i16(&mut self, what: &'static str) -> Result<i16, Truncated> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Truncated> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, Truncated> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Truncated> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, Truncated> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], Truncated> {
        if len > self.buf.len() {
            return Err(Truncated { what });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// The bytes up to the next NUL, which is consumed but not returned.
    pub fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], Truncated> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(Truncated { what })?;
        let s = self.take(end, what)?;
        self.take(1, what)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = ByteReader::new(&[0, 1, 0, 0, 0, 2, b'a', 0, 9]);
        assert_eq!(r.u16("a"), Ok(1));
        assert_eq!(r.i32("b"), Ok(2));
        assert_eq!(r.cstr("c"), Ok(&b"a"[..]));
        assert_eq!(r.rest(), &[9]);
        assert_eq!(r.u16("d"), Err(Truncated { what: "d" }));
        assert_eq!(r.take(2, "e"), Err(Truncated { what: "e" }));
        assert_eq!(r.cstr("f"), Err(Truncated { what: "f" }));
        assert_eq!(r.u8("g"), Ok(9));
        assert_eq!(r.remaining(), 0);
    }
}
