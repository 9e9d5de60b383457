//! Applying deltas: each changes a row only if it is newer than the row's version, and the
//! batch's offsets and counters are written in the same transaction as its rows.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, CachedStatement, Connection, ToSql};

use super::error::{ApplyError, StoreError};
use super::fragments::Fragment;
use super::moved;
use super::read::NEGATIVE_ZERO;
use super::schema::{
    drop_table, ensure_shape, record_truncate, sqlite_table, truncated_at, TableShape, WriteKind, DELETED, LSN, SEQ,
};
use crate::contract::view::{ColumnView, DeltaView, ValueView};
use crate::contract::DeltaOp;
use crate::quote::quote_ident;

/// One consumed record: a delta (borrowed from the record's bytes), a Kafka tombstone
/// (`Ok(None)`: no value, written after a delete for compaction), or why it could not be
/// decoded.
pub struct Record<'a> {
    pub partition: i32,
    pub offset: i64,
    /// The delta; for a Kafka tombstone, the delete it carries in a header, if any.
    pub delta: Result<Option<DeltaView<'a>>, String>,
    /// A Kafka tombstone (no value).
    pub tombstone: bool,
    /// A fragment of a delta too large for one record ([`fragments`]); `delta` is then
    /// `Ok(None)`.
    pub fragment: Option<Fragment<'a>>,
    /// The bytes `delta` was decoded from, when the caller has them: a delta held for a
    /// later batch keeps a copy of them instead of being encoded again.
    pub encoded: Option<&'a [u8]>,
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchStats {
    pub processed: u64,
    pub applied: u64,
    pub skipped_older: u64,
    pub watermarks: u64,
    pub tombstones: u64,
    pub not_subscribed: u64,
    pub rejected: u64,
    /// Fragments staged, and sets dropped incomplete (see [`fragments`]).
    pub fragments: u64,
    pub applied_by_op: HashMap<&'static str, u64>,
    /// Per partition touched by the batch: the position below which every transaction is
    /// fully applied on this device (see [`Store::applied_lsns`]).
    pub applied_lsn: HashMap<i32, i64>,
    /// Per partition: the next offset to consume after a restart (never past a record
    /// held in memory).
    pub next_offset: HashMap<i32, i64>,
    /// Per partition: the next offset after the records consumed so far.
    pub consumed: HashMap<i32, i64>,
    /// Deltas of transactions not yet complete on every partition, held after this batch
    /// (in memory and staged in the store).
    pub held: u64,
}
/// The statements prepared during one batch's transaction, kept out of rusqlite's cache
/// until the batch ends: a delta finds its statement by the identity of the text its table
/// shape gave it, without hashing the SQL.
struct BatchStatements<'c> {
    conn: &'c Connection,
    /// In order of preparation. Holding the text keeps its address from being reused.
    prepared: Vec<(Rc<str>, CachedStatement<'c>)>,
}

/// The most statements a batch holds at once; older ones go back to rusqlite's cache.
const STATEMENTS_PER_BATCH: usize = 16;

impl<'c> BatchStatements<'c> {
    fn new(conn: &'c Connection) -> Self {
        BatchStatements { conn, prepared: Vec::new() }
    }

    fn get(&mut self, sql: &Rc<str>) -> Result<&mut CachedStatement<'c>, rusqlite::Error> {
        let i = match self.prepared.iter().rposition(|(s, _)| Rc::ptr_eq(s, sql)) {
            Some(i) => i,
            None => {
                if self.prepared.len() >= STATEMENTS_PER_BATCH {
                    self.prepared.remove(0);
                }
                self.prepared.push((sql.clone(), self.conn.prepare_cached(sql)?));
                self.prepared.len() - 1
            }
        };
        Ok(&mut self.prepared[i].1)
    }
}
/// Applies records inside one SQLite transaction and counts what it did. The caller
/// ([`super::consistent`]) decides which records apply now and writes the positions.
pub(super) struct Applier<'t> {
    tx: &'t Connection,
    statements: BatchStatements<'t>,
    tables: &'t mut HashMap<String, TableShape>,
    subscribed: Option<&'t HashSet<String>>,
    topic: &'t str,
    pub(super) stats: BatchStats,
    applied_by_op: [u64; 7],
    /// (commit LSN, commit time) of the newest transaction whose delta to a kept table was
    /// applied.
    pub(super) newest: (i64, i64),
}

impl<'t> Applier<'t> {
    pub(super) fn new(
        tx: &'t Connection,
        tables: &'t mut HashMap<String, TableShape>,
        subscribed: Option<&'t HashSet<String>>,
        topic: &'t str,
    ) -> Self {
        Applier {
            tx,
            statements: BatchStatements::new(tx),
            tables,
            subscribed,
            topic,
            stats: BatchStats::default(),
            applied_by_op: [0; 7],
            newest: (0, 0),
        }
    }

