//! The store's own tables (its bookkeeping, and the layout version that guards it) and
//! the shape of each replicated table: its columns, their types and its key as PostgreSQL
//! last described them, its last truncate or drop, and the statement texts that write it.
//!
//! Shapes follow PostgreSQL by versions, so that a delta older than a change of shape
//! neither undoes it nor triggers it again: a column is added by the first delta that
//! carries it, dropped by the first full row newer than its addition that lacks it, and
//! takes a new type's SQLite affinity from the first `snapshot` row newer than its last
//! change that carries the new type (capture copies a table again after DDL, so the copy's
//! rows bring every change of columns; values are kept through a change of affinity). A
//! `drop` removes the table's rows older than it, and the table itself when nothing newer
//! is left; it is remembered like a truncate, so that older deltas do not create it again.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use rusqlite::{params, Connection, OptionalExtension};

use super::error::{ApplyError, StoreError};
use crate::contract::value::ValueKind;
use crate::contract::view::ColumnView;
use crate::contract::DeltaOp;
use crate::quote::quote_ident;

/// Hidden columns of every replicated table.
pub(super) const LSN: &str = "_pgfanout_lsn";
pub(super) const SEQ: &str = "_pgfanout_seq";
pub(super) const DELETED: &str = "_pgfanout_deleted";

pub(super) const META_SQL: &str = "
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

/// Version of the store's own tables (`PRAGMA user_version`).
pub(super) const LAYOUT_VERSION: i64 = 1;

/// Refuses stores whose bookkeeping tables this version does not know.
pub(super) fn check_layout(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let has_tables: i64 =
        conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = '_pgfanout_offsets'", [], |r| r.get(0))?;
    if (version == 0 && has_tables > 0) || version > LAYOUT_VERSION {
        return Err(StoreError::Layout { found: version, known: LAYOUT_VERSION });
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub(super) struct TableShape {
    /// Known columns, in order of first appearance.
    pub(super) columns: Vec<String>,
    pub(super) key: Vec<String>,
    /// Each column's PostgreSQL type, as recorded.
    pub(super) types: HashMap<String, String>,
    /// The commit LSN of the last `snapshot` rows whose types were compared with `types`
    /// (all rows of one copy share it: their types are compared once).
    pub(super) types_checked_at: i64,
    pub(super) truncated_at: (i64, i64),
    /// The version of each column's last addition or drop (`true`), so that deltas older
    /// than a change neither undo it nor trigger it again.
    pub(super) changes: HashMap<String, ((i64, i64), bool)>,
    /// Statement texts by the shape of the deltas they write, most recently used first, so
    /// that the hot path formats no SQL. Deltas of a table nearly always have one shape:
    /// the first entry matches after a comparison of column names, with nothing allocated
    /// or hashed.
    pub(super) statements: Vec<ShapedSql>,
}

/// The most statement texts kept per table (one per combination of unchanged TOAST
/// columns, at most a few in practice).
pub(super) const STATEMENTS_PER_TABLE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteKind {
    Row,
    Tombstone,
}

/// A statement's text and what distinguishes the deltas it writes: the kind of write and
/// the names and unchanged flags of the columns it binds. A tombstone also clears every
/// other column of the table, which [`TableShape::reshaped`] accounts for.
#[derive(Debug, Clone)]
pub(super) struct ShapedSql {
    pub(super) kind: WriteKind,
    pub(super) columns: Vec<(String, bool)>,
    pub(super) sql: Rc<str>,
}

impl ShapedSql {
    pub(super) fn writes(&self, kind: WriteKind, columns: &[ColumnView<'_>]) -> bool {
        self.kind == kind
            && self.columns.len() == columns.len()
            && self.columns.iter().zip(columns).all(|((name, unchanged), c)| *unchanged == c.unchanged && *name == c.name)
    }
}

impl TableShape {
    pub(super) fn new(columns: Vec<String>, key: Vec<String>, truncated_at: (i64, i64)) -> Self {
        TableShape {
            columns,
            key,
            types: HashMap::new(),
            types_checked_at: -1,
            truncated_at,
            changes: HashMap::new(),
            statements: Vec::new(),
        }
    }

    pub(super) fn has_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c == name)
    }

    /// Forgets the statements: the columns changed.
    pub(super) fn reshaped(&mut self) {
        self.statements.clear();
    }

    /// The statement writing `columns`, built by `build` the first time.
    pub(super) fn statement(
        &mut self,
        kind: WriteKind,
        columns: &[ColumnView<'_>],
        build: impl FnOnce(&TableShape) -> String,
    ) -> Rc<str> {
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

/// Name of the SQLite table holding `schema.table`.
pub fn sqlite_table(table: &str) -> String {
    quote_ident(table)
}
/// The shapes of the replicated tables, as recorded in the store.
pub(super) fn load_shapes(conn: &Connection) -> Result<HashMap<String, TableShape>, rusqlite::Error> {
    let mut tables = HashMap::new();
    let mut stmt = conn.prepare(
        "SELECT c.table_name, c.column_name, c.is_key, coalesce(t.truncate_lsn, -1), coalesce(t.truncate_seq, -1), c.pg_type
           FROM _pgfanout_columns c LEFT JOIN _pgfanout_tables t ON t.table_name = c.table_name
          ORDER BY c.table_name, c.ordinal",
    )?;
    let rows = stmt.query_map([], |r| {
        let head = (r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, bool>(2)?);
        Ok((head, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?, r.get::<_, String>(5)?))
    })?;
    for row in rows {
        let ((table, column, is_key), tl, ts, pg_type) = row?;
        let shape = tables.entry(table).or_insert_with(|| TableShape::new(Vec::new(), Vec::new(), (tl, ts)));
        if is_key {
            shape.key.push(column.clone());
        }
        shape.types.insert(column.clone(), pg_type);
        shape.columns.push(column);
    }
    drop(stmt);
    let mut stmt = conn.prepare("SELECT table_name, column_name, lsn, seq, dropped FROM _pgfanout_column_changes")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, (r.get::<_, i64>(2)?, r.get::<_, i64>(3)?), r.get::<_, bool>(4)?))
    })?;
    for row in rows {
        let (table, column, version, dropped) = row?;
        if let Some(shape) = tables.get_mut(&table) {
            shape.changes.insert(column, (version, dropped));
        }
    }
    Ok(tables)
}

