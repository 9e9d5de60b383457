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
//! Held deltas stay in memory. Beyond [`OPEN_BYTES`] held (at most the hold bound), a
//! transaction is too large to wait: the store stops committing and applies what arrives in
//! a SQLite transaction left open across batches, which commits once the cut passes the
//! newest transaction it took (readers see the store as it was until then; SQLite writes
//! what does not fit its page cache to the WAL, uncommitted). In that open transaction a
//! plain row change applies as it is read (a row's deltas all lie in its key's partition,
//! in order), and any other delta once every partition has been read past its version
//! (the *frontier*: a partition's deltas arrive in version order), so a key change still
//! finds the old row as the transaction left it. Deltas beyond the frontier are held, in
//! memory up to [`HOLD_BYTES`] and staged in the store (`_pgfanout_staged`) beyond. A
//! transaction of any size thus applies atomically, mostly written once, while memory stays
//! bounded; a restart gives the open transaction up and reads its records again.
//!
//! A partition's stored offset never passes a delta held only in memory: after a crash the
//! device reads it again. Until every partition has been read again as far as before, the
//! cut stays where the last commit left it: watermarks read before the restart must not
//! let it pass a delta that was held in memory and is not yet read again. The records
//! after it that were already handled are recognised by the position read and the
//! watermark received (`_pgfanout_consumed`, same transaction) and that cut, and neither
//! applied nor counted again: each record is counted once. A partition's applied position
//! (`_pgfanout_offsets.applied_lsn`, what the device acknowledges) is its watermark, but
//! never above the cut; `_pgfanout_state` (same transaction) gives the cut and the newest
//! transaction applied, so a reader knows which state it sees. Many source
//! transactions still go into one SQLite transaction: one commit per batch (or per open
//! transaction), not per source transaction.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::apply::{Applier, BatchStats, Record};
use super::error::StoreError;
use super::fragments;
use super::staged::{plain, stage, stage_encoded, Held, Staged};
use crate::contract::codec::{decode_delta_view, encode_delta_view_into};
use crate::contract::view::DeltaView;
use crate::contract::DeltaOp;

