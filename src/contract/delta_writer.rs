//! Writes a delta in its Avro binary encoding (`schemas/delta.avsc`).
//!
//! Capture encodes every change it publishes. Through serde, the encoding took about a
//! fifth of capture's CPU per change: every record field is looked up by its name in the
//! schema, and every record gets a new buffer. This writer walks the schema's fields in
//! their order, as [`super::delta_reader`] reads them, into a buffer the caller reuses.
//!
//! It writes exactly the bytes `serde_avro_fast` writes for the same delta with the same
//! schema (arrays as one block followed by the end marker): the tests compare the two on
//! generated deltas, and the reader's tests pin the schema's fields, so a change of the
//! schema fails them until this writer follows it.

use super::view::{ColumnView, DeltaView, ValueView};
use super::{Column, Delta, DeltaOp};

/// Where the encoding goes: a buffer, or a sink that keeps only part of it (capture's
/// fragments, [`super::fragment`]) without ever holding the whole.
pub(super) trait Out {
    fn put(&mut self, bytes: &[u8]);
}

impl Out for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Appends the encoding of `delta` to `out`.
pub(super) fn write_delta<O: Out>(delta: &Delta, out: &mut O) {
    fn columns(cs: &[Column]) -> impl ExactSizeIterator<Item = ColumnView<'_>> {
        cs.iter().map(Column::view)
    }
    let (key, after, old_key) = (columns(&delta.key), delta.after.as_deref().map(columns), delta.old_key.as_deref().map(columns));
    let fields = Fields {
        table: &delta.table,
        op: delta.op,
        commit_lsn: delta.commit_lsn,
        lsn: delta.lsn,
        xid: delta.xid,
        commit_ts: delta.commit_ts,
        seq: delta.seq,
        instruction_id: delta.instruction_id.as_deref(),
    };
    write(out, &fields, key, after, old_key);
}

/// Appends the encoding of a delta read in place to `out`: the bytes it was read from.
pub(super) fn write_delta_view<O: Out>(delta: &DeltaView<'_>, out: &mut O) {
    fn columns<'a, 'c>(cs: &'a [ColumnView<'c>]) -> impl ExactSizeIterator<Item = ColumnView<'c>> + 'a {
        cs.iter().cloned()
    }
    let (key, after, old_key) = (columns(&delta.key), delta.after.as_deref().map(columns), delta.old_key.as_deref().map(columns));
    let fields = Fields {
        table: delta.table,
        op: delta.op,
        commit_lsn: delta.commit_lsn,
        lsn: delta.lsn,
        xid: delta.xid,
        commit_ts: delta.commit_ts,
        seq: delta.seq,
        instruction_id: delta.instruction_id,
    };
    write(out, &fields, key, after, old_key);
}

/// A delta's fields other than its column arrays.
struct Fields<'a> {
    table: &'a str,
    op: DeltaOp,
    commit_lsn: i64,
    lsn: i64,
    xid: i64,
    commit_ts: i64,
    seq: i64,
    instruction_id: Option<&'a str>,
}

/// The schema's fields in their order, the column arrays given apart.
fn write<'c, O: Out, C: ExactSizeIterator<Item = ColumnView<'c>>>(
    out: &mut O,
    f: &Fields<'_>,
    key: C,
    after: Option<C>,
    old_key: Option<C>,
) {
    string(out, f.table);
    long(out, op_symbol(f.op));
    columns(out, key);
    nullable(out, after, columns);
    nullable(out, old_key, columns);
    long(out, f.commit_lsn);
    long(out, f.lsn);
    long(out, f.xid);
    long(out, f.commit_ts);
    long(out, f.seq);
    nullable(out, f.instruction_id, string);
}

/// The position of the op's symbol in the enum `DeltaOp`.
fn op_symbol(op: DeltaOp) -> i64 {
    match op {
        DeltaOp::Insert => 0,
        DeltaOp::Update => 1,
        DeltaOp::Delete => 2,
        DeltaOp::Truncate => 3,
        DeltaOp::Snapshot => 4,
        DeltaOp::Watermark => 5,
        DeltaOp::Drop => 6,
    }
}

