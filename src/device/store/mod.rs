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
//! records device offsets.//!
//! Parts: [`schema`] (the store's own tables, and each replicated table's shape), [`apply`]
//! (a batch of records in one transaction), [`read`] (accessors, also for readers beside a
//! running device).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{params, Connection};

mod apply;
mod consistent;
mod error;
mod fragments;
mod moved;
mod read;
mod schema;
mod staged;

pub use apply::{BatchStats, Record};
pub use consistent::DEFAULT_HOLD_MIB;
pub use error::StoreError;
pub use fragments::Fragment;
pub use read::{open_read_only, value_from_sqlite, Position, Rejected, StoreReader, StoreState};
use schema::{check_layout, load_shapes, TableShape, LAYOUT_VERSION, META_SQL};
pub use schema::{sqlite_table, sqlite_type};

pub struct Store {
    conn: Connection,
    tables: HashMap<String, TableShape>,
    /// Tables this device keeps; `None` for all. Deltas of other tables only move positions.
    subscribed: Option<HashSet<String>>,
    /// Watermarks, consumed positions and held deltas ([`consistent`]).
    cut: consistent::CutState,
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
impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let lock = StoreLock::acquire(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        check_layout(&conn)?;
        conn.execute_batch(META_SQL)?;
        conn.execute_batch(consistent::STAGED_SQL)?;
        conn.execute_batch(fragments::FRAGMENTS_SQL)?;
        conn.pragma_update(None, "user_version", LAYOUT_VERSION)?;
        let tables = load_shapes(&conn)?;
        Ok(Store { conn, tables, subscribed: None, cut: consistent::CutState::default(), _lock: lock })
    }
    /// Keep only these tables (`schema.table`); deltas of others still move offsets and
    /// the watermark.
    pub fn subscribe_to(&mut self, tables: Option<HashSet<String>>) {
        self.subscribed = tables;
    }

    /// The partitions of the deltas topic: a transaction is complete once the watermarks
    /// of all of them passed it. Until told, the store counts the partitions it has seen.
    pub fn set_partitions(&mut self, partitions: Vec<i32>) {
        self.cut.set_partitions(partitions);
    }

    /// Held deltas kept in memory (by an estimate of their size) before they are staged in
    /// the store (default [`DEFAULT_HOLD_MIB`] MiB).
    pub fn set_hold_bytes(&mut self, bytes: usize) {
        self.cut.set_hold_bytes(bytes);
    }

    /// Sets the next offset to consume of the given partitions: the device re-reads from
    /// there. Applied positions are kept; re-applied deltas change only older rows.
    pub fn rewind(&mut self, topic: &str, offsets: &HashMap<i32, i64>) -> Result<(), StoreError> {
        consistent::abandon(&self.conn, &mut self.cut);
        let tx = self.conn.transaction()?;
        for (partition, offset) in offsets {
            tx.execute(
                "INSERT INTO _pgfanout_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                params![topic, partition, offset],
            )?;
            // Records from there on are new to the store: applied and counted again.
            tx.execute("DELETE FROM _pgfanout_consumed WHERE topic = ?1 AND partition = ?2", params![topic, partition])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Next offset to consume per partition of `topic`.
    pub fn offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        Ok(self.reader().positions(topic)?.into_iter().map(|p| (p.partition, p.next_offset)).collect())
    }

    /// Per partition of `topic`: the LSN at or below which every transaction's deltas in
    /// that partition are applied.
    pub fn applied_lsns(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        Ok(self.reader().positions(topic)?.into_iter().map(|p| (p.partition, p.applied_lsn)).collect())
    }

    /// A durable counter (`processed`, `applied`, ...), kept in the same transactions as
    /// the rows.
    pub fn counter(&self, name: &str) -> Result<i64, StoreError> {
        Ok(self.reader().counter(name)?)
    }

    /// Applies a batch of records and records their offsets, in one SQLite transaction,
    /// so that the store shows only states PostgreSQL had at a commit ([`consistent`]):
    /// deltas of transactions not yet complete on every partition are held.
    pub fn apply_batch(&mut self, topic: &str, records: &[Record<'_>]) -> Result<BatchStats, StoreError> {
        consistent::apply_batch(&mut self.conn, &mut self.tables, self.subscribed.as_ref(), &mut self.cut, topic, records)
    }

    /// Read accessors ([`StoreReader`]).
    pub fn reader(&self) -> StoreReader<'_> {
        StoreReader::new(&self.conn)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod ddl_tests;
#[cfg(test)]
mod tests;
