//! The initial snapshot: the rows the published tables hold when capture first starts reach
//! the deltas topic as `snapshot` deltas, before the stream of changes.
//!
//! Why nothing is lost or applied out of order:
//! 1. The capture slot exists first, so streaming later starts at its position `S`, at or
//!    before every point below.
//! 2. A temporary slot is created with an exported snapshot. Its consistent point `C`
//!    (≥ `S`) splits transactions exactly: those that committed before `C` are visible in
//!    the snapshot; those that commit after are decoded by every slot, the capture slot
//!    included. Every table's cursor opens before anything is sent, and a snapshot under
//!    which DDL changed a table before its cursor opened is given up for a newer one
//!    (`copy_snapshot`).
//! 3. Each table's copy starts with a truncate at the version `(C − 1, n)`, and every row
//!    of the snapshot follows with a higher `n`: newer than any change committed before `C`
//!    (whose commit record starts below it), older than any change committed after. Devices
//!    keep the newest version of a row and drop rows older than a truncate, so the copy
//!    replaces what they held: rows deleted while no capture streamed (an interrupted
//!    snapshot, a lost slot) disappear, and the changes between `S` and `C` that the stream
//!    sends again are skipped where the snapshot already holds their effect.
//! 4. Only when Kafka has acknowledged every snapshot delta is the snapshot marked finished
//!    in `pgfanout.capture_snapshots`; streaming starts after that. A capture stopped during
//!    the copy takes a new snapshot on its next start (the capture slot has not moved, so by
//!    point 3 nothing in between is lost); devices absorb the rows sent twice.
//!
//! Memory stays bounded: rows are read through a cursor, a few thousand at a time, and
//! the producer's queue applies back-pressure.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::changes::RowDeltas;
use super::copy_snapshot::{self, CopySnapshot, SnapshotTable};
use super::error::CaptureError;
use super::flush::TxHandle;
use super::pgoutput::{Relation, TupleValue};
use super::publisher::Publisher;
use super::replication::{self, ReplicationConfig};
use crate::contract::now_micros;
use crate::pg;
use crate::shutdown::Shutdown;

/// When capture copies the published tables before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotMode {
    /// On the first start of a slot, and again after a copy that did not finish.
    Initial,
    /// On every start (also picks up the rows of tables added to the publication).
    Always,
    /// Never: only changes committed after the slot's creation reach devices.
    Never,
}

/// Rows fetched from the cursor at a time.
const FETCH_ROWS: usize = 5000;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// The initial snapshot of one slot's publication.
pub(super) struct InitialSnapshot<'a> {
    pub(super) slot: &'a str,
    pub(super) conninfo: &'a str,
    pub(super) publication: &'a str,
}

impl InitialSnapshot<'_> {
    /// Whether this start copies the published tables before streaming; `taken` says
    /// whether this process has copied them already.
    pub(super) async fn needed(&self, client: &Client, mode: SnapshotMode, taken: bool) -> Result<bool, CaptureError> {
        match mode {
            SnapshotMode::Never => Ok(false),
            SnapshotMode::Always => Ok(!taken),
            SnapshotMode::Initial => {
                let row = client
                    .query_opt("SELECT finished_at IS NOT NULL FROM pgfanout.capture_snapshots WHERE slot = $1", &[&self.slot])
                    .await
                    .map_err(missing_schema)?;
                Ok(!row.is_some_and(|r| r.get::<_, bool>(0)))
            }
        }
    }

    /// Copies every published table as `snapshot` deltas and waits for Kafka to acknowledge
    /// them all; returns false when `shutdown` interrupted it (the snapshot stays
    /// unfinished and is taken again on the next start).
    pub(super) async fn copy(
        &self,
        client: &Client,
        cfg: &ReplicationConfig,
        publisher: &mut Publisher,
        shutdown: &Shutdown,
    ) -> Result<bool, CaptureError> {
        let slot = self.slot;
        client
            .execute(
                "INSERT INTO pgfanout.capture_snapshots (slot, started_at) VALUES ($1, now())
                 ON CONFLICT (slot) DO UPDATE SET started_at = now(), finished_at = NULL, snapshot_lsn = NULL, rows = 0",
                &[&slot],
            )
            .await
            .map_err(missing_schema)?;
        let snapshot = CopySnapshot::take(
            cfg,
            self.conninfo,
            self.publication,
            &format!("{}_snapshot", slot.chars().take(40).collect::<String>()),
            |t| super::refused::refusal(&t.relation).inspect(|why| tracing::error!("{why}")).is_none(),
        )
        .await?;
        let version = snapshot.consistent_point - 1;
        tracing::info!(
            slot = %slot,
            at = %replication::format_lsn(snapshot.consistent_point),
            tables = snapshot.tables.len(),
            "initial snapshot started"
        );
        metrics::gauge!("pgfanout_capture_snapshot_running").set(1.0);

        // The snapshot's deltas are tracked as one transaction that moves no flush position;
        // streaming starts a new session once all are acknowledged.
        publisher.restart(0);
        let tx = publisher.begin();
        let started = Instant::now();
        let mut copier = TableCopier::new(&snapshot.reader, &mut *publisher, tx, version);
        for (i, table) in snapshot.tables.iter().enumerate() {
            if !copier.copy(i, table, shutdown).await? {
                metrics::gauge!("pgfanout_capture_snapshot_running").set(0.0);
                return Ok(false);
            }
        }
        let copied = copier.progress.rows;
        let consistent_point = snapshot.consistent_point;
        snapshot.finish().await?;
        publisher.committed(tx, 0);
        publisher.all_acknowledged().await?;
        client
            .execute(
                "UPDATE pgfanout.capture_snapshots SET finished_at = now(), snapshot_lsn = $2::text::pg_lsn, rows = $3 WHERE slot = $1",
                &[&slot, &replication::format_lsn(consistent_point), &(copied as i64)],
            )
            .await?;
        metrics::gauge!("pgfanout_capture_snapshot_running").set(0.0);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            rows = copied,
            seconds,
            rows_per_s = (copied as f64 / seconds.max(1e-3)) as u64,
            "initial snapshot finished"
        );
        Ok(true)
    }
}

