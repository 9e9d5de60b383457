//! A device's local SQLite store.
//!
//! Every replicated row carries the version `(commit_lsn, seq)` of the delta that wrote it
//! (`_pgfanout_lsn`, `_pgfanout_seq`); a delete leaves a tombstone (`_pgfanout_deleted = 1`)
//! with its version, and a truncate records the table's truncate version. A delta changes
//! a row only if it is newer than what the row holds, so duplicates, replays and any
//! interleaving of partitions leave the same state.
//!
//! The consumed offsets live in the same SQLite transaction as the rows they produced
//! (`_pgfanout_offsets`): after a crash, neither is ahead of the other, and the device
//! resumes exactly where its last transaction ended. This module is the only place that
//! records device offsets.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, CachedStatement, Connection, OptionalExtension, ToSql};

use crate::contract::value::ValueKind;
use crate::contract::view::{ColumnView, DeltaView, ValueView};
use crate::contract::{DeltaOp, Value};
use crate::quote::quote_ident;

/// Hidden columns of every replicated table.
const LSN: &str = "_pgfanout_lsn";
const SEQ: &str = "_pgfanout_seq";
const DELETED: &str = "_pgfanout_deleted";

const META_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgfanout_offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    applied_lsn INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS _pgfanout_columns (
    table_name TEXT NOT NULL, column_name TEXT NOT NULL, pg_type TEXT NOT NULL,
    is_key INTEGER NOT NULL, ordinal INTEGER NOT NULL,
    PRIMARY KEY (table_name, column_name));
CREATE TABLE IF NOT EXISTS _pgfanout_column_changes (
    table_name TEXT NOT NULL, column_name TEXT NOT NULL, lsn INTEGER NOT NULL, seq INTEGER NOT NULL,
    dropped INTEGER NOT NULL, PRIMARY KEY (table_name, column_name));
CREATE TABLE IF NOT EXISTS _pgfanout_tables (
    table_name TEXT PRIMARY KEY, truncate_lsn INTEGER NOT NULL DEFAULT -1, truncate_seq INTEGER NOT NULL DEFAULT -1);
CREATE TABLE IF NOT EXISTS _pgfanout_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS _pgfanout_rejected (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, record_offset INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (topic, partition, record_offset));
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store file: {0}")]
    Io(std::io::Error),
    #[error("store {0} is in use by another process (a running device or replay); stop it first")]
    InUse(std::path::PathBuf),
    #[error("the store has layout version {found}, this pgfanout knows {LAYOUT_VERSION}: use the matching pgfanout, or move the file away and let the device rebuild it from the topic")]
    Layout { found: i64 },
}

/// Version of the store's own tables (`PRAGMA user_version`).
const LAYOUT_VERSION: i64 = 1;

/// Refuses stores whose bookkeeping tables this version does not know.
fn check_layout(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_tables: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = '_pgfanout_offsets'", [], |r| r.get(0))?;
    if (version == 0 && has_tables > 0) || version > LAYOUT_VERSION {
        return Err(StoreError::Layout { found: version });
    }
    Ok(())
}

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
    pub applied_by_op: HashMap<&'static str, u64>,
    /// Per partition touched by the batch: the position below which every transaction is
    /// fully applied on this device (see [`Store::applied_lsns`]).
    pub applied_lsn: HashMap<i32, i64>,
    /// Per partition touched by the batch: the next offset to consume.
    pub next_offset: HashMap<i32, i64>,
}

#[derive(Debug, Clone)]
struct TableShape {
    /// Known columns, in order of first appearance.
    columns: Vec<String>,
    key: Vec<String>,
    truncated_at: (i64, i64),
    /// The version of each column's last addition or drop (`true`), so that deltas older
    /// than a change neither undo it nor trigger it again.
    changes: HashMap<String, ((i64, i64), bool)>,
    /// Statement texts by the shape of the deltas they write, most recently used first, so
    /// that the hot path formats no SQL. Deltas of a table nearly always have one shape:
    /// the first entry matches after a comparison of column names, with nothing allocated
    /// or hashed.
    statements: Vec<ShapedSql>,
}

