//! Reading a store: its positions, counters, rejected records and live rows, for the
//! device that holds it and for readers beside a running device (`pgfanout status`,
//! `pgfanout verify`), which open it read-only and take no lock.

use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::schema::{sqlite_table, DELETED};
use crate::contract::value::ValueKind;
use crate::contract::Value;
use crate::quote::quote_ident;

/// Opens a store for reading only; a running device may keep writing it.
pub fn open_read_only(path: &Path) -> Result<Connection, rusqlite::Error> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
}

/// Where the store stands in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    /// The next offset to consume.
    pub next_offset: i64,
    /// The LSN at or below which every transaction's deltas in the partition are applied.
    pub applied_lsn: i64,
}

/// Where the state a reader of the store sees stands (`_pgfanout_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreState {
    /// Every transaction that committed in PostgreSQL below this LSN is in the store, and
    /// none at or after it.
    pub lsn: i64,
    /// The newest transaction in the store: its commit LSN and commit time (Unix
    /// microseconds); 0 before the first.
    pub commit_lsn: i64,
    pub commit_time: i64,
}

/// A record the store could not apply, at its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// Read accessors over a store's connection.
#[derive(Clone, Copy)]
pub struct StoreReader<'c> {
    conn: &'c Connection,
}

impl<'c> StoreReader<'c> {
    pub fn new(conn: &'c Connection) -> Self {
        StoreReader { conn }
    }

    /// Per partition of `topic` that the store has consumed from.
    pub fn positions(&self, topic: &str) -> Result<Vec<Position>, rusqlite::Error> {
        let mut stmt = self.conn.prepare("SELECT partition, next_offset, applied_lsn FROM _pgfanout_offsets WHERE topic = ?1")?;
        let rows =
            stmt.query_map([topic], |r| Ok(Position { partition: r.get(0)?, next_offset: r.get(1)?, applied_lsn: r.get(2)? }))?;
        rows.collect()
    }

    /// A durable counter (`processed`, `applied`, ...), kept in the same transactions as
    /// the rows; 0 before its first increment.
    pub fn counter(&self, name: &str) -> Result<i64, rusqlite::Error> {
        Ok(self
            .conn
            .query_row("SELECT value FROM _pgfanout_counters WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    /// Where the state of `topic`'s tables in the store stands; `None` before the first
    /// batch.
    pub fn state(&self, topic: &str) -> Result<Option<StoreState>, rusqlite::Error> {
        self.conn
            .query_row("SELECT lsn, commit_lsn, commit_time FROM _pgfanout_state WHERE topic = ?1", [topic], |r| {
                Ok(StoreState { lsn: r.get(0)?, commit_lsn: r.get(1)?, commit_time: r.get(2)? })
            })
            .optional()
    }

    /// Every counter, by name.
    pub fn counters(&self) -> Result<Vec<(String, i64)>, rusqlite::Error> {
        let mut stmt = self.conn.prepare("SELECT name, value FROM _pgfanout_counters ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// The records that could not be applied.
    pub fn rejected(&self) -> Result<Vec<Rejected>, rusqlite::Error> {
        let mut stmt = self.conn.prepare("SELECT topic, partition, record_offset, reason FROM _pgfanout_rejected")?;
        let rows = stmt
            .query_map([], |r| Ok(Rejected { topic: r.get(0)?, partition: r.get(1)?, offset: r.get(2)?, reason: r.get(3)? }))?;
        rows.collect()
    }

    /// The columns the store knows of `table` (`schema.table`); none if it never saw it.
    pub fn known_columns(&self, table: &str) -> Result<Vec<String>, rusqlite::Error> {
        let mut stmt = self.conn.prepare("SELECT column_name FROM _pgfanout_columns WHERE table_name = ?1")?;
        let names = stmt.query_map([table], |r| r.get::<_, String>(0))?;
        names.collect()
    }

    /// Calls `each` with every live (not deleted) row of `table`, holding `columns` in
    /// this order.
    pub fn for_each_live_row(
        &self,
        table: &str,
        columns: &[&str],
        mut each: impl FnMut(&rusqlite::Row<'_>) -> Result<(), rusqlite::Error>,
    ) -> Result<(), rusqlite::Error> {
        let select = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let mut stmt = self.conn.prepare(&format!("SELECT {select} FROM {} WHERE {DELETED} = 0", sqlite_table(table)))?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
        Ok(())
    }
}

/// How a store keeps `-0.0` in a REAL column (big-endian IEEE 754 bits): SQLite would turn
/// it into 0 as a number, and into a number again as text.
pub const NEGATIVE_ZERO: [u8; 8] = [0x80, 0, 0, 0, 0, 0, 0, 0];

/// Reads a stored value back into its typed form, by the column's PostgreSQL type.
pub fn value_from_sqlite(pg_type: &str, v: ValueRef<'_>) -> Value {
    match (ValueKind::of_pg_type(pg_type), v) {
        (_, ValueRef::Null) => Value::Null,
        (ValueKind::Boolean, ValueRef::Integer(i)) => Value::Boolean(i != 0),
        (ValueKind::Double, ValueRef::Real(f)) => Value::Double(f),
        (ValueKind::Double, ValueRef::Integer(i)) => Value::Double(i as f64),
        (ValueKind::Double, ValueRef::Text(b"NaN")) => Value::Double(f64::NAN),
        (ValueKind::Double, ValueRef::Blob(b)) if b == NEGATIVE_ZERO => Value::Double(-0.0),
        (_, ValueRef::Integer(i)) => Value::Long(i),
        (_, ValueRef::Real(f)) => Value::Double(f),
        (_, ValueRef::Text(t)) => Value::String(String::from_utf8_lossy(t).into_owned()),
        (_, ValueRef::Blob(b)) => Value::Bytes(b.to_vec()),
    }
}