    /// Whether the device keeps `table`'s rows.
    pub(super) fn keeps(&self, table: &str) -> bool {
        self.subscribed.is_none_or(|t| t.contains(table))
    }

    /// A record that did not decode, or whose delta makes no sense here.
    pub(super) fn reject(&mut self, partition: i32, offset: i64, reason: &str) -> Result<(), rusqlite::Error> {
        self.stats.rejected += 1;
        reject(self.tx, self.topic, partition, offset, reason)
    }

    /// Applies one delta (from a record at `partition`/`offset`; `tombstone`: carried by a
    /// Kafka tombstone's header). Watermarks and Kafka tombstones without a delta are
    /// counted by the caller.
    pub(super) fn apply(
        &mut self,
        partition: i32,
        offset: i64,
        tombstone: bool,
        delta: &DeltaView<'_>,
    ) -> Result<(), StoreError> {
        if tombstone {
            // Usually the delete delta before it was applied already and this changes
            // nothing; after compaction it is the only news of the delete.
            self.stats.tombstones += 1;
            if delta.op != DeltaOp::Delete && !moved::is_move(delta) {
                self.reject(partition, offset, "a tombstone's header carries a delete or a move, not another change")?;
                return Ok(());
            }
        }
        if !self.keeps(delta.table) {
            self.stats.not_subscribed += u64::from(!tombstone);
            return Ok(());
        }
        // Held until the cut passed it, so below the cut.
        if delta.commit_lsn > self.newest.0 {
            self.newest = (delta.commit_lsn, delta.commit_ts);
        }
        let applied = if tombstone && moved::is_move(delta) {
            apply_move(self.tx, self.tables, delta)
        } else {
            apply_delta(self.tx, &mut self.statements, self.tables, delta)
        };
        match applied {
            Ok(true) if !tombstone => {
                self.stats.applied += 1;
                self.applied_by_op[delta.op as usize] += 1;
            }
            Ok(true) => {}
            Ok(false) if !tombstone => self.stats.skipped_older += 1,
            Ok(false) => {}
            Err(ApplyError::Sqlite(e)) => return Err(e.into()),
            Err(ApplyError::Invalid(reason)) => self.reject(partition, offset, &reason)?,
        }
        Ok(())
    }

    /// Writes the positions and the counters, in the transaction, and returns what the
    /// batch did: `positions` are (partition, next offset to consume, applied LSN).
    pub(super) fn finish(mut self, positions: &[(i32, i64, i64)]) -> Result<BatchStats, rusqlite::Error> {
        drop(self.statements);
        record_positions(self.tx, self.topic, positions, &self.applied_by_op, &mut self.stats)?;
        Ok(self.stats)
    }
}

/// Writes the batch's positions and counters, in the batch's transaction, and completes
/// `stats` with them: `positions` are (partition, next offset to consume, applied LSN).
fn record_positions(
    tx: &Connection,
    topic: &str,
    next_offsets: &[(i32, i64, i64)],
    applied_by_op: &[u64; 7],
    stats: &mut BatchStats,
) -> Result<(), rusqlite::Error> {
    for op in [DeltaOp::Insert, DeltaOp::Update, DeltaOp::Delete, DeltaOp::Truncate, DeltaOp::Snapshot, DeltaOp::Drop] {
        if applied_by_op[op as usize] > 0 {
            stats.applied_by_op.insert(op.as_str(), applied_by_op[op as usize]);
        }
    }
    for (partition, next, applied) in next_offsets {
        tx.execute(
            "INSERT INTO _pgfanout_offsets (topic, partition, next_offset, applied_lsn) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (topic, partition) DO UPDATE SET
                 next_offset = excluded.next_offset,
                 applied_lsn = max(applied_lsn, excluded.applied_lsn)",
            params![topic, partition, next, applied],
        )?;
        stats.applied_lsn.insert(*partition, *applied);
        stats.next_offset.insert(*partition, *next);
    }
    for (name, n) in [
        ("processed", stats.processed),
        ("applied", stats.applied),
        ("skipped", stats.skipped_older),
        ("watermarks", stats.watermarks),
        ("tombstones", stats.tombstones),
        ("not_subscribed", stats.not_subscribed),
        ("rejected", stats.rejected),
        ("fragments", stats.fragments),
    ] {
        if n > 0 {
            tx.execute(
                "INSERT INTO _pgfanout_counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                params![name, n as i64],
            )?;
        }
    }
    Ok(())
}