/// The most statement texts kept per table (one per combination of unchanged TOAST
/// columns, at most a few in practice).
const STATEMENTS_PER_TABLE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteKind {
    Row,
    Tombstone,
}

/// A statement's text and what distinguishes the deltas it writes: the kind of write and
/// the names and unchanged flags of the columns it binds. A tombstone also clears every
/// other column of the table, which [`TableShape::reshaped`] accounts for.
#[derive(Debug, Clone)]
struct ShapedSql {
    kind: WriteKind,
    columns: Vec<(String, bool)>,
    sql: Rc<str>,
}

impl ShapedSql {
    fn writes(&self, kind: WriteKind, columns: &[ColumnView<'_>]) -> bool {
        self.kind == kind
            && self.columns.len() == columns.len()
            && self.columns.iter().zip(columns).all(|((name, unchanged), c)| *unchanged == c.unchanged && *name == c.name)
    }
}

impl TableShape {
    fn new(columns: Vec<String>, key: Vec<String>, truncated_at: (i64, i64)) -> Self {
        TableShape { columns, key, truncated_at, changes: HashMap::new(), statements: Vec::new() }
    }

    fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }

    /// Forgets the statements: the columns changed.
    fn reshaped(&mut self) {
        self.statements.clear();
    }

    /// The statement writing `columns`, built by `build` the first time.
    fn statement(&mut self, kind: WriteKind, columns: &[ColumnView<'_>], build: impl FnOnce(&TableShape) -> String) -> Rc<str> {
        match self.statements.iter().position(|s| s.writes(kind, columns)) {
            Some(0) => {}
            Some(i) => self.statements[..=i].rotate_right(1),
            None => {
                let sql = build(self).into();
                self.statements.truncate(STATEMENTS_PER_TABLE - 1);
                let columns = columns.iter().map(|c| (c.name.to_string(), c.unchanged)).collect();
                self.statements.insert(0, ShapedSql { kind, columns, sql });
            }
        }
        self.statements[0].sql.clone()
    }
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

pub struct Store {
    conn: Connection,
    tables: HashMap<String, TableShape>,
    /// Tables this device keeps; `None` for all. Deltas of other tables only move positions.
    subscribed: Option<HashSet<String>>,
    _lock: StoreLock,
}

/// One process per store: an exclusive `flock` on `<store>.lock`, released when the
/// process ends, however it ends.
pub(crate) struct StoreLock {
    _file: std::fs::File,
}

impl StoreLock {
    pub(crate) fn acquire(store: &Path) -> Result<StoreLock, StoreError> {
        let mut name = store.as_os_str().to_owned();
        name.push(".lock");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&name).map_err(StoreError::Io)?;
        // SAFETY: flock(2) on a descriptor this function owns.
        let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            return Err(StoreError::InUse(store.to_path_buf()));
        }
        Ok(StoreLock { _file: file })
    }
}

