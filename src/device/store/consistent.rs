//! Transaction-consistent apply: a reader of the store only ever sees a state PostgreSQL
//! had at a commit.
//!
//! Why it holds. Capture sends a watermark `W` to a partition only once every delta of
//! every transaction committed before `W` is acknowledged in it, so everything such a
//! transaction wrote to that partition lies before the watermark. Per partition, the store
//! keeps the newest watermark received; their minimum over all the topic's partitions is
//! the *cut* `C`: every transaction whose commit LSN is below `C` has all its deltas
//! received, on every partition. Each SQLite transaction the store commits applies exactly
//! the deltas of transactions below the cut (those not applied before) and none above it:
//! deltas of later transactions are held until the cut passes them. A transaction spread
//! over several partitions or several batches, a truncate sent to every partition, and a
//! snapshot's rows (all at the snapshot's position) become visible together.
//!
//! Held deltas stay in memory up to [`HOLD_BYTES`]; beyond that they are staged in the
//! store (`_pgfanout_staged`), in the same transaction as the offsets that pass them, so a
//! transaction of any size applies atomically while memory stays bounded. A partition's
//! stored offset never passes a delta held only in memory: after a crash the device reads
//! it again. Until every partition has been read again as far as before, the cut stays
//! where the last commit left it: watermarks read before the restart must not let it pass
//! a delta that was held in memory and is not yet read again. The records after it that
//! were already handled are recognised by the position read and the watermark received
//! (`_pgfanout_consumed`, same transaction) and that cut, and neither applied nor counted
//! again: each record is counted once. A partition's applied position
//! (`_pgfanout_offsets.applied_lsn`, what the device acknowledges) is its watermark, but
//! never above the cut; `_pgfanout_state` (same transaction) gives the cut and the newest
//! transaction applied, so a reader knows which state it sees. Many source
//! transactions still go into one SQLite transaction: one commit per batch, not per source
//! transaction.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::apply::{Applier, BatchStats, Record};
use super::error::StoreError;
use super::fragments;
use crate::contract::codec::{decode_delta_view, encode_delta_view_into};
use crate::contract::view::DeltaView;
use crate::contract::DeltaOp;

/// MiB of held deltas a store keeps in memory before it stages them, unless set.
pub const DEFAULT_HOLD_MIB: u32 = 32;
const HOLD_BYTES: usize = (DEFAULT_HOLD_MIB as usize) << 20;

