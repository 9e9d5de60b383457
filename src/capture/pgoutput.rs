//! Decoder for the payloads of PostgreSQL's `pgoutput` logical decoding
//! plugin, protocol version 1 (see "Logical Replication Message Formats" in
//! the PostgreSQL documentation).
//!
//! The decoder is pure: it takes the bytes carried by one XLogData message
//! and returns one [`PgOutputMessage`]. Input comes from the network, so
//! every read is bounds-checked and malformed or truncated input yields a
//! [`DecodeError`], never a panic. Trailing bytes after a complete message
//! are an error as well: they mean the framing is not what version 1
//! describes.
//!
//! Streaming (`S`, `E`, `c`, `A`) and two-phase messages belong to later
//! protocol versions and are reported as [`DecodeError::UnknownTag`].
//!
//! Column values of [`SHARED_VALUE_BYTES`] or more are not copied: they are slices of the
//! payload's own buffer. A 100 MB `bytea` arrives as 200 MB of hex text; copying it would
//! hold both, and once the payload is dropped the slice owns the buffer alone, so that
//! [`crate::contract::value::bytea_from_hex_in_place`] can decode it where it lies.

use bytes::Bytes;

use crate::byte_reader::{ByteReader, Truncated};

/// Values at least this long share the payload's buffer; shorter ones are copied, so that a
/// large value is the only handle on that buffer once the payload is gone.
pub const SHARED_VALUE_BYTES: usize = 64 * 1024;

/// A WAL position (log sequence number).
pub type Lsn = u64;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum PgOutputMessage {
    /// Start of a transaction. `commit_ts` is in microseconds since
    /// 2000-01-01 00:00:00 UTC.
    Begin {
        final_lsn: Lsn,
        commit_ts: i64,
        xid: u32,
    },
    /// End of a transaction. `end_lsn` is the position to confirm as flushed
    /// once everything up to and including this transaction is durable.
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_ts: i64,
    },
    /// Replication origin of the transaction that follows.
    Origin {
        commit_lsn: Lsn,
        name: String,
    },
    /// Description of a table; sent before the first change of that table in
    /// a session and again whenever its definition changes.
    Relation(Relation),
    /// Description of a non built-in data type used by a following relation.
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation_id: u32,
        new: Vec<TupleValue>,
    },
    /// `old` is present when the replica identity columns changed (`Key`) or
    /// the table has `REPLICA IDENTITY FULL` (`Full`).
    Update {
        relation_id: u32,
        old: Option<OldTuple>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation_id: u32,
        old: OldTuple,
    },
    /// `options`: bit 1 = CASCADE, bit 2 = RESTART IDENTITY.
    Truncate {
        options: u8,
        relation_ids: Vec<u32>,
    },
    /// A message emitted with `pg_logical_emit_message`.
    Message {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// The old row image carried by Update and Delete messages.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// Only the replica identity (key) columns are meaningful; the others
    /// are `Null` (marker `K`).
    Key(Vec<TupleValue>),
    /// The full old row (marker `O`, `REPLICA IDENTITY FULL`).
    Full(Vec<TupleValue>),
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    Null,
    /// A TOASTed value that did not change; its content is not sent.
    UnchangedToast,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in the type's binary format.
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    /// The column is part of the replica identity.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Why a payload could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput payload")]
    Empty,
    #[error("unknown pgoutput message tag {tag:#04x} ({desc})", tag = .0, desc = describe_tag(*.0))]
    UnknownTag(u8),
    #[error("pgoutput payload truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("pgoutput {what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("pgoutput {what} has invalid length {len}")]
    InvalidLength { what: &'static str, len: i64 },
    #[error("unknown pgoutput tuple column kind {0:#04x}")]
    UnknownColumnKind(u8),
    #[error("unexpected marker {found:#04x} in pgoutput {what}, expected {expected}")]
    UnexpectedMarker { what: &'static str, expected: &'static str, found: u8 },
    #[error("{count} unexpected trailing bytes after pgoutput {what} message")]
    TrailingBytes { what: &'static str, count: usize },
}

fn describe_tag(tag: u8) -> &'static str {
    match tag {
        b'S' | b'E' | b'c' | b'A' => "streaming message; only protocol version 1 is supported",
        b'b' | b'P' | b'K' | b'r' | b'p' => "two-phase message; only protocol version 1 is supported",
        _ => "not part of protocol version 1",
    }
}

/// Decodes one pgoutput payload (the data of one XLogData message).
pub fn decode(payload: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let mut r = ByteReader::new(payload);
    let tag = r.u8("message tag").map_err(|_| DecodeError::Empty)?;
    let (what, msg) = match tag {
        b'B' => ("Begin", decode_begin(&mut r)?),
        b'C' => ("Commit", decode_commit(&mut r)?),
        b'O' => ("Origin", decode_origin(&mut r)?),
        b'R' => ("Relation", decode_relation(&mut r)?),
        b'Y' => ("Type", decode_type(&mut r)?),
        b'I' => ("Insert", decode_insert(&mut r, payload)?),
        b'U' => ("Update", decode_update(&mut r, payload)?),
        b'D' => ("Delete", decode_delete(&mut r, payload)?),
        b'T' => ("Truncate", decode_truncate(&mut r)?),
        b'M' => ("Message", decode_message(&mut r)?),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    expect_end(&r, what)?;
    Ok(msg)
}

fn decode_begin(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Begin {
        final_lsn: r.u64("Begin final LSN")?,
        commit_ts: r.i64("Begin commit timestamp")?,
        xid: r.u32("Begin xid")?,
    })
}

fn decode_commit(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Commit {
        flags: r.u8("Commit flags")?,
        commit_lsn: r.u64("Commit LSN")?,
        end_lsn: r.u64("Commit end LSN")?,
        commit_ts: r.i64("Commit timestamp")?,
    })
}