fn reject(tx: &Connection, topic: &str, partition: i32, offset: i64, reason: &str) -> Result<(), rusqlite::Error> {
    tracing::warn!(partition, offset, reason, "delta cannot be applied; recorded in _pgfanout_rejected");
    tx.execute(
        "INSERT OR REPLACE INTO _pgfanout_rejected (topic, partition, record_offset, reason) VALUES (?1, ?2, ?3, ?4)",
        params![topic, partition, offset, reason],
    )?;
    Ok(())
}

/// Applies one delta if it is newer than what the store holds; `Ok(true)` if it changed
/// anything.
fn apply_delta(
    tx: &Connection,
    statements: &mut BatchStatements<'_>,
    tables: &mut HashMap<String, TableShape>,
    delta: &DeltaView<'_>,
) -> Result<bool, ApplyError> {
    let version = delta.version();
    match delta.op {
        DeltaOp::Watermark => Ok(false), // positions only; handled by the caller
        DeltaOp::Drop => Ok(drop_table(tx, tables, delta.table, version)?),
        DeltaOp::Truncate => {
            let Some(shape) = tables.get_mut(delta.table) else {
                // Nothing of this table here yet, but rows older than the truncate may still
                // arrive from other partitions: remember it for when the table is created.
                if truncated_at(tx, delta.table)? >= version {
                    return Ok(false);
                }
                record_truncate(tx, delta.table, version)?;
                return Ok(true);
            };
            if shape.truncated_at >= version {
                return Ok(false);
            }
            shape.truncated_at = version;
            record_truncate(tx, delta.table, version)?;
            let t = sqlite_table(delta.table);
            let nulls = null_assignments(shape);
            tx.execute(
                &format!("UPDATE {t} SET {nulls}{DELETED} = 1, {LSN} = ?1, {SEQ} = ?2 WHERE ({LSN}, {SEQ}) < (?1, ?2)"),
                params![version.0, version.1],
            )?;
            Ok(true)
        }
        DeltaOp::Insert | DeltaOp::Update | DeltaOp::Snapshot | DeltaOp::Delete => {
            if delta.key.is_empty() {
                return Err(ApplyError::Invalid(format!("{} delta on {} has no key", delta.op.as_str(), delta.table)));
            }
            let row: &[ColumnView<'_>] = match (&delta.op, &delta.after) {
                (DeltaOp::Delete, _) => &delta.key,
                (_, Some(after)) => after,
                (_, None) => {
                    return Err(ApplyError::Invalid(format!("{} delta on {} has no row", delta.op.as_str(), delta.table)))
                }
            };
            let written = ensure_shape(tx, tables, delta.table, &delta.key, row, version, delta.op)?;
            let Some((shape, row)) = written else { return Ok(false) };
            if shape.truncated_at >= version {
                return Ok(false);
            }
            if let Some(old_key) = &delta.old_key {
                if !same_key(old_key, &delta.key) {
                    if delta.op != DeltaOp::Delete {
                        return apply_key_change(tx, statements, delta.table, shape, old_key, &row, version);
                    }
                    write_tombstone(statements, delta.table, shape, old_key, version)?;
                }
            }
            if delta.op == DeltaOp::Delete {
                write_tombstone(statements, delta.table, shape, &delta.key, version)
            } else {
                write_row(statements, delta.table, shape, &row, version)
            }
        }
    }
}

