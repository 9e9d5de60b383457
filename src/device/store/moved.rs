//! A row whose key changed: the device makes it arrive whole under its new key and removes
//! the old key, in whichever order it reads the two partitions involved.
//!
//! - *Unchanged values move with the row.* An update that changes the key and leaves a
//!   TOASTed value as it was does not carry that value (pgoutput sends only "unchanged"),
//!   whatever the replica identity. The device holds the old row: the update takes the
//!   value from it before the old key's tombstone clears it. Only the old row as it was
//!   just before the update counts: live and older than the update, or moved away by this
//!   very update (below). Where the device holds no such row, the value stays NULL, as
//!   before any fix could apply; the carried value is exact when the device applied the old
//!   row's earlier changes before the move (see the README, "What reaches devices").
//! - *The old key's Kafka tombstone loses nothing and brings nothing back.* Capture follows
//!   a key-changing update with a Kafka tombstone under the old key, so that a compacted
//!   topic forgets the old key; its header carries the move: the update's version, its new
//!   key and its old key, and no row. The tombstone lies in the old key's partition, the
//!   update in the new key's, and a device may read either first. The move marks the old
//!   row deleted at the update's version but keeps its values until the update has taken
//!   them; it names only the old key, so the row under its new key is never touched, and it
//!   is versioned like every write, so a newer row under the old key wins over it.

use rusqlite::types::Value as SqlValue;
use rusqlite::Connection;

use super::error::ApplyError;
use super::schema::{sqlite_table, TableShape, DELETED, LSN, SEQ};
use crate::contract::view::{ColumnView, DeltaView, ValueView};
use crate::quote::quote_ident;

/// Whether a Kafka tombstone's delta is a move (an update with no row).
pub(super) fn is_move(delta: &DeltaView<'_>) -> bool {
    delta.op == crate::contract::DeltaOp::Update && delta.after.is_none()
}

/// The old row's values of the row's unchanged columns, in their order.
pub(super) struct OldValues {
    values: Vec<SqlValue>,
    /// The old row was deleted by this very move (its Kafka tombstone came first).
    moved: bool,
}