fn decode_origin(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Origin { commit_lsn: r.u64("Origin commit LSN")?, name: text(r, "Origin name")? })
}

fn decode_relation(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let id = r.u32("Relation id")?;
    let namespace = text(r, "Relation namespace")?;
    let name = text(r, "Relation name")?;
    let replica_identity = r.u8("Relation replica identity")?;
    let ncols = r.u16("Relation column count")?;
    // Each column needs at least 10 bytes; never trust the count for the
    // allocation size.
    let mut columns = Vec::with_capacity(usize::from(ncols).min(r.remaining() / 10));
    for _ in 0..ncols {
        let flags = r.u8("Relation column flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 != 0,
            name: text(r, "Relation column name")?,
            type_oid: r.u32("Relation column type OID")?,
            type_modifier: r.i32("Relation column type modifier")?,
        });
    }
    Ok(PgOutputMessage::Relation(Relation { id, namespace, name, replica_identity, columns }))
}

fn decode_type(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    Ok(PgOutputMessage::Type { oid: r.u32("Type OID")?, namespace: text(r, "Type namespace")?, name: text(r, "Type name")? })
}

fn decode_insert(r: &mut ByteReader<'_>, src: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let relation_id = r.u32("Insert relation id")?;
    let marker = r.u8("Insert tuple marker")?;
    if marker != b'N' {
        return Err(DecodeError::UnexpectedMarker { what: "Insert", expected: "'N'", found: marker });
    }
    Ok(PgOutputMessage::Insert { relation_id, new: decode_tuple(r, src)? })
}

fn decode_update(r: &mut ByteReader<'_>, src: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let relation_id = r.u32("Update relation id")?;
    let mut marker = r.u8("Update tuple marker")?;
    let old = match marker {
        b'K' => Some(OldTuple::Key(decode_tuple(r, src)?)),
        b'O' => Some(OldTuple::Full(decode_tuple(r, src)?)),
        _ => None,
    };
    if old.is_some() {
        marker = r.u8("Update new tuple marker")?;
    }
    if marker != b'N' {
        return Err(DecodeError::UnexpectedMarker {
            what: "Update",
            expected: if old.is_some() { "'N'" } else { "'K', 'O' or 'N'" },
            found: marker,
        });
    }
    Ok(PgOutputMessage::Update { relation_id, old, new: decode_tuple(r, src)? })
}