pub(super) const STAGED_SQL: &str = "
CREATE TABLE IF NOT EXISTS _pgfanout_staged (
    topic TEXT NOT NULL, commit_lsn INTEGER NOT NULL, seq INTEGER NOT NULL,
    partition INTEGER NOT NULL, record_offset INTEGER NOT NULL, tombstone INTEGER NOT NULL, delta BLOB NOT NULL,
    PRIMARY KEY (topic, commit_lsn, seq, partition, record_offset)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _pgfanout_consumed (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, watermark INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS _pgfanout_state (
    topic TEXT PRIMARY KEY, lsn INTEGER NOT NULL, commit_lsn INTEGER NOT NULL, commit_time INTEGER NOT NULL);
";

/// A delta waiting for the cut to pass its transaction: its encoding, as read, and where
/// it was read. Held as bytes, it takes what its record took, with nothing to allocate per
/// column.
struct Held {
    at: Staged,
    version: (i64, i64),
    bytes: Box<[u8]>,
}

impl Held {
    /// What it takes in memory.
    fn size(&self) -> usize {
        self.bytes.len() + std::mem::size_of::<Held>()
    }
}

/// What the store knows about the cut between batches.
#[derive(Default)]
pub(super) struct CutState {
    /// The topic's partitions, when the device told (otherwise those seen).
    partitions: Option<Vec<i32>>,
    /// Per partition: the newest watermark received.
    watermarks: HashMap<i32, i64>,
    /// Per partition: the next offset after the records this store has read since it was
    /// opened (from its stored offset on).
    read: HashMap<i32, i64>,
    /// Per partition: the next offset after every record ever handled (read before a
    /// restart included): records below it are not counted again.
    counted: HashMap<i32, i64>,
    /// In consumption order.
    held: Vec<Held>,
    held_bytes: usize,
    /// The least commit LSN held (none when nothing is): while the cut is at or below it,
    /// nothing held is released and the held list is not scanned.
    held_least: Option<i64>,
    /// Deltas staged in the store.
    staged: u64,
    loaded_for: Option<String>,
    /// The cut of the last commit: every delta below it is applied.
    committed: i64,
    /// Held bytes beyond which held deltas are staged ([`HOLD_BYTES`] unless set).
    hold_bytes: Option<usize>,
    /// Where a delta to hold is encoded first.
    scratch: Vec<u8>,
}

impl CutState {
    pub(super) fn set_partitions(&mut self, partitions: Vec<i32>) {
        self.partitions = Some(partitions);
    }

    pub(super) fn set_hold_bytes(&mut self, bytes: usize) {
        self.hold_bytes = Some(bytes);
    }

    /// Forgets what was read since the last commit: the store's offsets are the truth.
    pub(super) fn reset(&mut self) {
        *self = CutState { partitions: self.partitions.take(), hold_bytes: self.hold_bytes, ..CutState::default() };
    }

    /// Reads the store's positions for `topic` the first time it is used.
    fn load(&mut self, conn: &Connection, topic: &str) -> Result<(), rusqlite::Error> {
        if self.loaded_for.as_deref() == Some(topic) {
            return Ok(());
        }
        let mut stmt = conn.prepare(
            "SELECT o.partition, o.next_offset, max(o.next_offset, coalesce(c.next_offset, 0)), o.applied_lsn,
                    max(o.applied_lsn, coalesce(c.watermark, 0))
               FROM _pgfanout_offsets o
               LEFT JOIN _pgfanout_consumed c ON c.topic = o.topic AND c.partition = o.partition
              WHERE o.topic = ?1",
        )?;
        let rows = stmt
            .query_map([topic], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get(3)?, r.get(4)?)))?;
        let mut applied = HashMap::new();
        for row in rows {
            let (partition, next, counted, applied_lsn, watermark) = row?;
            self.read.insert(partition, next);
            self.counted.insert(partition, counted);
            self.watermarks.insert(partition, watermark);
            applied.insert(partition, applied_lsn);
        }
        self.staged =
            conn.query_row("SELECT count(*) FROM _pgfanout_staged WHERE topic = ?1", [topic], |r| r.get::<_, i64>(0))? as u64;
        // Each partition's applied position is at most the cut of the last commit, and the
        // least of them is that cut.
        self.committed = self.least_over_partitions(&applied);
        self.loaded_for = Some(topic.to_string());
        Ok(())
    }

    /// The cut: every transaction committed below it is complete on every partition, and
    /// every delta below it has been read since the store was opened or applied before.
    fn cut(&self) -> i64 {
        let behind = self.counted.iter().any(|(p, counted)| self.read.get(p).copied().unwrap_or(0) < *counted);
        if behind {
            self.watermark_cut().min(self.committed)
        } else {
            self.watermark_cut()
        }
    }

    /// The least watermark over the partitions.
    fn watermark_cut(&self) -> i64 {
        self.least_over_partitions(&self.watermarks)
    }

    /// The least value over the topic's partitions (0 for one without).
    fn least_over_partitions(&self, values: &HashMap<i32, i64>) -> i64 {
        let of = |p: &i32| values.get(p).copied().unwrap_or(0);
        match &self.partitions {
            Some(partitions) => partitions.iter().map(of).min().unwrap_or(0),
            None => self.read.keys().map(of).min().unwrap_or(0),
        }
    }

    /// Holds `delta`: a copy of the bytes it was read from, or its encoding.
    fn hold(&mut self, at: Staged, delta: &DeltaView<'_>, encoded: Option<&[u8]>) {
        let bytes = match encoded {
            Some(bytes) => bytes.into(),
            None => {
                encode_delta_view_into(delta, &mut self.scratch);
                self.scratch.as_slice().into() // no spare capacity
            }
        };
        let held = Held { at, version: delta.version(), bytes };
        self.held_bytes += held.size();
        self.held_least = Some(self.held_least.map_or(held.version.0, |least| least.min(held.version.0)));
        self.held.push(held);
    }

    /// Takes out the held deltas of transactions below `cut`, in consumption order.
    fn release(&mut self, cut: i64) -> Vec<Held> {
        if self.held_least.is_none_or(|least| least >= cut) {
            return Vec::new();
        }
        // The others stay in place: a large transaction held over many batches is not
        // moved again with each of them.
        let released: Vec<Held> = self.held.extract_if(.., |h| h.version.0 < cut).collect();
        self.held_bytes -= released.iter().map(Held::size).sum::<usize>();
        self.held_least = self.held.iter().map(|h| h.version.0).min();
        released
    }

    /// Empties the held list once its deltas are staged.
    fn clear_held(&mut self) {
        self.held.clear();
        self.held_bytes = 0;
        self.held_least = None;
    }
}

