use proptest::prelude::*;

use super::*;
use crate::contract::codec::{decode_delta, encode_delta, DELTA_AVSC};
use crate::contract::{Column, Delta, Value};

/// The schema without its docs and defaults: what the reader walks, field by field.
#[test]
fn the_schema_is_the_one_the_reader_walks() {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                o.remove("doc");
                o.remove("default");
                o.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut schema: serde_json::Value = serde_json::from_str(DELTA_AVSC).unwrap();
    strip(&mut schema);
    let walked = serde_json::json!({
        "type": "record", "name": "Delta", "namespace": "pgfanout",
        "fields": [
            {"name": "table", "type": "string"},
            {"name": "op", "type": {"type": "enum", "name": "DeltaOp",
                "symbols": ["insert", "update", "delete", "truncate", "snapshot", "watermark", "drop"]}},
            {"name": "key", "type": {"type": "array", "items": {
                "type": "record", "name": "Column",
                "fields": [
                    {"name": "name", "type": "string"},
                    {"name": "type", "type": "string"},
                    {"name": "value", "type": ["null", "boolean", "long", "double", "string", "bytes"]},
                    {"name": "unchanged", "type": "boolean"}
                ]
            }}},
            {"name": "after", "type": ["null", {"type": "array", "items": "Column"}]},
            {"name": "old_key", "type": ["null", {"type": "array", "items": "Column"}]},
            {"name": "commit_lsn", "type": "long"},
            {"name": "lsn", "type": "long"},
            {"name": "xid", "type": "long"},
            {"name": "commit_ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "seq", "type": "long"},
            {"name": "instruction_id", "type": ["null", "string"]}
        ]
    });
    assert_eq!(schema, walked, "schemas/delta.avsc changed: make delta_reader.rs read the new schema");
}

/// Both decoders give the same answer: the same delta (compared by its encoding, so that
/// NaNs compare equal), or both an error.
fn same_answer(bytes: &[u8]) -> Result<(), TestCaseError> {
    match (decode_delta(bytes), read_delta(bytes)) {
        (Ok(owned), Ok(view)) => {
            prop_assert_eq!(encode_delta(&owned).unwrap(), encode_delta(&view.to_delta()).unwrap());
        }
        (Err(_), Err(_)) => {}
        (owned, view) => prop_assert!(false, "serde: {:?}\nreader: {:?}", owned.map(|_| ()), view.map(|_| ())),
    }
    Ok(())
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Boolean),
        any::<i64>().prop_map(Value::Long),
        prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0)].prop_map(Value::Double),
        ".{0,4}".prop_map(Value::String),
        prop::collection::vec(any::<u8>(), 0..4).prop_map(Value::Bytes),
    ]
}

fn column() -> impl Strategy<Value = Column> {
    ("[a-z_\"é]{0,3}", "[a-z0-9_]{0,3}", value(), any::<bool>()).prop_map(|(name, type_name, value, unchanged)| Column {
        name,
        type_name,
        value,
        unchanged,
    })
}

fn columns(max: usize) -> impl Strategy<Value = Vec<Column>> {
    prop::collection::vec(column(), 0..max)
}

/// Generated deltas (also what the writer's tests compare it with serde on).
pub(crate) fn delta() -> impl Strategy<Value = Delta> {
    let op = prop::sample::select(vec![
        DeltaOp::Insert,
        DeltaOp::Update,
        DeltaOp::Delete,
        DeltaOp::Truncate,
        DeltaOp::Snapshot,
        DeltaOp::Watermark,
    ]);
    (
        (".{0,4}", op, columns(4), prop::option::of(columns(8)), prop::option::of(columns(3))),
        (any::<[i64; 5]>(), prop::option::of("[0-9a-f-]{0,4}")),
    )
        .prop_map(|((table, op, key, after, old_key), ([commit_lsn, lsn, xid, commit_ts, seq], instruction_id))| Delta {
            table,
            op,
            key,
            after,
            old_key,
            commit_lsn,
            lsn,
            xid,
            commit_ts,
            seq,
            instruction_id,
        })
}

/// A change to a valid record: cut short, a byte replaced, inserted or removed.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(usize),
    Replace(usize, u8),
    Insert(usize, u8),
    Remove(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    let at = any::<prop::sample::Index>();
    // Mostly bytes at the edges of what a boolean, a branch or a varint byte may be.
    let byte = || prop_oneof![3 => prop::sample::select(vec![0x00, 0x01, 0x02, 0x0c, 0x7f, 0x80, 0xff]), 1 => any::<u8>()];
    prop_oneof![
        at.clone().prop_map(|i| Damage::Truncate(i.index(usize::MAX))),
        (at.clone(), byte()).prop_map(|(i, b)| Damage::Replace(i.index(usize::MAX), b)),
        (at.clone(), byte()).prop_map(|(i, b)| Damage::Insert(i.index(usize::MAX), b)),
        at.prop_map(|i| Damage::Remove(i.index(usize::MAX))),
    ]
}