fn decode_delete(r: &mut ByteReader<'_>, src: &Bytes) -> Result<PgOutputMessage, DecodeError> {
    let relation_id = r.u32("Delete relation id")?;
    let old = match r.u8("Delete tuple marker")? {
        b'K' => OldTuple::Key(decode_tuple(r, src)?),
        b'O' => OldTuple::Full(decode_tuple(r, src)?),
        found => return Err(DecodeError::UnexpectedMarker { what: "Delete", expected: "'K' or 'O'", found }),
    };
    Ok(PgOutputMessage::Delete { relation_id, old })
}

fn decode_truncate(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let count = r.i32("Truncate relation count")?;
    let count = usize::try_from(count)
        .map_err(|_| DecodeError::InvalidLength { what: "Truncate relation count", len: i64::from(count) })?;
    let options = r.u8("Truncate options")?;
    let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        relation_ids.push(r.u32("Truncate relation id")?);
    }
    Ok(PgOutputMessage::Truncate { options, relation_ids })
}

fn decode_message(r: &mut ByteReader<'_>) -> Result<PgOutputMessage, DecodeError> {
    let flags = r.u8("Message flags")?;
    let lsn = r.u64("Message LSN")?;
    let prefix = text(r, "Message prefix")?;
    let len = len_i32(r, "Message content length")?;
    let content = r.take(len, "Message content")?.to_vec();
    Ok(PgOutputMessage::Message { transactional: flags & 1 != 0, lsn, prefix, content })
}

fn decode_tuple(r: &mut ByteReader<'_>, src: &Bytes) -> Result<Vec<TupleValue>, DecodeError> {
    let ncols = r.u16("tuple column count")?;
    let mut values = Vec::with_capacity(usize::from(ncols).min(r.remaining()));
    for _ in 0..ncols {
        let value = match r.u8("tuple column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let len = len_i32(r, "text column length")?;
                TupleValue::Text(value_bytes(src, r.take(len, "text column value")?))
            }
            b'b' => {
                let len = len_i32(r, "binary column length")?;
                TupleValue::Binary(value_bytes(src, r.take(len, "binary column value")?))
            }
            other => return Err(DecodeError::UnknownColumnKind(other)),
        };
        values.push(value);
    }
    Ok(values)
}

impl From<Truncated> for DecodeError {
    fn from(t: Truncated) -> Self {
        DecodeError::Truncated { what: t.what }
    }
}

/// A non-negative Int32 length.
/// `value`, a part of `src`: shared when large, copied otherwise ([`SHARED_VALUE_BYTES`]).
fn value_bytes(src: &Bytes, value: &[u8]) -> Bytes {
    if value.len() >= SHARED_VALUE_BYTES {
        src.slice_ref(value)
    } else {
        Bytes::copy_from_slice(value)
    }
}

fn len_i32(r: &mut ByteReader<'_>, what: &'static str) -> Result<usize, DecodeError> {
    let len = r.i32(what)?;
    usize::try_from(len).map_err(|_| DecodeError::InvalidLength { what, len: i64::from(len) })
}

/// A NUL-terminated UTF-8 string.
fn text(r: &mut ByteReader<'_>, what: &'static str) -> Result<String, DecodeError> {
    let s = r.cstr(what)?;
    std::str::from_utf8(s).map(str::to_owned).map_err(|_| DecodeError::InvalidUtf8 { what })
}

fn expect_end(r: &ByteReader<'_>, what: &'static str) -> Result<(), DecodeError> {
    match r.remaining() {
        0 => Ok(()),
        count => Err(DecodeError::TrailingBytes { what, count }),
    }
}

#[cfg(test)]
#[path = "pgoutput_tests.rs"]
mod tests;
