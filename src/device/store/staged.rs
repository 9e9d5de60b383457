//! Held deltas and the staging table: what waits for the cut, in memory or in the store.

use rusqlite::{params, Connection};

use crate::contract::view::DeltaView;
use crate::contract::DeltaOp;

/// A delta waiting for the cut to pass its transaction: its encoding, as read, and where
/// it was read. Held as bytes, it takes what its record took, with nothing to allocate per
/// column.
pub(super) struct Held {
    pub(super) at: Staged,
    pub(super) version: (i64, i64),
    /// Its order against other partitions' deltas does not matter ([`plain`]).
    pub(super) plain: bool,
    pub(super) bytes: Box<[u8]>,
}

impl Held {
    /// What it takes in memory.
    pub(super) fn size(&self) -> usize {
        self.bytes.len() + std::mem::size_of::<Held>()
    }
}

/// Where a held or staged delta was read.
#[derive(Clone, Copy)]
pub(super) struct Staged {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) tombstone: bool,
}

/// Held deltas written to the staging table by one statement.
const STAGE_ROWS: usize = 64;

/// Writes held deltas to the staging table, [`STAGE_ROWS`] a statement; returns how many.
pub(super) fn stage(tx: &Connection, topic: &str, held: &[Held]) -> Result<u64, rusqlite::Error> {
    let mut chunks = held.chunks_exact(STAGE_ROWS);
    if held.len() >= STAGE_ROWS {
        let mut stmt = tx.prepare_cached(&stage_sql(STAGE_ROWS))?;
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(STAGE_ROWS * 7);
        for chunk in chunks.by_ref() {
            values.clear();
            for h in chunk {
                values.extend([&topic as &dyn rusqlite::ToSql, &h.at.partition, &h.at.offset, &h.version.0, &h.version.1]);
                values.extend([&h.at.tombstone as &dyn rusqlite::ToSql, &h.bytes]);
            }
            stmt.execute(values.as_slice())?;
        }
    }
    for h in chunks.remainder() {
        stage_encoded(tx, topic, &h.at, h.version, &h.bytes)?;
    }
    tracing::debug!(deltas = held.len(), "held deltas staged in the store");
    Ok(held.len() as u64)
}

/// The statement that stages `rows` deltas.
fn stage_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT OR REPLACE INTO _pgfanout_staged (topic, partition, record_offset, commit_lsn, seq, tombstone, delta)
         VALUES {values}"
    )
}

/// Writes one encoded delta to the staging table.
pub(super) fn stage_encoded(
    tx: &Connection,
    topic: &str,
    at: &Staged,
    (commit_lsn, seq): (i64, i64),
    bytes: &[u8],
) -> Result<u64, rusqlite::Error> {
    tx.prepare_cached(&stage_sql(1))?.execute(params![topic, at.partition, at.offset, commit_lsn, seq, at.tombstone, bytes])?;
    Ok(1)
}

/// A delta whose order against other partitions' deltas does not matter: an insert,
/// update, delete or snapshot row of one key. Every delta of a row lies in its key's
/// partition, in order, and each changes the row only if newer. A key change (it reads the
/// old row, in another partition), a move, a truncate and a drop reach beyond their
/// partition and apply in version order.
pub(super) fn plain(delta: &DeltaView<'_>) -> bool {
    match delta.op {
        DeltaOp::Insert | DeltaOp::Snapshot => delta.old_key.is_none(),
        DeltaOp::Update => delta.old_key.is_none() && delta.after.is_some(),
        DeltaOp::Delete => true,
        DeltaOp::Truncate | DeltaOp::Drop | DeltaOp::Watermark => false,
    }
}