pub(super) fn is_reserved(name: &str) -> bool {
    name.starts_with("_pgfanout_")
}
/// Creates the table, or follows PostgreSQL's column changes: adds the columns the delta
/// brings, retypes those a copy brings with a new type, and drops those a full row newer
/// than their addition no longer has. Returns the table's shape and the row without the
/// columns dropped after this delta was written; nothing when the table is not here and
/// the delta is older than its last truncate or drop.
#[allow(clippy::type_complexity)]
pub(super) fn ensure_shape<'t, 'r, 'd>(
    tx: &Connection,
    tables: &'t mut HashMap<String, TableShape>,
    table: &str,
    key: &[ColumnView<'d>],
    row: &'r [ColumnView<'d>],
    version: (i64, i64),
    op: DeltaOp,
) -> Result<Option<(&'t mut TableShape, Cow<'r, [ColumnView<'d>]>)>, ApplyError> {
    let full_row = op != DeltaOp::Delete;
    if let Some(c) = key.iter().chain(row).find(|c| is_reserved(c.name)) {
        return Err(ApplyError::Invalid(format!("column name {:?} is reserved on devices", c.name)));
    }
    // Formatted only for a change of the table's columns, not for every delta.
    let t = || sqlite_table(table);
    if !tables.contains_key(table) {
        let truncated = truncated_at(tx, table)?;
        if truncated >= version {
            return Ok(None);
        }
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
            truncated,
        );
        for (i, c) in cols.iter().enumerate() {
            record_column(tx, table, c, key.iter().any(|k| k.name == c.name), i)?;
            shape.types.insert(c.name.to_string(), c.type_name.to_string());
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
        shape.types.insert(c.name.to_string(), c.type_name.to_string());
        shape.reshaped();
    }
    if op == DeltaOp::Snapshot && shape.types_checked_at != version.0 {
        shape.types_checked_at = version.0;
        retype_columns(tx, shape, table, row, version)?;
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
            shape.types.remove(&c);
            shape.reshaped();
        }
    }
    let row = if dropped_later == 0 {
        Cow::Borrowed(row)
    } else {
        Cow::Owned(row.iter().filter(|c| shape.has_column(c.name)).cloned().collect())
    };
    Ok(Some((shape, row)))
}