/// An array of `Column`: one block led by its count, then a count of zero (an empty array
/// is the zero alone).
fn columns<'c, O: Out>(out: &mut O, columns: impl ExactSizeIterator<Item = ColumnView<'c>>) {
    if columns.len() > 0 {
        long(out, i64::try_from(columns.len()).unwrap_or(i64::MAX));
        for c in columns {
            string(out, c.name);
            string(out, c.type_name);
            value(out, c.value);
            out.put(&[u8::from(c.unchanged)]);
        }
    }
    long(out, 0);
}

/// The union `null | boolean | long | double | string | bytes`: the branch, then its value.
fn value<O: Out>(out: &mut O, value: ValueView<'_>) {
    match value {
        ValueView::Null => long(out, 0),
        ValueView::Boolean(b) => {
            long(out, 1);
            out.put(&[u8::from(b)]);
        }
        ValueView::Long(n) => {
            long(out, 2);
            long(out, n);
        }
        ValueView::Double(f) => {
            long(out, 3);
            out.put(&f.to_le_bytes());
        }
        ValueView::String(s) => {
            long(out, 4);
            string(out, s);
        }
        ValueView::Bytes(b) => {
            long(out, 5);
            bytes(out, b);
        }
    }
}

/// A union of `null` (branch 0) and one other type (branch 1).
fn nullable<O: Out, T>(out: &mut O, value: Option<T>, write: impl FnOnce(&mut O, T)) {
    match value {
        None => long(out, 0),
        Some(v) => {
            long(out, 1);
            write(out, v);
        }
    }
}

fn string<O: Out>(out: &mut O, s: &str) {
    bytes(out, s.as_bytes());
}

fn bytes<O: Out>(out: &mut O, b: &[u8]) {
    long(out, i64::try_from(b.len()).unwrap_or(i64::MAX));
    out.put(b);
}

/// A zigzag-encoded variable-length `long`: 7 bits a byte, least significant first.
fn long<O: Out>(out: &mut O, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut buf = [0u8; 10];
    let mut i = 0;
    while z >= 0x80 {
        buf[i] = (z as u8) | 0x80;
        z >>= 7;
        i += 1;
    }
    buf[i] = z as u8;
    out.put(&buf[..=i]);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::contract::codec::SCHEMAS;
    use crate::contract::delta_reader::tests::delta;
    use crate::contract::Value;

    /// The encoding through serde, which this writer replaces.
    fn serde_bytes(d: &Delta) -> Vec<u8> {
        serde_avro_fast::to_datum_vec(d, &mut serde_avro_fast::ser::SerializerConfig::new(&SCHEMAS.delta)).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn writes_the_bytes_serde_writes(d in delta()) {
            let mut out = vec![7]; // appends to what the buffer holds
            write_delta(&d, &mut out);
            prop_assert_eq!(&out[1..], &serde_bytes(&d)[..]);
        }

        #[test]
        fn writes_a_view_back_into_the_bytes_it_was_read_from(d in delta()) {
            let bytes = serde_bytes(&d);
            let mut out = Vec::new();
            write_delta_view(&crate::contract::codec::decode_delta_view(&bytes).unwrap(), &mut out);
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn long_columns_and_extreme_integers() {
        let column =
            |i: i64| Column { name: "c".repeat(200), type_name: "int8".into(), value: Value::Long(i), unchanged: i % 2 == 0 };
        let d = Delta {
            table: "t".repeat(300),
            op: DeltaOp::Update,
            key: (0..200).map(column).collect(),
            after: Some(vec![column(i64::MIN), column(i64::MAX), column(-1)]),
            old_key: Some(vec![]),
            commit_lsn: i64::MAX,
            lsn: i64::MIN,
            xid: 0,
            commit_ts: -64,
            seq: 63,
            instruction_id: Some(String::new()),
        };
        let mut out = Vec::new();
        write_delta(&d, &mut out);
        assert_eq!(out, serde_bytes(&d));
    }
}