/// Name of the SQLite table holding `schema.table`.
pub fn sqlite_table(table: &str) -> String {
    quote_ident(table)
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let lock = StoreLock::acquire(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        check_layout(&conn)?;
        conn.execute_batch(META_SQL)?;
        conn.pragma_update(None, "user_version", LAYOUT_VERSION)?;
        let mut store = Store { conn, tables: HashMap::new(), subscribed: None, _lock: lock };
        store.load_shapes()?;
        Ok(store)
    }

    fn load_shapes(&mut self) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT c.table_name, c.column_name, c.is_key, coalesce(t.truncate_lsn, -1), coalesce(t.truncate_seq, -1)
               FROM _pgfanout_columns c LEFT JOIN _pgfanout_tables t ON t.table_name = c.table_name
              ORDER BY c.table_name, c.ordinal",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?))
        })?;
        for row in rows {
            let (table, column, is_key, tl, ts) = row?;
            let shape = self.tables.entry(table).or_insert_with(|| TableShape::new(Vec::new(), Vec::new(), (tl, ts)));
            if is_key {
                shape.key.push(column.clone());
            }
            shape.columns.push(column);
        }
        drop(stmt);
        let mut stmt = self.conn.prepare("SELECT table_name, column_name, lsn, seq, dropped FROM _pgfanout_column_changes")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, (r.get::<_, i64>(2)?, r.get::<_, i64>(3)?), r.get::<_, bool>(4)?))
        })?;
        for row in rows {
            let (table, column, version, dropped) = row?;
            if let Some(shape) = self.tables.get_mut(&table) {
                shape.changes.insert(column, (version, dropped));
            }
        }
        Ok(())
    }

    /// Keep only these tables (`schema.table`); deltas of others still move offsets and
    /// the watermark.
    pub fn subscribe_to(&mut self, tables: Option<HashSet<String>>) {
        self.subscribed = tables;
    }

    /// Sets the next offset to consume of the given partitions: the device re-reads from
    /// there. Applied positions are kept; re-applied deltas change only older rows.
    pub fn rewind(&mut self, topic: &str, offsets: &HashMap<i32, i64>) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for (partition, offset) in offsets {
            tx.execute(
                "INSERT INTO _pgfanout_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                params![topic, partition, offset],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Next offset to consume per partition of `topic`.
    pub fn offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT partition, next_offset FROM _pgfanout_offsets WHERE topic = ?1")?;
        let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per partition of `topic`: the LSN at or below which every transaction's deltas in
    /// that partition are applied.
    pub fn applied_lsns(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT partition, applied_lsn FROM _pgfanout_offsets WHERE topic = ?1")?;
        let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A durable counter (`processed`, `applied`, ...), kept in the same transactions as
    /// the rows.
    pub fn counter(&self, name: &str) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM _pgfanout_counters WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Applies a batch of records and records their offsets, in one SQLite transaction.
    pub fn apply_batch(&mut self, topic: &str, records: &[Record<'_>]) -> Result<BatchStats, StoreError> {
        let tx = self.conn.transaction()?;
        let mut statements = BatchStatements::new(&tx);
        let mut stats = BatchStats::default();
        // (partition, next offset, applied LSN): a handful of partitions, searched in place.
        let mut next_offsets: Vec<(i32, i64, i64)> = Vec::new();
        let mut applied_by_op = [0u64; 6];
        for record in records {
            stats.processed += 1;
            let i = match next_offsets.iter().position(|(p, _, _)| *p == record.partition) {
                Some(i) => i,
                None => {
                    next_offsets.push((record.partition, 0, 0));
                    next_offsets.len() - 1
                }
            };
            let entry = &mut next_offsets[i];
            entry.1 = entry.1.max(record.offset + 1);
            match &record.delta {
                Ok(None) => stats.tombstones += 1,
                Ok(Some(delta)) if record.tombstone => {
                    // Usually the delete delta before it was applied already and this
                    // changes nothing; after compaction it is the only news of the delete.
                    stats.tombstones += 1;
                    if delta.op != DeltaOp::Delete {
                        reject(&tx, topic, record, "a tombstone's header carries a delete, not another change")?;
                        stats.rejected += 1;
                    } else if self.subscribed.as_ref().is_none_or(|t| t.contains(delta.table)) {
                        if let Err(e) = apply_delta(&tx, &mut statements, &mut self.tables, delta) {
                            match e {
                                ApplyError::Sqlite(e) => return Err(e.into()),
                                ApplyError::Invalid(reason) => {
                                    reject(&tx, topic, record, &reason)?;
                                    stats.rejected += 1;
                                }
                            }
                        }
                    }
                }
                Ok(Some(delta)) => {
                    // Within a partition deltas come in WAL order: a delta of the
                    // transaction committed at C means every earlier transaction is complete
                    // here; a watermark W means every transaction at or below W is.
                    let complete_below = if delta.op == DeltaOp::Watermark { delta.commit_lsn } else { delta.commit_lsn - 1 };
                    entry.2 = entry.2.max(complete_below);
                    if delta.op == DeltaOp::Watermark {
                        stats.watermarks += 1;
                        continue;
                    }
                    if self.subscribed.as_ref().is_some_and(|t| !t.contains(delta.table)) {
                        stats.not_subscribed += 1;
                        continue;
                    }
                    match apply_delta(&tx, &mut statements, &mut self.tables, delta) {
                        Ok(true) => {
                            stats.applied += 1;
                            applied_by_op[delta.op as usize] += 1;
                        }
                        Ok(false) => stats.skipped_older += 1,
                        Err(ApplyError::Sqlite(e)) => return Err(e.into()),
                        Err(ApplyError::Invalid(reason)) => {
                            reject(&tx, topic, record, &reason)?;
                            stats.rejected += 1;
                        }
                    }
                }
                Err(reason) => {
                    reject(&tx, topic, record, reason)?;
                    stats.rejected += 1;
                }
            }
        }
        drop(statements);
        for op in [DeltaOp::Insert, DeltaOp::Update, DeltaOp::Delete, DeltaOp::Truncate, DeltaOp::Snapshot] {
            if applied_by_op[op as usize] > 0 {
                stats.applied_by_op.insert(op.as_str(), applied_by_op[op as usize]);
            }
        }
        for (partition, next, applied) in &next_offsets {
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
        ] {
            if n > 0 {
                tx.execute(
                    "INSERT INTO _pgfanout_counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    params![name, n as i64],
                )?;
            }
        }
        // Reloaded on the next open if this commit fails.
        tx.commit()?;
        Ok(stats)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

fn reject(tx: &rusqlite::Transaction<'_>, topic: &str, record: &Record<'_>, reason: &str) -> Result<(), rusqlite::Error> {
    tracing::warn!(
        partition = record.partition,
        offset = record.offset,
        reason,
        "delta cannot be applied; recorded in _pgfanout_rejected"
    );
    tx.execute(
        "INSERT OR REPLACE INTO _pgfanout_rejected (topic, partition, record_offset, reason) VALUES (?1, ?2, ?3, ?4)",
        params![topic, record.partition, record.offset, reason],
    )?;
    Ok(())
}

enum ApplyError {
    Sqlite(rusqlite::Error),
    /// A delta that decodes but makes no sense (no key, reserved column names...).
    Invalid(String),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Sqlite(e)
    }
}

/// Applies one delta if it is newer than what the store holds; `Ok(true)` if it changed
/// anything.
fn apply_delta(
    tx: &rusqlite::Transaction<'_>,
    statements: &mut BatchStatements<'_>,
    tables: &mut HashMap<String, TableShape>,
    delta: &DeltaView<'_>,
) -> Result<bool, ApplyError> {
    let version = delta.version();
    match delta.op {
        DeltaOp::Watermark => Ok(false), // positions only; handled by the caller
        DeltaOp::Truncate => {
            let Some(shape) = tables.get_mut(delta.table) else {
                // Nothing of this table here yet, but rows older than the truncate may still
                // arrive from other partitions: remember it for when the table is created.
                if truncated_at(tx, delta.table)? >= version {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO _pgfanout_tables (table_name, truncate_lsn, truncate_seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (table_name) DO UPDATE SET truncate_lsn = excluded.truncate_lsn, truncate_seq = excluded.truncate_seq",
                    params![delta.table, version.0, version.1],
                )?;
                return Ok(true);
            };
            if shape.truncated_at >= version {
                return Ok(false);
            }
            shape.truncated_at = version;
            tx.execute(
                "INSERT INTO _pgfanout_tables (table_name, truncate_lsn, truncate_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (table_name) DO UPDATE SET truncate_lsn = excluded.truncate_lsn, truncate_seq = excluded.truncate_seq",
                params![delta.table, version.0, version.1],
            )?;
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
            let (shape, row) = ensure_shape(tx, tables, delta.table, &delta.key, row, version, delta.op != DeltaOp::Delete)?;
            if shape.truncated_at >= version {
                return Ok(false);
            }
            if let Some(old_key) = &delta.old_key {
                if !same_key(old_key, &delta.key) {
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

fn same_key(a: &[ColumnView<'_>], b: &[ColumnView<'_>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.name == y.name && x.value == y.value)
}

fn is_reserved(name: &str) -> bool {
    name.starts_with("_pgfanout_")
}

/// Creates the table, or follows PostgreSQL's column changes: adds the columns the delta
/// brings, and drops those a full row newer than their addition no longer has. Returns the
/// table's shape and the row without the columns dropped after this delta was written.
fn ensure_shape<'t, 'r, 'd>(
    tx: &rusqlite::Transaction<'_>,
    tables: &'t mut HashMap<String, TableShape>,
    table: &str,
    key: &[ColumnView<'d>],
    row: &'r [ColumnView<'d>],
    version: (i64, i64),
    full_row: bool,
) -> Result<(&'t mut TableShape, Cow<'r, [ColumnView<'d>]>), ApplyError> {
    if let Some(c) = key.iter().chain(row).find(|c| is_reserved(c.name)) {
        return Err(ApplyError::Invalid(format!("column name {:?} is reserved on devices", c.name)));
    }
    // Formatted only for a change of the table's columns, not for every delta.
    let t = || sqlite_table(table);
    if !tables.contains_key(table) {
        let mut cols = Vec::new();
        let mut defs = Vec::new();
        for c in key.iter().chain(row.iter().filter(|c| !key.iter().any(|k| k.name == c.name))) {
            defs.push(format!("{} {}", quote_ident(c.name), sqlite_type(c.type_name)));
            cols.push(c);
        }
        let pk = key.iter().map(|k| quote_ident(k.name)).collect::<Vec<_>>().join(", ");
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({}, {LSN} INTEGER NOT NULL, {SEQ} INTEGER NOT NULL, {DELETED} INTEGER NOT NULL DEFAULT 0, PRIMARY KEY ({pk}))",
            t(),
            defs.join(", ")
        ))?;
        let mut shape = TableShape::new(
            cols.iter().map(|c| c.name.to_string()).collect(),
            key.iter().map(|k| k.name.to_string()).collect(),
            truncated_at(tx, table)?,
        );
        for (i, c) in cols.iter().enumerate() {
            record_column(tx, table, c, key.iter().any(|k| k.name == c.name), i)?;
            record_change(tx, &mut shape, table, c.name, version, false)?;
        }
        tables.insert(table.to_string(), shape);
    }
    let Some(shape) = tables.get_mut(table) else {
        return Err(ApplyError::Invalid(format!("table {table} vanished")));
    };
    let mut dropped_later = 0;
    for c in row {
        if shape.has_column(c.name) {
            continue;
        }
        if shape.changes.get(c.name).is_some_and(|(v, dropped)| *dropped && *v > version) {
            dropped_later += 1;
            continue;
        }
        tx.execute_batch(&format!("ALTER TABLE {} ADD COLUMN {} {}", t(), quote_ident(c.name), sqlite_type(c.type_name)))?;
        record_column(tx, table, c, false, shape.columns.len())?;
        record_change(tx, shape, table, c.name, version, false)?;
        shape.columns.push(c.name.to_string());
        shape.reshaped();
    }
    // Every column of the table is in the row unless one was dropped: the common case
    // costs a comparison of lengths.
    if full_row && row.len() - dropped_later < shape.columns.len() {
        let gone: Vec<String> = shape
            .columns
            .iter()
            .filter(|c| !shape.key.contains(c) && !row.iter().any(|r| r.name == c.as_str()))
            .filter(|c| shape.changes.get(*c).is_some_and(|(v, _)| *v < version))
            .cloned()
            .collect();
        for c in gone {
            tx.execute_batch(&format!("ALTER TABLE {} DROP COLUMN {}", t(), quote_ident(&c)))?;
            tx.execute("DELETE FROM _pgfanout_columns WHERE table_name = ?1 AND column_name = ?2", params![table, c])?;
            record_change(tx, shape, table, &c, version, true)?;
            shape.columns.retain(|x| *x != c);
            shape.reshaped();
        }
    }
    let row = if dropped_later == 0 {
        Cow::Borrowed(row)
    } else {
        Cow::Owned(row.iter().filter(|c| shape.has_column(c.name)).cloned().collect())
    };
    Ok((shape, row))
}

/// The version of the last truncate of `table` recorded in the store; `(-1, -1)` for none.
fn truncated_at(tx: &rusqlite::Transaction<'_>, table: &str) -> Result<(i64, i64), rusqlite::Error> {
    tx.query_row("SELECT truncate_lsn, truncate_seq FROM _pgfanout_tables WHERE table_name = ?1", [table], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
    .map(|v| v.unwrap_or((-1, -1)))
}

fn record_change(
    tx: &rusqlite::Transaction<'_>,
    shape: &mut TableShape,
    table: &str,
    column: &str,
    version: (i64, i64),
    dropped: bool,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT OR REPLACE INTO _pgfanout_column_changes (table_name, column_name, lsn, seq, dropped) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![table, column, version.0, version.1, dropped],
    )?;
    shape.changes.insert(column.to_string(), (version, dropped));
    Ok(())
}

fn record_column(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    c: &ColumnView<'_>,
    is_key: bool,
    ordinal: usize,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT OR REPLACE INTO _pgfanout_columns (table_name, column_name, pg_type, is_key, ordinal) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![table, c.name, c.type_name, is_key, ordinal as i64],
    )?;
    Ok(())
}

/// SQLite column type for a PostgreSQL type: integers and booleans as INTEGER, floats as
/// REAL, bytea as BLOB, everything else (numeric, timestamps, json, ...) as exact TEXT.
pub fn sqlite_type(pg_type: &str) -> &'static str {
    match ValueKind::of_pg_type(pg_type) {
        ValueKind::Boolean | ValueKind::Long => "INTEGER",
        ValueKind::Double => "REAL",
        ValueKind::Bytes => "BLOB",
        ValueKind::Text => "TEXT",
    }
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
            ValueView::Double(f) => ValueRef::Real(f),
            ValueView::String(s) => ValueRef::Text(s.as_bytes()),
            ValueView::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// Reads a stored value back into its typed form, by the column's PostgreSQL type.
pub fn value_from_sqlite(pg_type: &str, v: ValueRef<'_>) -> Value {
    match (ValueKind::of_pg_type(pg_type), v) {
        (_, ValueRef::Null) => Value::Null,
        (ValueKind::Boolean, ValueRef::Integer(i)) => Value::Boolean(i != 0),
        (ValueKind::Double, ValueRef::Real(f)) => Value::Double(f),
        (ValueKind::Double, ValueRef::Integer(i)) => Value::Double(i as f64),
        (ValueKind::Double, ValueRef::Text(b"NaN")) => Value::Double(f64::NAN),
        (_, ValueRef::Integer(i)) => Value::Long(i),
        (_, ValueRef::Real(f)) => Value::Double(f),
        (_, ValueRef::Text(t)) => Value::String(String::from_utf8_lossy(t).into_owned()),
        (_, ValueRef::Blob(b)) => Value::Bytes(b.to_vec()),
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