/// MiB of held deltas a store keeps in memory before it stages them, unless set.
pub const DEFAULT_HOLD_MIB: u32 = 32;
const HOLD_BYTES: usize = (DEFAULT_HOLD_MIB as usize) << 20;
/// Held bytes beyond which the store opens a SQLite transaction for what it holds (at most
/// the hold bound): a transaction that large is applied as it arrives rather than copied
/// and held. Smaller ones, the usual stream, commit with every batch.
const OPEN_BYTES: usize = 4 << 20;

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
    /// Held bytes beyond which held deltas are applied in an open transaction or staged
    /// ([`HOLD_BYTES`] unless set).
    hold_bytes: Option<usize>,
    /// Per partition: every delta below this version has been read in it since the store
    /// was opened (the version after the last delta read, or a watermark's).
    frontier: HashMap<i32, (i64, i64)>,
    /// The newest commit LSN applied in the SQLite transaction left open across batches, if
    /// one is: it commits once the cut passes it.
    open: Option<i64>,
    /// Per partition: the newest version of a delta held or staged there that is not plain
    /// ([`plain`]). Until it applies, the partition's plain deltas wait behind it: a row
    /// written under a key that a pending key change moves away must not be written first.
    waiting: HashMap<i32, (i64, i64)>,
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
        self.committed = self.least_over_partitions(&applied, 0);
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
        self.least_over_partitions(&self.watermarks, 0)
    }

    /// Every delta below this version has been read, on every partition: the least
    /// frontier, where a partition not read since the store was opened counts as read up to
    /// the cut of the last commit.
    fn frontier(&self) -> (i64, i64) {
        self.least_over_partitions(&self.frontier, (self.committed, 0))
    }

    /// Which deltas apply in this batch: those of transactions below the cut and, while a
    /// SQLite transaction is left open across batches, those at or below the newest
    /// transaction it takes whose version is below the frontier (every delta before them,
    /// on every partition, has been read, so they still apply in version order) — both
    /// sets are the versions below a limit, and so is their union — and the plain ones
    /// ([`plain`]) at or below that newest transaction.
    fn bound(&self, cut: i64) -> Bound {
        let below_cut = (cut, i64::MIN);
        let open = self.open.map(|last| self.frontier().min((last.saturating_add(1), i64::MIN)));
        Bound { below: open.map_or(below_cut, |open| open.max(below_cut)), plain_upto: self.open }
    }

    /// The least value over the topic's partitions (`missing` for one without).
    fn least_over_partitions<T: Copy + Ord>(&self, values: &HashMap<i32, T>, missing: T) -> T {
        let of = |p: &i32| values.get(p).copied().unwrap_or(missing);
        match &self.partitions {
            Some(partitions) => partitions.iter().map(of).min().unwrap_or(missing),
            None => self.read.keys().map(of).min().unwrap_or(missing),
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
        let held = Held { at, version: delta.version(), plain: plain(delta), bytes };
        if !held.plain {
            self.wait_behind(at.partition, held.version);
        }
        self.held_bytes += held.size();
        self.held_least = Some(self.held_least.map_or(held.version.0, |least| least.min(held.version.0)));
        self.held.push(held);
    }

    /// A delta of `partition` that is not plain waits, held or staged.
    fn wait_behind(&mut self, partition: i32, version: (i64, i64)) {
        let w = self.waiting.entry(partition).or_insert(version);
        *w = (*w).max(version);
    }

    /// Takes out the held deltas that `bound` lets apply, in consumption order. Unless
    /// `scan` (a transaction was just opened), a plain delta held is above the newest
    /// transaction an open one takes: whether any applies shows from the least held.
    fn release(&mut self, bound: Bound, scan: bool) -> Vec<Held> {
        if self.held_least.is_none_or(|least| !scan && !bound.ready((least, i64::MIN))) {
            return Vec::new();
        }
        // The others stay in place: a large transaction held over many batches is not
        // moved again with each of them.
        let waiting = &self.waiting;
        let released: Vec<Held> =
            self.held.extract_if(.., |h| bound.ready_delta(h.version, h.plain, waiting.get(&h.at.partition))).collect();
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

/// Which deltas apply now ([`CutState::bound`]): those whose version is below `below`, and
/// plain ones of transactions up to `plain_upto`.
#[derive(Clone, Copy)]
struct Bound {
    below: (i64, i64),
    plain_upto: Option<i64>,
}

impl Bound {
    fn ready(&self, version: (i64, i64)) -> bool {
        version < self.below
    }

    /// Whether a delta applies, `plain` or not, read in a partition where `waiting` waits.
    fn ready_delta(&self, version: (i64, i64), plain: bool, waiting: Option<&(i64, i64)>) -> bool {
        self.ready(version)
            || (plain && self.plain_upto.is_some_and(|last| version.0 <= last) && waiting.is_none_or(|w| self.ready(*w)))
    }
}

/// Gives up a SQLite transaction left open and what was read since the last commit.
pub(super) fn abandon(conn: &Connection, state: &mut CutState) {
    if !conn.is_autocommit() {
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::warn!(error = %e, "rolling back the store's open transaction failed");
        }
    }
    state.reset();
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
            let reached = if delta.op == DeltaOp::Watermark && !record.tombstone {
                let w = state.watermarks.entry(record.partition).or_insert(0);
                *w = (*w).max(delta.commit_lsn);
                (delta.commit_lsn, 0)
            } else {
                let (lsn, seq) = delta.version();
                (lsn, seq.saturating_add(1))
            };
            let f = state.frontier.entry(record.partition).or_insert(reached);
            *f = (*f).max(reached);
        }
    }
    // Watermarks count only once the records before them are read: a batch that catches
    // a partition up is judged as read.
    for record in records {
        let read = state.read.entry(record.partition).or_insert(0);
        *read = (*read).max(record.offset + 1);
    }
    let cut = state.cut();
    if conn.is_autocommit() {
        conn.execute_batch("BEGIN")?;
    }
    let result = apply_in(conn, tables, subscribed, state, topic, records, (committed_cut, cut)).and_then(|mut stats| {
        if state.open.is_some_and(|last| cut <= last) {
            // The transaction stays open: none of it is visible yet, so no position moves.
            stats.applied_lsn.clear();
            stats.next_offset.clear();
        } else {
            conn.execute_batch("COMMIT")?;
            state.committed = cut;
            state.open = None;
        }
        Ok(stats)
    });
    if result.is_err() {
        // Nothing since the last commit is kept: start again from the store.
        abandon(conn, state);
    }
    result
}