fn damaged(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let at = |i: usize, extra: usize| i % (bytes.len() + extra).max(1);
        match *d {
            Damage::Truncate(i) => bytes.truncate(at(i, 0)),
            Damage::Replace(i, b) if !bytes.is_empty() => {
                let i = at(i, 0);
                bytes[i] = b;
            }
            Damage::Insert(i, b) => {
                let i = at(i, 1);
                bytes.insert(i, b);
            }
            Damage::Remove(i) if !bytes.is_empty() => {
                let i = at(i, 0);
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn reads_every_delta_as_serde_does(d in delta()) {
        let bytes = encode_delta(&d).unwrap();
        let view = read_delta(&bytes).unwrap();
        prop_assert_eq!(encode_delta(&view.to_delta()).unwrap(), bytes.clone());
        same_answer(&bytes)?;
    }

    #[test]
    fn damaged_records_give_the_same_answer_as_serde(d in delta(), damage in prop::collection::vec(damage(), 1..3)) {
        same_answer(&damaged(encode_delta(&d).unwrap(), &damage))?;
    }

    #[test]
    fn random_bytes_give_the_same_answer_as_serde(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        same_answer(&bytes)?;
    }
}

/// Encodes a long as Avro does (zigzag, then 7 bits a byte).
fn long(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = long(s.len() as i64);
    out.extend_from_slice(s.as_bytes());
    out
}

/// A column `name int8 = Long(v)`.
fn column_bytes(name: &str, v: i64) -> Vec<u8> {
    [string(name), string("int8"), long(2), long(v), vec![0]].concat()
}

/// A record whose key array is written as the caller says, everything else minimal.
fn record_with_key(key_array: Vec<u8>) -> Vec<u8> {
    [string("public.t"), long(1), key_array, long(0), long(0), long(5), long(4), long(3), long(2), long(1), long(0)].concat()
}

#[test]
fn arrays_in_several_blocks_and_sized_blocks_read_as_serde_does() {
    let (a, b, c) = (column_bytes("a", 1), column_bytes("b", -2), column_bytes("c", i64::MAX));
    // Two blocks, the second with its size in bytes (a negative count), then the end.
    let key = [long(1), a.clone(), long(-2), long((b.len() + c.len()) as i64), b.clone(), c.clone(), long(0)].concat();
    let bytes = record_with_key(key);
    let view = read_delta(&bytes).unwrap();
    assert_eq!(view.key.iter().map(|c| c.name).collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(view.key[2].value, ValueView::Long(i64::MAX));
    assert_eq!(view.to_delta(), decode_delta(&bytes).unwrap());
    // A count beyond the limit is refused by both, before anything is reserved.
    let huge = record_with_key([long(MAX_ARRAY_LEN as i64 + 1), a.clone()].concat());
    assert!(read_delta(&huge).is_err() && decode_delta(&huge).is_err());
    let huge = record_with_key([long(i64::MIN), long(0), a].concat());
    assert!(read_delta(&huge).is_err() && decode_delta(&huge).is_err());
}

#[test]
fn integers_take_at_most_ten_bytes_as_serde_reads_them() {
    for (n, encoded) in [
        (0, vec![0x80, 0x00]), // not minimal, still accepted
        (i64::MIN, vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        (i64::MAX, vec![0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
    ] {
        let bytes =
            [string("t"), long(5), long(0), long(0), long(0), encoded, long(0), long(0), long(0), long(0), long(0)].concat();
        assert_eq!(read_delta(&bytes).unwrap().commit_lsn, n);
        same_answer(&bytes).unwrap();
    }
    for encoded in [vec![0xff; 10], [vec![0xff; 9], vec![0x02]].concat(), vec![0x80; 11]] {
        let bytes =
            [string("t"), long(5), long(0), long(0), long(0), encoded, long(0), long(0), long(0), long(0), long(0)].concat();
        assert!(read_delta(&bytes).is_err());
        same_answer(&bytes).unwrap();
    }
}

#[test]
fn errors_say_where_reading_stopped() {
    let delta = Delta {
        table: "public.t".into(),
        op: DeltaOp::Watermark,
        key: vec![],
        after: None,
        old_key: None,
        commit_lsn: 1,
        lsn: 1,
        xid: 1,
        commit_ts: 1,
        seq: 1,
        instruction_id: None,
    };
    let bytes = encode_delta(&delta).unwrap();
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(read_delta(&longer).unwrap_err().to_string(), "undecodable delta: 1 bytes left after the record");
    let mut not_utf8 = bytes.clone();
    not_utf8[1] = 0xff; // inside the table name
    let err = read_delta(&not_utf8).unwrap_err().to_string();
    assert!(err.contains("not valid UTF-8") && err.contains("byte 9"), "{err}");
    let err = read_delta(&bytes[..12]).unwrap_err().to_string();
    assert!(err.contains("past the end") && err.contains("byte 12"), "{err}");
}