/// Applies a batch consistently (module doc) and commits it with its positions.
pub(super) fn apply_batch(
    conn: &mut Connection,
    tables: &mut HashMap<String, super::schema::TableShape>,
    subscribed: Option<&std::collections::HashSet<String>>,
    state: &mut CutState,
    topic: &str,
    records: &[Record<'_>],
) -> Result<BatchStats, StoreError> {
    state.load(conn, topic)?;
    let committed_cut = state.committed;
    for record in records {
        if let Ok(Some(delta)) = &record.delta {
            if delta.op == DeltaOp::Watermark && !record.tombstone {
                let w = state.watermarks.entry(record.partition).or_insert(0);
                *w = (*w).max(delta.commit_lsn);
            }
        }
    }
    // Watermarks count only once the records before them are read: a batch that catches
    // a partition up is judged as read.
    for record in records {
        let read = state.read.entry(record.partition).or_insert(0);
        *read = (*read).max(record.offset + 1);
    }
    let cut = state.cut();
    let tx = conn.transaction()?;
    let result = apply_in(&tx, tables, subscribed, state, topic, records, (committed_cut, cut));
    match result {
        Ok(stats) => {
            tx.commit()?;
            state.committed = cut;
            Ok(stats)
        }
        Err(e) => {
            // Nothing of this batch is committed: start again from the store.
            state.reset();
            Err(e)
        }
    }
}

fn apply_in(
    tx: &rusqlite::Transaction<'_>,
    tables: &mut HashMap<String, super::schema::TableShape>,
    subscribed: Option<&std::collections::HashSet<String>>,
    state: &mut CutState,
    topic: &str,
    records: &[Record<'_>],
    (committed_cut, cut): (i64, i64),
) -> Result<BatchStats, StoreError> {
    let mut applier = Applier::new(tx, tables, subscribed, topic);
    // What applies now, applied in version order across partitions (below).
    let mut ready: Vec<Ready<'_>> = state.release(cut).into_iter().map(Ready::Held).collect();
    for record in records {
        if let Some(r) = handle(tx, &mut applier, state, topic, record, (committed_cut, cut))? {
            ready.push(r);
        }
    }
    ready.sort_by_key(Ready::version);
    let staged =
        if state.staged > 0 { apply_in_order(tx, &mut applier, topic, cut, ready)? } else { apply_ready(&mut applier, ready)? };
    state.staged -= staged;
    let passed: Vec<(i32, i64, i64)> = state.watermarks.iter().map(|(p, w)| (*p, 0, *w)).collect();
    fragments::discard_passed(tx, topic, &passed)?;
    if state.held_bytes > state.hold_bytes.unwrap_or(HOLD_BYTES) {
        state.staged += stage(tx, topic, &state.held)?;
        state.clear_held();
    }
    let watermark = |p: &i32| state.watermarks.get(p).copied().unwrap_or(0);
    let mut positions: Vec<(i32, i64, i64)> = state.read.iter().map(|(p, next)| (*p, *next, watermark(p).min(cut))).collect();
    for h in &state.held {
        if let Some(entry) = positions.iter_mut().find(|(p, _, _)| *p == h.at.partition) {
            entry.1 = entry.1.min(h.at.offset);
        }
    }
    positions.sort_unstable();
    let mut consumed = tx.prepare_cached(
        "INSERT INTO _pgfanout_consumed (topic, partition, next_offset, watermark) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset, watermark = excluded.watermark",
    )?;
    for (partition, next) in &state.counted {
        consumed.execute(params![topic, partition, next, watermark(partition)])?;
    }
    drop(consumed);
    record_state(tx, topic, cut, applier.newest)?;
    let mut stats = applier.finish(&positions)?;
    stats.consumed = state.read.clone();
    stats.held = state.held.len() as u64 + state.staged;
    Ok(stats)
}

/// One record: applied, held, or (read again after a restart and handled before) skipped.
fn handle<'r>(
    tx: &rusqlite::Transaction<'_>,
    applier: &mut Applier<'_, '_>,
    state: &mut CutState,
    topic: &str,
    record: &'r Record<'r>,
    (committed_cut, cut): (i64, i64),
) -> Result<Option<Ready<'r>>, StoreError> {
    let counted = state.counted.entry(record.partition).or_insert(0);
    // Read again after a restart: handled before unless held then (at or above the cut of
    // the last commit).
    let again = record.offset < *counted;
    *counted = (*counted).max(record.offset + 1);
    if !again {
        applier.stats.processed += 1;
    }
    let handled_before = |applier: &Applier<'_, '_>, delta: &Result<Option<DeltaView<'_>>, String>| {
        again
            && !matches!(delta, Ok(Some(d))
                if d.op != DeltaOp::Watermark && d.commit_lsn >= committed_cut && applier.keeps(d.table))
    };
    let at = Staged { partition: record.partition, offset: record.offset, tombstone: record.tombstone };
    // A fragment is staged; the last one of a complete set goes on as the delta it completes.
    if let Some(fragment) = &record.fragment {
        let mut staged = 0;
        let whole = fragments::stage(tx, topic, record.partition, fragment, &mut staged)?;
        if !again {
            applier.stats.fragments += staged;
        }
        let Some(bytes) = whole else { return Ok(None) };
        let delta = fragments::decoded(&bytes);
        if handled_before(applier, &delta) {
            return Ok(None);
        }
        let Some(version) = route(applier, &delta, at)?.map(DeltaView::version) else { return Ok(None) };
        drop(delta);
        if version.0 < cut {
            return Ok(Some(Ready::Held(Held { at, version, bytes: bytes.into() })));
        }
        // Its fragments are gone from their stage: the whole delta is staged at once, so
        // that the offset may pass it.
        state.staged += stage_encoded(tx, topic, &at, version, &bytes)?;
        return Ok(None);
    }
    if handled_before(applier, &record.delta) {
        return Ok(None);
    }
    match route(applier, &record.delta, at)? {
        Some(delta) if delta.commit_lsn < cut => return Ok(Some(Ready::Read { at, delta })),
        Some(delta) => state.hold(at, delta, record.encoded),
        None => {}
    }
    Ok(None)
}