/// Copies one table after another inside the snapshot's transaction, as `snapshot` deltas
/// of one tracked transaction (also the online copy of a table changed by DDL, `recopy`).
pub(super) struct TableCopier<'a> {
    reader: &'a Client,
    deltas: RowDeltas,
    publisher: &'a mut Publisher,
    tx: TxHandle,
    started: Instant,
    progress: SnapshotRowCounter,
}

impl<'a> TableCopier<'a> {
    /// A copier whose deltas carry the version `(version, n)`, tracked as part of `tx`.
    pub(super) fn new(reader: &'a Client, publisher: &'a mut Publisher, tx: TxHandle, version: u64) -> Self {
        let started = Instant::now();
        TableCopier {
            reader,
            deltas: RowDeltas::new(version, now_micros()),
            publisher,
            tx,
            started,
            progress: SnapshotRowCounter { rows: 0, logged: started },
        }
    }

    /// Copies table `i` of the snapshot, `table`; false when `shutdown` interrupted it.
    pub(super) async fn copy(&mut self, i: usize, table: &SnapshotTable, shutdown: &Shutdown) -> Result<bool, CaptureError> {
        let relation = &table.relation;
        let name = format!("{}.{}", relation.namespace, relation.name);
        let cursor = copy_snapshot::cursor(i);
        for (oid, namespace, type_name) in &table.types {
            self.deltas.add_type(*oid, namespace, type_name.clone());
        }
        // The copy replaces the table on devices: what they hold from before, and is not
        // in this snapshot, was deleted meanwhile (point 3 above).
        let truncate = self.deltas.truncate(relation);
        for partition in 0..self.publisher.partitions() {
            self.publisher.send(&truncate, Some(partition), self.tx).await?;
        }
        loop {
            if shutdown.is_triggered() {
                return Ok(false);
            }
            let rows = self.copy_rows(relation, &cursor).await?;
            self.progress.add(rows, &name, self.started);
            if rows < FETCH_ROWS {
                break;
            }
        }
        self.reader.batch_execute(&format!("CLOSE {cursor}")).await?;
        Ok(true)
    }

    /// Fetches the cursor's next rows and hands them to the publisher; returns how many.
    async fn copy_rows(&mut self, relation: &Relation, cursor: &str) -> Result<usize, CaptureError> {
        let fetched = self.reader.simple_query(&format!("FETCH {FETCH_ROWS} FROM {cursor}")).await?;
        let mut rows = 0;
        let mut values = Vec::with_capacity(relation.columns.len());
        for message in fetched {
            let SimpleQueryMessage::Row(row) = message else { continue };
            values.clear();
            values.extend(
                (0..row.len())
                    .map(|i| row.get(i).map_or(TupleValue::Null, |v| TupleValue::Text(Bytes::copy_from_slice(v.as_bytes())))),
            );
            let delta = self.deltas.row(relation, &mut values)?;
            self.publisher.send(&delta, None, self.tx).await?;
            rows += 1;
        }
        self.publisher.take_deliveries()?;
        Ok(rows)
    }
}

/// Rows copied so far, logged every [`PROGRESS_INTERVAL`].
struct SnapshotRowCounter {
    rows: u64,
    logged: Instant,
}

impl SnapshotRowCounter {
    fn add(&mut self, rows: usize, table: &str, started: Instant) {
        self.rows += rows as u64;
        metrics::counter!("pgfanout_capture_snapshot_rows_total").increment(rows as u64);
        if self.logged.elapsed() >= PROGRESS_INTERVAL {
            self.logged = Instant::now();
            let rate = self.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(table, rows = self.rows, rows_per_s = rate as u64, "initial snapshot in progress");
        }
    }
}

fn missing_schema(e: tokio_postgres::Error) -> CaptureError {
    if pg::sqlstate(&e) == Some("42P01") {
        return CaptureError::Config(
            "table pgfanout.capture_snapshots does not exist; run `pgfanout setup` (or start with --snapshot never)".into(),
        );
    }
    e.into()
}
