//! Reads a delta in place from its Avro binary encoding (`schemas/delta.avsc`).
//!
//! A device decodes every record of the deltas topic on its apply path. Through serde, that
//! decode cost as much as the SQLite write of the delta: every record field and union
//! branch is matched by its name, and every string is allocated. This reader walks the
//! schema's fields in their order and borrows each string from the record.
//!
//! It accepts exactly what [`super::codec::decode_delta`] (`serde_avro_fast` with the same
//! schema and limits) accepts, and reads the same values: the tests hold the two to the
//! same answers on generated deltas and on damaged bytes, and pin the schema's fields, so a
//! change of the schema fails them until this reader follows it. Any byte string gives a
//! delta or an error, never a panic.

use super::codec_error::{CodecError, MAX_ARRAY_LEN};
use super::view::{ColumnView, DeltaView, ValueView};
use super::DeltaOp;

/// Reads one delta; the record must end with it.
pub(super) fn read_delta(bytes: &[u8]) -> Result<DeltaView<'_>, CodecError> {
    let mut reader = Reader { rest: bytes };
    let delta = reader.delta().map_err(|reason| CodecError::Decode {
        what: "delta",
        reason: format!("{reason} (stopped at byte {})", bytes.len() - reader.rest.len()),
    })?;
    if !reader.rest.is_empty() {
        return Err(CodecError::Decode { what: "delta", reason: format!("{} bytes left after the record", reader.rest.len()) });
    }
    Ok(delta)
}

/// Why a record could not be read; the position is added by [`read_delta`].
type Reason = &'static str;

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The fields of `Delta`, in the schema's order (a struct expression evaluates its
    /// fields in the order they are written).
    fn delta(&mut self) -> Result<DeltaView<'a>, Reason> {
        Ok(DeltaView {
            table: self.string()?,
            op: self.op()?,
            key: self.columns()?,
            after: self.nullable(Self::columns)?,
            old_key: self.nullable(Self::columns)?,
            commit_lsn: self.long()?,
            lsn: self.long()?,
            xid: self.long()?,
            commit_ts: self.long()?,
            seq: self.long()?,
            instruction_id: self.nullable(Self::string)?,
        })
    }

    /// The fields of `Column`, in the schema's order.
    fn column(&mut self) -> Result<ColumnView<'a>, Reason> {
        Ok(ColumnView { name: self.string()?, type_name: self.string()?, value: self.value()?, unchanged: self.boolean()? })
    }

    /// The union `null | boolean | long | double | string | bytes`.
    fn value(&mut self) -> Result<ValueView<'a>, Reason> {
        Ok(match self.index()? {
            0 => ValueView::Null,
            1 => ValueView::Boolean(self.boolean()?),
            2 => ValueView::Long(self.long()?),
            3 => ValueView::Double(f64::from_le_bytes(self.fixed::<8>()?)),
            4 => ValueView::String(self.string()?),
            5 => ValueView::Bytes(self.bytes()?),
            _ => return Err("value union branch out of range"),
        })
    }

    /// The enum `DeltaOp`, by the position of its symbol.
    fn op(&mut self) -> Result<DeltaOp, Reason> {
        Ok(match self.index()? {
            0 => DeltaOp::Insert,
            1 => DeltaOp::Update,
            2 => DeltaOp::Delete,
            3 => DeltaOp::Truncate,
            4 => DeltaOp::Snapshot,
            5 => DeltaOp::Watermark,
            6 => DeltaOp::Drop,
            _ => return Err("op symbol out of range"),
        })
    }

    /// An array of `Column`: blocks of items, each led by its count (negative when the
    /// block's size in bytes follows), until a count of zero.
    fn columns(&mut self) -> Result<Vec<ColumnView<'a>>, Reason> {
        let mut columns = Vec::new();
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(columns);
            }
            if count < 0 {
                self.varint()?; // the block's size in bytes, not needed to read it
            }
            let count = usize::try_from(count.unsigned_abs()).map_err(|_| "array block too long")?;
            if count > MAX_ARRAY_LEN - columns.len() {
                return Err("array longer than allowed");
            }
            // A column takes at least 4 bytes: a hostile count reserves no more than the
            // record could hold.
            columns.reserve(count.min(self.rest.len() / 4));
            for _ in 0..count {
                columns.push(self.column()?);
            }
        }
    }

    /// A union of `null` and one other type.
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Result<T, Reason>) -> Result<Option<T>, Reason> {
        match self.index()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            _ => Err("union branch out of range"),
        }
    }

    /// A union branch or enum symbol.
    fn index(&mut self) -> Result<usize, Reason> {
        usize::try_from(self.long()?).map_err(|_| "negative union branch or enum symbol")
    }

    fn string(&mut self) -> Result<&'a str, Reason> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "string is not valid UTF-8")
    }

    fn bytes(&mut self) -> Result<&'a [u8], Reason> {
        let len = usize::try_from(self.long()?).map_err(|_| "negative length")?;
        if len > self.rest.len() {
            return Err("length past the end of the record");
        }
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(bytes)
    }

    fn boolean(&mut self) -> Result<bool, Reason> {
        match self.fixed::<1>()? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err("boolean is neither 0 nor 1"),
        }
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], Reason> {
        let Some((bytes, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err("record ends inside a value");
        };
        self.rest = rest;
        Ok(*bytes)
    }

    /// A zigzag-encoded variable-length `long`.
    fn long(&mut self) -> Result<i64, Reason> {
        let n = self.varint()?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    /// A variable-length integer: 7 bits a byte, least significant first, at most 10 bytes
    /// (the last one 0 or 1).
    fn varint(&mut self) -> Result<u64, Reason> {
        let mut n = 0u64;
        let mut rest = self.rest;
        for shift in (0..70).step_by(7) {
            let Some((&b, tail)) = rest.split_first() else { break };
            rest = tail;
            n |= u64::from(b & 0x7f) << shift;
            if shift == 63 && b > 1 {
                break; // past 64 bits
            }
            if b & 0x80 == 0 {
                self.rest = rest;
                return Ok(n);
            }
        }
        Err("integer runs past the end of the record or past 64 bits")
    }
}

#[cfg(test)]
#[path = "delta_reader_tests.rs"]
pub(super) mod tests;