/// Writes an insert, update or snapshot row whose key differs from its `old_key`: the old
/// key's row becomes a tombstone, the new one gets the row, with the old row's values where
/// the row says `unchanged` (see [`moved`]). `true` if the new key's row changed.
fn apply_key_change(
    tx: &Connection,
    statements: &mut BatchStatements<'_>,
    table: &str,
    shape: &mut TableShape,
    old_key: &[ColumnView<'_>],
    row: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<bool, ApplyError> {
    let old = moved::old_values(tx, table, shape, old_key, row, version)?;
    write_tombstone(statements, table, shape, old_key, version)?;
    let Some(old) = old else { return write_row(statements, table, shape, row, version) };
    old.taken(tx, table, shape, old_key, version)?;
    write_row(statements, table, shape, &old.fill(row), version)
}

/// Applies the move a Kafka tombstone carries (an update with its old key and no row, see
/// [`moved`]): the old key's row is marked deleted at the update's version, its values kept
/// for the update.
fn apply_move(tx: &Connection, tables: &mut HashMap<String, TableShape>, delta: &DeltaView<'_>) -> Result<bool, ApplyError> {
    let version = delta.version();
    let old_key = match &delta.old_key {
        Some(k) if !k.is_empty() => k,
        _ => return Err(ApplyError::Invalid(format!("the move of a row of {} names no old key", delta.table))),
    };
    // Only the old key's columns: shaped as a delete is.
    let Some((shape, _)) = ensure_shape(tx, tables, delta.table, old_key, old_key, version, DeltaOp::Delete)? else {
        return Ok(false);
    };
    if shape.truncated_at >= version {
        return Ok(false);
    }
    // Rare enough for rusqlite's own statement cache.
    let mut stmt = tx.prepare_cached(&versioned_upsert_sql(delta.table, shape, old_key, "", true))?;
    execute_versioned(&mut stmt, old_key, version)
}

fn same_key(a: &[ColumnView<'_>], b: &[ColumnView<'_>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name && x.value == y.value)
}
fn null_assignments(shape: &TableShape) -> String {
    shape.columns.iter().filter(|c| !shape.key.contains(c)).map(|c| format!("{} = NULL, ", quote_ident(c))).collect()
}

fn write_row(
    statements: &mut BatchStatements<'_>,
    table: &str,
    shape: &mut TableShape,
    row: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<bool, ApplyError> {
    let sql = shape.statement(WriteKind::Row, row, |shape| {
        let updates: String = row
            .iter()
            .filter(|c| !c.unchanged && !shape.key.iter().any(|k| k == c.name))
            .map(|c| format!("{0} = excluded.{0}, ", quote_ident(c.name)))
            .collect();
        versioned_upsert_sql(table, shape, row, &updates, false)
    });
    execute_versioned(statements.get(&sql)?, row, version)
}

fn write_tombstone(
    statements: &mut BatchStatements<'_>,
    table: &str,
    shape: &mut TableShape,
    key: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<bool, ApplyError> {
    // A tombstone clears every non-key column the table has now; the statements are
    // forgotten whenever those change.
    let sql = shape
        .statement(WriteKind::Tombstone, key, |shape| versioned_upsert_sql(table, shape, key, &null_assignments(shape), true));
    execute_versioned(statements.get(&sql)?, key, version)
}

/// `INSERT … ON CONFLICT DO UPDATE` of `columns` plus the version, applied only when the
/// version is newer than the stored one: `assignments` (each ending in `, `) change the
/// other columns, and the row becomes live or a tombstone.
fn versioned_upsert_sql(
    table: &str,
    shape: &TableShape,
    columns: &[ColumnView<'_>],
    assignments: &str,
    tombstone: bool,
) -> String {
    let t = sqlite_table(table);
    let names = columns.iter().map(|c| quote_ident(c.name)).collect::<Vec<_>>().join(", ");
    let marks = (1..=columns.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
    let (lsn, seq) = (columns.len() + 1, columns.len() + 2);
    let conflict = shape.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ");
    let deleted = u8::from(tombstone);
    format!(
        "INSERT INTO {t} ({names}, {LSN}, {SEQ}, {DELETED}) VALUES ({marks}, ?{lsn}, ?{seq}, {deleted})
         ON CONFLICT ({conflict}) DO UPDATE SET {assignments}{LSN} = excluded.{LSN}, {SEQ} = excluded.{SEQ}, {DELETED} = {deleted}
         WHERE ({LSN}, {SEQ}) < (excluded.{LSN}, excluded.{SEQ})"
    )
}

/// Runs a versioned write: the columns' values, then the version; `true` if a row changed.
fn execute_versioned(
    stmt: &mut rusqlite::Statement<'_>,
    columns: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<bool, ApplyError> {
    for (i, c) in columns.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, c.value)?;
    }
    stmt.raw_bind_parameter(columns.len() + 1, version.0)?;
    stmt.raw_bind_parameter(columns.len() + 2, version.1)?;
    Ok(stmt.raw_execute()? > 0)
}
impl ToSql for ValueView<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            ValueView::Null => ValueRef::Null,
            ValueView::Boolean(b) => ValueRef::Integer(i64::from(b)),
            ValueView::Long(n) => ValueRef::Integer(n),
            // SQLite turns a NaN REAL into NULL; keep it as text so it survives.
            ValueView::Double(f) if f.is_nan() => ValueRef::Text(b"NaN"),
            // SQLite writes an integral REAL as an integer, and turns any numeric text into
            // one, so -0.0 would come back as 0.0: keep its bits as a blob.
            ValueView::Double(f) if f == 0.0 && f.is_sign_negative() => ValueRef::Blob(&NEGATIVE_ZERO),
            ValueView::Double(f) => ValueRef::Real(f),
            ValueView::String(s) => ValueRef::Text(s.as_bytes()),
            ValueView::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}
