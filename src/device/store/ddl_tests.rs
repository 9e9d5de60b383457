//! Shapes after DDL: a dropped table, a retyped column.

use super::*;
use crate::contract::{Column, Delta, DeltaOp, Value};

fn temp_store(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::env::temp_dir().join(format!("pgfanout-store-ddl-{}-{tag}-{nanos}.sqlite", std::process::id()))
}

fn delta(op: DeltaOp, lsn: i64, seq: i64, row: Option<(i64, &str, Value)>) -> Delta {
    let id = |n| Column { name: "id".into(), type_name: "int8".into(), value: Value::Long(n), unchanged: false };
    let (key, after) = match row {
        Some((n, type_name, v)) => {
            (vec![id(n)], Some(vec![id(n), Column { name: "v".into(), type_name: type_name.into(), value: v, unchanged: false }]))
        }
        None => (Vec::new(), None),
    };
    Delta {
        table: "public.t".into(),
        op,
        key,
        after,
        old_key: None,
        commit_lsn: lsn,
        lsn,
        xid: 0,
        commit_ts: 0,
        seq,
        instruction_id: None,
    }
}

/// Applies `deltas` in one batch, behind a watermark past them all.
fn apply(store: &mut Store, deltas: &[Delta]) {
    let w = Delta { table: String::new(), ..delta(DeltaOp::Watermark, i64::MAX, 0, None) };
    // Offsets no earlier batch had: each record is news to the store.
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let offset = || NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut records = vec![Record {
        partition: 0,
        offset: offset(),
        delta: Ok(Some(w.view())),
        tombstone: false,
        fragment: None,
        encoded: None,
    }];
    records.extend(deltas.iter().map(|d| Record {
        partition: 0,
        offset: offset(),
        delta: Ok(Some(d.view())),
        tombstone: false,
        fragment: None,
        encoded: None,
    }));
    store.apply_batch("t", &records).unwrap();
}

fn table(store: &Store) -> Option<Vec<(i64, String, String)>> {
    let conn = store.connection();
    let exists: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'public.t'", [], |r| r.get(0)).unwrap();
    if exists == 0 {
        return None;
    }
    let mut stmt = conn
        .prepare(
            "SELECT id, coalesce(CAST(v AS TEXT), 'NULL'), typeof(v) FROM \"public.t\" WHERE NOT _pgfanout_deleted ORDER BY id",
        )
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
    Some(rows.collect::<Result<_, _>>().unwrap())
}

fn row(id: i64, v: &str, kind: &str) -> (i64, String, String) {
    (id, v.into(), kind.into())
}

#[test]
fn a_dropped_table_goes_and_only_newer_deltas_bring_a_table_of_that_name_back() {
    let path = temp_store("drop");
    let mut store = Store::open(&path).unwrap();
    let (one, two) = (Some((1, "int8", Value::Long(1))), Some((2, "int8", Value::Long(2))));
    apply(&mut store, &[delta(DeltaOp::Insert, 100, 0, one.clone()), delta(DeltaOp::Insert, 200, 0, two)]);
    assert_eq!(table(&store).unwrap().len(), 2);
    apply(&mut store, &[delta(DeltaOp::Drop, 300, 0, None)]);
    assert_eq!(table(&store), None, "dropped");
    // Late from another partition, replayed, or after a restart: older deltas do not
    // create the table again, and the drop again changes nothing.
    apply(&mut store, &[delta(DeltaOp::Update, 250, 0, one.clone()), delta(DeltaOp::Drop, 300, 0, None)]);
    drop(store);
    let mut store = Store::open(&path).unwrap();
    apply(&mut store, &[delta(DeltaOp::Insert, 100, 0, one)]);
    assert_eq!(table(&store), None, "older deltas after a reopen");
    // A new table of that name.
    apply(&mut store, &[delta(DeltaOp::Insert, 400, 0, Some((3, "int8", Value::Long(3))))]);
    assert_eq!(table(&store), Some(vec![row(3, "3", "integer")]));
    // A drop older than what the table holds keeps the newer rows.
    apply(&mut store, &[delta(DeltaOp::Drop, 350, 0, None)]);
    assert_eq!(table(&store), Some(vec![row(3, "3", "integer")]));
}

#[test]
fn a_copy_with_a_new_type_gives_the_column_its_affinity_and_keeps_values() {
    let mut store = Store::open(&temp_store("retype")).unwrap();
    apply(
        &mut store,
        &[
            delta(DeltaOp::Insert, 100, 0, Some((1, "int8", Value::Long(10)))),
            delta(DeltaOp::Insert, 100, 1, Some((2, "int8", Value::Long(20)))),
        ],
    );
    // After ALTER COLUMN v TYPE text, capture's copy: text that looks like a number stays text.
    apply(&mut store, &[delta(DeltaOp::Snapshot, 500, 1, Some((1, "text", Value::String("010".into()))))]);
    assert_eq!(table(&store), Some(vec![row(1, "010", "text"), row(2, "20", "text")]), "row 2 kept its value, now as text");
    // A stream delta older than the copy changes nothing of the shape.
    apply(&mut store, &[delta(DeltaOp::Update, 400, 0, Some((2, "int8", Value::Long(21))))]);
    let conn = store.connection();
    let kind: String =
        conn.query_row("SELECT type FROM pragma_table_info('public.t') WHERE name = 'v'", [], |r| r.get(0)).unwrap();
    assert_eq!(kind, "TEXT");
}