impl OldValues {
    /// `row` with the old values in its unchanged columns.
    pub(super) fn fill<'x>(&'x self, row: &[ColumnView<'x>]) -> Vec<ColumnView<'x>> {
        let mut carried = self.values.iter();
        row.iter()
            .map(|c| match if c.unchanged { carried.next() } else { None } {
                Some(v) => ColumnView { value: view_of(v), unchanged: false, ..c.clone() },
                None => c.clone(),
            })
            .collect()
    }

    /// Clears the values a move kept in the old key's tombstone for this update, now taken.
    pub(super) fn taken(
        &self,
        tx: &Connection,
        table: &str,
        shape: &TableShape,
        old_key: &[ColumnView<'_>],
        version: (i64, i64),
    ) -> Result<(), ApplyError> {
        if self.moved {
            clear_moved(tx, table, shape, old_key, version)?;
        }
        Ok(())
    }
}

/// The values of `row`'s unchanged columns in the old row as it was just before the update
/// at `version`: live and older, or deleted by this very move; `None` when the device holds
/// no such row or `row` has no unchanged column.
pub(super) fn old_values(
    tx: &Connection,
    table: &str,
    shape: &TableShape,
    old_key: &[ColumnView<'_>],
    row: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<Option<OldValues>, ApplyError> {
    let wanted: Vec<&str> = row.iter().filter(|c| c.unchanged).map(|c| c.name).collect();
    if wanted.is_empty() || wanted.iter().any(|c| !shape.columns.iter().any(|s| s == c)) {
        return Ok(None);
    }
    let select: String = wanted.iter().map(|c| format!("{}, ", quote_ident(c))).collect();
    let (lsn, seq) = (old_key.len() + 1, old_key.len() + 2);
    let sql = format!(
        "SELECT {select}{DELETED} FROM {} WHERE {} AND (({DELETED} = 0 AND ({LSN}, {SEQ}) < (?{lsn}, ?{seq}))
                                                 OR ({DELETED} = 1 AND {LSN} = ?{lsn} AND {SEQ} = ?{seq}))",
        sqlite_table(table),
        key_condition(old_key)
    );
    let mut stmt = tx.prepare_cached(&sql)?;
    bind_key_and_version(&mut stmt, old_key, version)?;
    let mut rows = stmt.raw_query();
    let Some(r) = rows.next()? else { return Ok(None) };
    let values = (0..wanted.len()).map(|i| r.get::<_, SqlValue>(i)).collect::<Result<Vec<_>, _>>()?;
    let moved = r.get::<_, i64>(wanted.len())? != 0;
    Ok(Some(OldValues { values, moved }))
}

/// Clears the values a move kept in the old key's tombstone.
fn clear_moved(
    tx: &Connection,
    table: &str,
    shape: &TableShape,
    old_key: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<(), ApplyError> {
    let nulls: Vec<String> =
        shape.columns.iter().filter(|c| !shape.key.contains(c)).map(|c| format!("{} = NULL", quote_ident(c))).collect();
    if nulls.is_empty() {
        return Ok(());
    }
    let (lsn, seq) = (old_key.len() + 1, old_key.len() + 2);
    let sql = format!(
        "UPDATE {} SET {} WHERE {} AND {DELETED} = 1 AND {LSN} = ?{lsn} AND {SEQ} = ?{seq}",
        sqlite_table(table),
        nulls.join(", "),
        key_condition(old_key)
    );
    let mut stmt = tx.prepare_cached(&sql)?;
    bind_key_and_version(&mut stmt, old_key, version)?;
    stmt.raw_execute()?;
    Ok(())
}

/// Binds the key's values, then the version, to `?1 …`.
fn bind_key_and_version(stmt: &mut rusqlite::Statement<'_>, key: &[ColumnView<'_>], version: (i64, i64)) -> rusqlite::Result<()> {
    for (i, c) in key.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, c.value)?;
    }
    stmt.raw_bind_parameter(key.len() + 1, version.0)?;
    stmt.raw_bind_parameter(key.len() + 2, version.1)
}

/// `"k1" = ?1 AND "k2" = ?2 …` for the key's columns.
fn key_condition(key: &[ColumnView<'_>]) -> String {
    key.iter().enumerate().map(|(i, c)| format!("{} = ?{}", quote_ident(c.name), i + 1)).collect::<Vec<_>>().join(" AND ")
}

/// A value read from the store, to be written again as it is.
fn view_of(v: &SqlValue) -> ValueView<'_> {
    match v {
        SqlValue::Null => ValueView::Null,
        SqlValue::Integer(n) => ValueView::Long(*n),
        SqlValue::Real(f) => ValueView::Double(*f),
        SqlValue::Text(s) => ValueView::String(s),
        SqlValue::Blob(b) => ValueView::Bytes(b),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Record, Store};
    use crate::contract::{Column, Delta, DeltaOp, Value};

    fn col(name: &str, value: Value, unchanged: bool) -> Column {
        Column { name: name.into(), type_name: if name == "doc" { "text" } else { "int4" }.into(), value, unchanged }
    }

    fn delta(op: DeltaOp, id: i64, doc: Option<&str>, old: Option<i64>, lsn: i64) -> Delta {
        let doc = doc.map_or(col("doc", Value::Null, true), |d| col("doc", Value::String(d.into()), false));
        Delta {
            table: "public.t".into(),
            op,
            key: vec![col("id", Value::Long(id), false)],
            after: (op != DeltaOp::Update || old.is_none() || lsn >= 0).then(|| vec![col("id", Value::Long(id), false), doc]),
            old_key: old.map(|o| vec![col("id", Value::Long(o), false)]),
            commit_lsn: lsn.abs(),
            lsn: lsn.abs(),
            xid: 1,
            commit_ts: 0,
            seq: 0,
            instruction_id: None,
        }
    }

    fn docs(store: &Store) -> Vec<(i64, Option<String>, i64)> {
        let conn = store.connection();
        let mut stmt = conn.prepare("SELECT id, doc, _pgfanout_deleted FROM \"public.t\" ORDER BY id").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
    }

    /// The key change 1 → 2 at version 20 leaving `doc` unchanged, after the insert of 1 at
    /// 10; the move (Kafka tombstone under 1, a negative LSN here builds it without a row)
    /// read before or after the update, or twice.
    #[test]
    fn a_move_carries_unchanged_values_whichever_partition_is_read_first() {
        let insert = delta(DeltaOp::Insert, 1, Some("big"), None, 10);
        let update = delta(DeltaOp::Update, 2, None, Some(1), 20);
        let moved = delta(DeltaOp::Update, 2, None, Some(1), -20);
        assert!(moved.after.is_none() && update.after.is_some());
        let orders: [&[u8]; 3] = [&[0, 1, 2], &[0, 2, 1], &[0, 2, 1, 2]];
        for (n, order) in orders.into_iter().enumerate() {
            let path = std::env::temp_dir().join(format!("pgfanout-moved-{}-{n}.sqlite", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let mut store = Store::open(&path).unwrap();
            for (i, step) in order.iter().enumerate() {
                let (d, partition, tombstone) = match step {
                    0 => (&insert, 0, false),
                    1 => (&update, 0, false),
                    _ => (&moved, 1, true),
                };
                store.apply_batch("t", &[record(d, partition, i as i64, tombstone)]).unwrap();
            }
            // Watermarks past the changes on both partitions: the store applies them.
            let watermark = mark(100);
            store.apply_batch("t", &[record(&watermark, 0, 10, false), record(&watermark, 1, 10, false)]).unwrap();
            assert_eq!(docs(&store), vec![(1, None, 1), (2, Some("big".into()), 0)], "order {order:?}");
            drop(store);
            let _ = std::fs::remove_file(&path);
        }
    }

    fn mark(lsn: i64) -> Delta {
        let mut watermark = delta(DeltaOp::Watermark, 0, None, None, lsn);
        (watermark.table, watermark.key, watermark.after) = (String::new(), Vec::new(), None);
        watermark
    }

    fn record(d: &Delta, partition: i32, offset: i64, tombstone: bool) -> Record<'_> {
        Record { partition, offset, delta: Ok(Some(d.view())), tombstone, fragment: None, encoded: None }
    }

    /// A store on two partitions holding row 1 (`doc` "old", at 10), both partitions past
    /// 20, that holds nothing in memory from now on: a transaction that does not complete
    /// in one batch is applied in a SQLite transaction left open.
    fn store_with_row_1(name: &str) -> (std::path::PathBuf, Store) {
        let path = std::env::temp_dir().join(format!("pgfanout-moved-{name}-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut store = Store::open(&path).unwrap();
        store.set_partitions(vec![0, 1]);
        let (insert, w20) = (delta(DeltaOp::Insert, 1, Some("old"), None, 10), mark(20));
        store.apply_batch("t", &[record(&insert, 0, 0, false), record(&w20, 0, 1, false), record(&w20, 1, 0, false)]).unwrap();
        store.set_hold_bytes(0);
        (path, store)
    }

    /// One transaction at 30 changes row 1's `doc` (partition 0), then its key to 2 leaving
    /// `doc` unchanged (partition 1). Partition 1 is read first: the key change must wait
    /// for partition 0's update, or it carries the old `doc`.
    #[test]
    fn a_key_change_in_an_open_transaction_waits_for_the_changes_before_it() {
        let (path, mut store) = store_with_row_1("open");
        let update = delta(DeltaOp::Update, 1, Some("new"), None, 30);
        let key_change = Delta { seq: 1, ..delta(DeltaOp::Update, 2, None, Some(1), 30) };
        let w100 = mark(100);
        store.apply_batch("t", &[record(&key_change, 1, 1, false), record(&w100, 1, 2, false)]).unwrap();
        store.apply_batch("t", &[record(&update, 0, 2, false), record(&w100, 0, 3, false)]).unwrap();
        assert_eq!(docs(&store), vec![(1, None, 1), (2, Some("new".into()), 0)]);
        drop(store);
        let _ = std::fs::remove_file(&path);
    }

    /// One transaction at 30 changes row 1's key to 2 leaving `doc` unchanged (partition 1),
    /// then inserts a new row 1 (partition 0, after the move's Kafka tombstone). Partition 0
    /// is read first: the new row 1 must wait for the key change, or the key change finds it
    /// instead of the row it moves.
    #[test]
    fn a_row_written_under_a_moved_key_waits_for_the_move() {
        let (path, mut store) = store_with_row_1("again");
        let key_change = delta(DeltaOp::Update, 2, None, Some(1), 30);
        let moved = delta(DeltaOp::Update, 2, None, Some(1), -30);
        let again = Delta { seq: 1, ..delta(DeltaOp::Insert, 1, Some("again"), None, 30) };
        let w100 = mark(100);
        store.apply_batch("t", &[record(&moved, 0, 2, true), record(&again, 0, 3, false), record(&w100, 0, 4, false)]).unwrap();
        store.apply_batch("t", &[record(&key_change, 1, 1, false), record(&w100, 1, 2, false)]).unwrap();
        assert_eq!(docs(&store), vec![(1, Some("again".into()), 0), (2, Some("old".into()), 0)]);
        drop(store);
        let _ = std::fs::remove_file(&path);
    }
}
