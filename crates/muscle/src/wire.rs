//! Bounds-checked little-endian reading and writing for the envelope.
//!
//! Every read names the field it is for, so a truncated or malformed blob is reported as
//! "field X at offset N", never as a panic. Only fixed-width integers reach the wire.

use crate::error::FormatError;

/// A cursor over untrusted bytes. Every read is bounds-checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Bytes consumed so far.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(FormatError::Truncated { field, offset: self.pos })?;
        let slice = self.bytes.get(self.pos..end).ok_or(FormatError::Truncated { field, offset: self.pos })?;
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FormatError> {
        let offset = self.pos;
        self.take(N, field)?.try_into().map_err(|_| FormatError::Truncated { field, offset })
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, FormatError> {
        Ok(u8::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A string prefixed by a one-byte length, checked against `max` and `is_valid`.
    pub(crate) fn short_str(
        &mut self,
        field: &'static str,
        max: usize,
        allow_empty: bool,
    ) -> Result<&'a str, FormatError> {
        let offset = self.pos;
        let len = usize::from(self.u8(field)?);
        if len > max || (len == 0 && !allow_empty) {
            return Err(FormatError::BadLength { field, offset, len: len as u64, max: max as u64 });
        }
        let raw = self.take(len, field)?;
        std::str::from_utf8(raw).map_err(|_| FormatError::NotUtf8 { field, offset })
    }
}

/// An append-only little-endian writer.
#[derive(Default)]
pub(crate) struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self { bytes: Vec::with_capacity(capacity) }
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.put(&v.to_le_bytes());
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }

    /// Writes a one-byte length and the string. Callers validate lengths first.
    pub(crate) fn short_str(&mut self, s: &str) {
        self.u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
        self.put(s.as_bytes());
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes from `from` to the end, for in-place encryption of what was just written.
    pub(crate) fn tail_mut(&mut self, from: usize) -> &mut [u8] {
        self.bytes.get_mut(from..).unwrap_or_default()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}
