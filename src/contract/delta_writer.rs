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

use super::{Column, Delta, DeltaOp, Value};

/// Appends the encoding of `delta` to `out`.
pub(super) fn write_delta(delta: &Delta, out: &mut Vec<u8>) {
    string(out, &delta.table);
    long(out, op_symbol(delta.op));
    columns(out, &delta.key);
    nullable(out, delta.after.as_deref(), columns);
    nullable(out, delta.old_key.as_deref(), columns);
    long(out, delta.commit_lsn);
    long(out, delta.lsn);
    long(out, delta.xid);
    long(out, delta.commit_ts);
    long(out, delta.seq);
    nullable(out, delta.instruction_id.as_deref(), string);
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
fn columns(out: &mut Vec<u8>, columns: &[Column]) {
    if !columns.is_empty() {
        long(out, i64::try_from(columns.len()).unwrap_or(i64::MAX));
        for c in columns {
            string(out, &c.name);
            string(out, &c.type_name);
            value(out, &c.value);
            out.push(u8::from(c.unchanged));
        }
    }
    long(out, 0);
}

/// The union `null | boolean | long | double | string | bytes`: the branch, then its value.
fn value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => long(out, 0),
        Value::Boolean(b) => {
            long(out, 1);
            out.push(u8::from(*b));
        }
        Value::Long(n) => {
            long(out, 2);
            long(out, *n);
        }
        Value::Double(f) => {
            long(out, 3);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::String(s) => {
            long(out, 4);
            string(out, s);
        }
        Value::Bytes(b) => {
            long(out, 5);
            bytes(out, b);
        }
    }
}

/// A union of `null` (branch 0) and one other type (branch 1).
fn nullable<T: ?Sized>(out: &mut Vec<u8>, value: Option<&T>, write: impl FnOnce(&mut Vec<u8>, &T)) {
    match value {
        None => long(out, 0),
        Some(v) => {
            long(out, 1);
            write(out, v);
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    bytes(out, s.as_bytes());
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    long(out, i64::try_from(b.len()).unwrap_or(i64::MAX));
    out.extend_from_slice(b);
}

/// A zigzag-encoded variable-length `long`: 7 bits a byte, least significant first.
fn long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::contract::codec::SCHEMAS;
    use crate::contract::delta_reader::tests::delta;

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