/// Applies or counts what does not wait for the cut (a record that did not decode, a
/// tombstone without a delta, a watermark, a delta to a table not kept); returns a delta
/// that applies in version order.
fn route<'d, 'v>(
    applier: &mut Applier<'_, '_>,
    delta: &'d Result<Option<DeltaView<'v>>, String>,
    at: Staged,
) -> Result<Option<&'d DeltaView<'v>>, StoreError> {
    match delta {
        Err(reason) => applier.reject(at.partition, at.offset, reason)?,
        Ok(None) => applier.stats.tombstones += 1,
        Ok(Some(delta)) if delta.op == DeltaOp::Watermark && !at.tombstone => applier.stats.watermarks += 1,
        Ok(Some(delta)) if !applier.keeps(delta.table) => applier.apply(at.partition, at.offset, at.tombstone, delta)?,
        Ok(Some(delta)) => return Ok(Some(delta)),
    }
    Ok(None)
}

/// A delta that applies in this batch: read in this batch, or held from an earlier one.
enum Ready<'r> {
    Read { at: Staged, delta: &'r DeltaView<'r> },
    Held(Held),
}

impl Ready<'_> {
    fn version(&self) -> (i64, i64) {
        match self {
            Ready::Read { delta, .. } => delta.version(),
            Ready::Held(h) => h.version,
        }
    }

    fn apply(&self, applier: &mut Applier<'_, '_>) -> Result<(), StoreError> {
        match self {
            Ready::Read { at, delta } => applier.apply(at.partition, at.offset, at.tombstone, delta),
            Ready::Held(h) => apply_encoded(applier, &h.at, &h.bytes),
        }
    }
}

