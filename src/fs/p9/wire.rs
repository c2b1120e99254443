//! 9P wire format: little-endian integers, strings as a 16-bit length and bytes, every message
//! `size[4] type[1] tag[2] body`. Nothing here trusts a length: every read is checked against
//! what is left of the message.

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message ends at byte {at}, {need} more needed")]
    Short { at: usize, need: usize },
    #[error("message size field {size} does not match the {len} bytes received")]
    BadSize { size: u32, len: usize },
    #[error("{0} names in one walk (at most 16)")]
    TooManyNames(u16),
}

/// The header every message starts with.
pub const HEADER: usize = 7;

/// Qid types.
pub const QTDIR: u8 = 0x80;
pub const QTSYMLINK: u8 = 0x02;
pub const QTFILE: u8 = 0;

/// The server's unique identity of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qid {
    pub ty: u8,
    pub version: u32,
    pub path: u64,
}

/// Reads fields from a received message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(WireError::Short {
                at: self.pos,
                need: n - left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A 9P string: the raw bytes (names need not be UTF-8).
    pub fn str(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Splits a whole message into (type, tag, body), checking its size field.
pub fn split(msg: &[u8]) -> Result<(u8, u16, &[u8]), WireError> {
    let mut r = Reader::new(msg);
    let size = r.u32()?;
    let ty = r.u8()?;
    let tag = r.u16()?;
    if size as usize != msg.len() {
        return Err(WireError::BadSize {
            size,
            len: msg.len(),
        });
    }
    Ok((ty, tag, r.rest()))
}

/// Builds a reply in place: the size is filled in by [`Writer::finish`].
pub struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> Writer<'a> {
    /// Starts a reply of type `ty` to `tag`, appended to `buf`.
    pub fn new(buf: &'a mut Vec<u8>, ty: u8, tag: u16) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0, 0, 0, 0, ty]);
        buf.extend_from_slice(&tag.to_le_bytes());
        Writer { buf, start }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Strings longer than 65535 bytes are cut (no name or link target is that long).
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        let s = &s[..s.len().min(u16::MAX as usize)];
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s);
        self
    }
    pub fn qid(&mut self, q: &Qid) -> &mut Self {
        self.u8(q.ty).u32(q.version).u64(q.path)
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    /// The buffer, for callers that fill data in place (reads).
    pub fn buf(&mut self) -> &mut Vec<u8> {
        self.buf
    }
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes the size field.
    pub fn finish(self) {
        let size = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&size.to_le_bytes());
    }
}

/// The wire size of a string field.
pub fn str_len(s: &[u8]) -> usize {
    2 + s.len().min(u16::MAX as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_refuses_lengths_past_the_end() {
        let mut r = Reader::new(&[5, 0, b'a', b'b']);
        assert_eq!(r.str(), Err(WireError::Short { at: 2, need: 3 }));
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), Err(WireError::Short { at: 0, need: 1 }));
    }

    #[test]
    fn split_checks_the_size_field() {
        let mut v = Vec::new();
        let mut w = Writer::new(&mut v, 100, 0xffff);
        w.u32(8192).str(b"9P2000.L");
        w.finish();
        let (ty, tag, body) = split(&v).unwrap();
        assert_eq!((ty, tag, body.len()), (100, 0xffff, 4 + 2 + 8));
        let mut bad = v.clone();
        bad[0] += 1;
        assert_eq!(
            split(&bad),
            Err(WireError::BadSize {
                size: v.len() as u32 + 1,
                len: v.len()
            })
        );
        assert!(split(&v[..5]).is_err());
    }
}