fn apply_in(
    tx: &Connection,
    tables: &mut HashMap<String, super::schema::TableShape>,
    subscribed: Option<&std::collections::HashSet<String>>,
    state: &mut CutState,
    topic: &str,
    records: &[Record<'_>],
    (committed_cut, cut): (i64, i64),
) -> Result<BatchStats, StoreError> {
    let mut applier = Applier::new(tx, tables, subscribed, topic);
    let hold_bytes = state.hold_bytes.unwrap_or(HOLD_BYTES);
    // What applies now, applied in version order across partitions (below).
    let bound = state.bound(cut);
    let mut ready: Vec<Ready<'_>> = state.release(bound, false).into_iter().map(Ready::Held).collect();
    for record in records {
        if let Some(r) = handle(tx, &mut applier, state, topic, record, (committed_cut, bound))? {
            ready.push(r);
        }
    }
    apply_sorted(tx, &mut applier, state, topic, bound, ready)?;
    if state.open.is_none() && state.held_bytes > hold_bytes.min(OPEN_BYTES) {
        // A transaction too large to hold: what every partition has delivered of it is
        // applied now, in a SQLite transaction that commits only once the cut passes it.
        state.open = state.held.iter().map(|h| h.version.0).max();
        let bound = state.bound(cut);
        let ready = state.release(bound, true).into_iter().map(Ready::Held).collect();
        apply_sorted(tx, &mut applier, state, topic, bound, ready)?;
    }
    let passed: Vec<(i32, i64, i64)> = state.watermarks.iter().map(|(p, w)| (*p, 0, *w)).collect();
    fragments::discard_passed(tx, topic, &passed)?;
    if state.held_bytes > hold_bytes {
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
    tx: &Connection,
    applier: &mut Applier<'_>,
    state: &mut CutState,
    topic: &str,
    record: &'r Record<'r>,
    (committed_cut, bound): (i64, Bound),
) -> Result<Option<Ready<'r>>, StoreError> {
    let counted = state.counted.entry(record.partition).or_insert(0);
    // Read again after a restart: handled before unless held then (at or above the cut of
    // the last commit).
    let again = record.offset < *counted;
    *counted = (*counted).max(record.offset + 1);
    if !again {
        applier.stats.processed += 1;
    }
    let handled_before = |applier: &Applier<'_>, delta: &Result<Option<DeltaView<'_>>, String>| {
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
        if bound.ready(version) {
            return Ok(Some(Ready::Held(Held { at, version, plain: false, bytes: bytes.into() })));
        }
        // Its fragments are gone from their stage: the whole delta is staged at once, so
        // that the offset may pass it.
        state.staged += stage_encoded(tx, topic, &at, version, &bytes)?;
        state.wait_behind(at.partition, version);
        return Ok(None);
    }
    if handled_before(applier, &record.delta) {
        return Ok(None);
    }
    match route(applier, &record.delta, at)? {
        Some(delta) if bound.ready_delta(delta.version(), plain(delta), state.waiting.get(&at.partition)) => {
            return Ok(Some(Ready::Read { at, delta }))
        }
        Some(delta) => state.hold(at, delta, record.encoded),
        None => {}
    }
    Ok(None)
}

/// Applies or counts what does not wait for the cut (a record that did not decode, a
/// tombstone without a delta, a watermark, a delta to a table not kept); returns a delta
/// that applies in version order.
fn route<'d, 'v>(
    applier: &mut Applier<'_>,
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

    fn apply(&self, applier: &mut Applier<'_>) -> Result<(), StoreError> {
        match self {
            Ready::Read { at, delta } => applier.apply(at.partition, at.offset, at.tombstone, delta),
            Ready::Held(h) => apply_encoded(applier, &h.at, &h.bytes),
        }
    }
}

/// Applies a delta held or staged by this store from one that decoded.
fn apply_encoded(applier: &mut Applier<'_>, at: &Staged, bytes: &[u8]) -> Result<(), StoreError> {
    match decode_delta_view(bytes) {
        Ok(delta) => applier.apply(at.partition, at.offset, at.tombstone, &delta),
        // It decoded when it was read: the store file was damaged.
        Err(e) => Ok(applier.reject(at.partition, at.offset, &format!("held delta no longer decodes: {e}"))?),
    }
}

/// Applies `ready` and the staged deltas `bound` lets apply, merged in version order.
fn apply_sorted(
    tx: &Connection,
    applier: &mut Applier<'_>,
    state: &mut CutState,
    topic: &str,
    bound: Bound,
    mut ready: Vec<Ready<'_>>,
) -> Result<(), StoreError> {
    ready.sort_by_key(Ready::version);
    if state.staged > 0 {
        state.staged -= apply_in_order(tx, applier, topic, bound, ready)?;
    } else {
        for r in &ready {
            r.apply(applier)?;
        }
    }
    Ok(())
}

/// The staged deltas a [`Bound`] lets apply, in version order, and their removal
/// (parameters: topic, then the bound's version): one range of the stage's key.
const SELECT_STAGED_READY: &str = "SELECT commit_lsn, seq, partition, record_offset, tombstone, delta FROM _pgfanout_staged
    WHERE topic = ?1 AND (commit_lsn, seq) < (?2, ?3) ORDER BY commit_lsn, seq";
const DELETE_STAGED_READY: &str = "DELETE FROM _pgfanout_staged WHERE topic = ?1 AND (commit_lsn, seq) < (?2, ?3)";

/// Applies the staged deltas `bound` lets apply and `ready` (sorted), merged in version
/// order, and removes those staged; returns how many were staged.
fn apply_in_order(
    tx: &Connection,
    applier: &mut Applier<'_>,
    topic: &str,
    bound: Bound,
    ready: Vec<Ready<'_>>,
) -> Result<u64, StoreError> {
    let mut stmt = tx.prepare_cached(SELECT_STAGED_READY)?;
    let mut rows = stmt.query(params![topic, bound.below.0, bound.below.1])?;
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
        tx.prepare_cached(DELETE_STAGED_READY)?.execute(params![topic, bound.below.0, bound.below.1])?;
    }
    Ok(applied)
}

/// Writes where the state a reader sees stands (`_pgfanout_state`, see the README): every
/// transaction committed below `cut` is in it and none after; `newest` is the
/// (commit LSN, commit time) of the newest transaction applied. Neither goes back: a replay
/// re-applies older deltas, which change nothing.
fn record_state(tx: &Connection, topic: &str, cut: i64, newest: (i64, i64)) -> Result<(), rusqlite::Error> {
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