/// Applies a delta held or staged by this store from one that decoded.
fn apply_encoded(applier: &mut Applier<'_, '_>, at: &Staged, bytes: &[u8]) -> Result<(), StoreError> {
    match decode_delta_view(bytes) {
        Ok(delta) => applier.apply(at.partition, at.offset, at.tombstone, &delta),
        // It decoded when it was read: the store file was damaged.
        Err(e) => Ok(applier.reject(at.partition, at.offset, &format!("held delta no longer decodes: {e}"))?),
    }
}

/// Applies `ready` (sorted by version); no delta is staged below the cut.
fn apply_ready(applier: &mut Applier<'_, '_>, ready: Vec<Ready<'_>>) -> Result<u64, StoreError> {
    for r in &ready {
        r.apply(applier)?;
    }
    Ok(0)
}

/// Applies the staged deltas of transactions below `cut` and `ready` (sorted), merged in
/// version order, and removes those staged; returns how many were staged.
fn apply_in_order(
    tx: &rusqlite::Transaction<'_>,
    applier: &mut Applier<'_, '_>,
    topic: &str,
    cut: i64,
    ready: Vec<Ready<'_>>,
) -> Result<u64, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT commit_lsn, seq, partition, record_offset, tombstone, delta FROM _pgfanout_staged
          WHERE topic = ?1 AND commit_lsn < ?2 ORDER BY commit_lsn, seq",
    )?;
    let mut rows = stmt.query(params![topic, cut])?;
    let mut ready = ready.into_iter().peekable();
    let mut applied = 0;
    let mut next_staged = rows.next()?;
    loop {
        let staged_first = match (next_staged, ready.peek()) {
            (Some(row), r) => {
                let version = (row.get::<_, i64>(0)?, row.get::<_, i64>(1)?);
                r.is_none_or(|r| version <= r.version())
            }
            (None, _) => false,
        };
        match next_staged {
            Some(row) if staged_first => {
                let at = Staged { partition: row.get(2)?, offset: row.get(3)?, tombstone: row.get(4)? };
                apply_encoded(applier, &at, row.get_ref(5)?.as_blob().map_err(rusqlite::Error::from)?)?;
                applied += 1;
                next_staged = rows.next()?;
            }
            _ => match ready.next() {
                Some(r) => r.apply(applier)?,
                None => break,
            },
        }
    }
    drop(rows);
    if applied > 0 {
        tx.execute("DELETE FROM _pgfanout_staged WHERE topic = ?1 AND commit_lsn < ?2", params![topic, cut])?;
    }
    Ok(applied)
}

/// Writes where the state a reader sees stands (`_pgfanout_state`, see the README): every
/// transaction committed below `cut` is in it and none after; `newest` is the
/// (commit LSN, commit time) of the newest transaction applied. Neither goes back: a replay
/// re-applies older deltas, which change nothing.
fn record_state(tx: &rusqlite::Transaction<'_>, topic: &str, cut: i64, newest: (i64, i64)) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO _pgfanout_state (topic, lsn, commit_lsn, commit_time) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (topic) DO UPDATE SET
             lsn = max(lsn, excluded.lsn),
             commit_time = CASE WHEN excluded.commit_lsn > commit_lsn THEN excluded.commit_time ELSE commit_time END,
             commit_lsn = max(commit_lsn, excluded.commit_lsn)",
    )?
    .execute(params![topic, cut, newest.0, newest.1])?;
    Ok(())
}

/// Where a held or staged delta was read.
#[derive(Clone, Copy)]
struct Staged {
    partition: i32,
    offset: i64,
    tombstone: bool,
}

/// Held deltas written to the staging table by one statement.
const STAGE_ROWS: usize = 64;

/// Writes held deltas to the staging table, [`STAGE_ROWS`] a statement; returns how many.
fn stage(tx: &rusqlite::Transaction<'_>, topic: &str, held: &[Held]) -> Result<u64, rusqlite::Error> {
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
fn stage_encoded(
    tx: &rusqlite::Transaction<'_>,
    topic: &str,
    at: &Staged,
    (commit_lsn, seq): (i64, i64),
    bytes: &[u8],
) -> Result<u64, rusqlite::Error> {
    tx.prepare_cached(&stage_sql(1))?.execute(params![topic, at.partition, at.offset, commit_lsn, seq, at.tombstone, bytes])?;
    Ok(1)
}