/// Gives the columns of `row` whose PostgreSQL type changed since their last change the new
/// type; a new SQLite affinity means a new column, into which the values are copied (and
/// converted by the new affinity). Key columns keep their SQLite column.
fn retype_columns(
    tx: &Connection,
    shape: &mut TableShape,
    table: &str,
    row: &[ColumnView<'_>],
    version: (i64, i64),
) -> Result<(), ApplyError> {
    for c in row {
        let Some(old) = shape.types.get(c.name) else { continue };
        if old == c.type_name || shape.changes.get(c.name).is_some_and(|(v, _)| *v >= version) {
            continue;
        }
        let is_key = shape.key.iter().any(|k| k == c.name);
        if sqlite_type(old) != sqlite_type(c.type_name) && !is_key {
            let (t, name) = (sqlite_table(table), quote_ident(c.name));
            tx.execute_batch(&format!(
                "ALTER TABLE {t} RENAME COLUMN {name} TO {RETYPED};
                 ALTER TABLE {t} ADD COLUMN {name} {};
                 UPDATE {t} SET {name} = {RETYPED};
                 ALTER TABLE {t} DROP COLUMN {RETYPED};",
                sqlite_type(c.type_name)
            ))?;
            shape.reshaped();
        }
        let ordinal = shape.columns.iter().position(|x| x == c.name).unwrap_or(shape.columns.len());
        record_column(tx, table, c, is_key, ordinal)?;
        record_change(tx, shape, table, c.name, version, false)?;
        shape.types.insert(c.name.to_string(), c.type_name.to_string());
    }
    Ok(())
}

/// A column's temporary name while it changes affinity.
const RETYPED: &str = "_pgfanout_retyped";

/// Applies a `drop` of `table` at `version`: rows older than it go, and the table with its
/// recorded shape when no newer row is left; the version is kept as the table's truncate.
/// `Ok(true)` if it changed anything.
pub(super) fn drop_table(
    tx: &Connection,
    tables: &mut HashMap<String, TableShape>,
    table: &str,
    version: (i64, i64),
) -> Result<bool, rusqlite::Error> {
    let last = match tables.get(table) {
        Some(shape) => shape.truncated_at,
        None => truncated_at(tx, table)?,
    };
    if last >= version {
        return Ok(false);
    }
    record_truncate(tx, table, version)?;
    let Some(shape) = tables.get_mut(table) else { return Ok(true) };
    shape.truncated_at = version;
    let t = sqlite_table(table);
    let newer: bool = tx.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM {t} WHERE ({LSN}, {SEQ}) >= (?1, ?2))"),
        params![version.0, version.1],
        |r| r.get(0),
    )?;
    if newer {
        // A later table of that name: only what is older goes, as with a truncate.
        let nulls: String =
            shape.columns.iter().filter(|c| !shape.key.contains(c)).map(|c| format!("{} = NULL, ", quote_ident(c))).collect();
        tx.execute(
            &format!("UPDATE {t} SET {nulls}{DELETED} = 1, {LSN} = ?1, {SEQ} = ?2 WHERE ({LSN}, {SEQ}) < (?1, ?2)"),
            params![version.0, version.1],
        )?;
        return Ok(true);
    }
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {t}"))?;
    tx.execute("DELETE FROM _pgfanout_columns WHERE table_name = ?1", [table])?;
    tx.execute("DELETE FROM _pgfanout_column_changes WHERE table_name = ?1", [table])?;
    tables.remove(table);
    Ok(true)
}

/// The version of the last truncate of `table` recorded in the store; `(-1, -1)` for none.
pub(super) fn truncated_at(tx: &Connection, table: &str) -> Result<(i64, i64), rusqlite::Error> {
    tx.query_row("SELECT truncate_lsn, truncate_seq FROM _pgfanout_tables WHERE table_name = ?1", [table], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
    .map(|v| v.unwrap_or((-1, -1)))
}

pub(super) fn record_change(
    tx: &Connection,
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

pub(super) fn record_column(
    tx: &Connection,
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

/// Records the version of the last truncate of `table`.
pub(super) fn record_truncate(tx: &Connection, table: &str, version: (i64, i64)) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT INTO _pgfanout_tables (table_name, truncate_lsn, truncate_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT (table_name) DO UPDATE SET truncate_lsn = excluded.truncate_lsn, truncate_seq = excluded.truncate_seq",
        params![table, version.0, version.1],
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
