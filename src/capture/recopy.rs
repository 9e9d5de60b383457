//! What capture does at the commit of a transaction that changed published tables (a
//! `pgfanout.ddl` message, see [`super::ddl`]): a `drop` delta for each table that left
//! the publication under a name, and an online copy of each table whose rows changed in a
//! way the WAL does not show, while streaming goes on.
//!
//! Why no change is lost or undone — the initial snapshot's argument (`snapshot.rs`),
//! placed at the statement instead of the slot's start:
//! 1. The message is read at the commit of the statement's transaction, `D`. A temporary
//!    slot created now exports a snapshot whose consistent point `C` (> `D`, the
//!    transaction has committed) splits transactions exactly: those committed before `C`
//!    are visible in it, those after are decoded by the capture slot, later in the stream.
//!    (A snapshot under which a later statement changed a table to copy before its cursor
//!    opened is given up for a newer one, `copy_snapshot`: any `C` > `D` will do.)
//! 2. Each copied table starts with a truncate at `(C − 1, 0)` and its rows follow at
//!    `(C − 1, n)`: newer than every change committed before `C` — the statement itself,
//!    what the stream sent of the table before, and what it will still send of the
//!    transactions between `D` and `C`, whose effect the copy already holds — and older than
//!    every change committed after `C`. Devices keep the newest version of each row and
//!    ignore rows older than a truncate, so whatever they held of the table is replaced by
//!    the copy, and the copy by later changes. The copy's rows are full rows with the
//!    table's new columns: devices add the new columns, retype changed ones and drop those
//!    the table no longer has (`device::store::schema`).
//! 3. A `drop` at the same kind of version (`C − 1`, or `end − 1` of the commit record
//!    when nothing is copied: above every change of the transaction, below every later
//!    commit) removes the table's rows older than it on devices, and the table itself when
//!    nothing newer is left: older deltas of it, replayed or late from another partition,
//!    do not bring it back; a new table of that name, later, does. A table whose key
//!    changed is both dropped, at `C − 2` (still above every commit before `C`: a commit
//!    record is longer than two bytes), and copied: devices drop it, then make it anew
//!    from the copy's rows, keyed as the table is now.
//! 4. The copy's deltas and the drops belong to the statement's transaction in the flush
//!    tracker: the slot's flush position passes `D` only once Kafka has acknowledged them
//!    all. A capture stopped before that reads the transaction again and copies again
//!    (devices absorb rows sent twice).
//!
//! While a copy runs, the replication connection gets status updates (it is not read, the
//! server buffers), so the server does not end it as unresponsive.

use std::time::Duration;

use super::copy_snapshot::{CopySnapshot, SnapshotTable};
use super::ddl::{self, DdlChanges};
use super::error::CaptureError;
use super::flush::{Lsn, TxHandle};
use super::publisher::Publisher;
use super::replication::{self, ReplicationConfig, ReplicationStream};
use super::snapshot::TableCopier;
use crate::contract::{now_micros, Delta, DeltaOp};
use crate::shutdown::Shutdown;

/// The DDL changes of the transaction being received, and how to act on them at its commit.
pub(super) struct DdlFollower {
    pub(super) conninfo: String,
    pub(super) publication: String,
    pub(super) slot: String,
    /// Status updates to the replication connection while a copy runs.
    pub(super) status_interval: Duration,
    pending: DdlChanges,
}

impl DdlFollower {
    pub(super) fn new(conninfo: &str, publication: &str, slot: &str, status_interval: Duration) -> Self {
        DdlFollower {
            conninfo: conninfo.into(),
            publication: publication.into(),
            slot: slot.into(),
            status_interval,
            pending: DdlChanges::default(),
        }
    }

    /// A `pgfanout.ddl` message of the open transaction.
    pub(super) fn on_message(&mut self, content: &[u8]) {
        self.pending.extend(ddl::parse(content, &self.publication));
    }

    /// A transaction began: nothing is pending (a message of a transaction that never
    /// committed is not one of this).
    pub(super) fn on_begin(&mut self) {
        self.pending = DdlChanges::default();
    }

    /// At the commit of the transaction `tx`, whose commit record ends at `end_lsn`: sends
    /// the drops and copies its messages asked for, as part of it.
    pub(super) async fn at_commit(
        &mut self,
        end_lsn: Lsn,
        stream: &mut ReplicationStream,
        publisher: &mut Publisher,
        tx: TxHandle,
    ) -> Result<(), CaptureError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.pending);
        let flushed = publisher.tracker().flushed();
        let work = self.ddl_deltas(changes, end_lsn, publisher, tx);
        tokio::pin!(work);
        let mut status = tokio::time::interval(self.status_interval);
        status.tick().await;
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = status.tick() => stream.send_status(flushed, flushed, flushed, false).await?,
            }
        }
    }

    async fn ddl_deltas(
        &self,
        changes: DdlChanges,
        end_lsn: Lsn,
        publisher: &mut Publisher,
        tx: TxHandle,
    ) -> Result<(), CaptureError> {
        let copy = if changes.copy.is_empty() {
            None
        } else {
            let cfg = ReplicationConfig::from_conninfo(&self.conninfo)?;
            let name = format!("{}_recopy", self.slot.chars().take(40).collect::<String>());
            let wanted = |t: &SnapshotTable| changes.copy.contains(&format!("{}.{}", t.relation.namespace, t.relation.name));
            Some(CopySnapshot::take(&cfg, &self.conninfo, &self.publication, &name, wanted).await?)
        };
        // Point 1 of the module doc.
        let version = copy.as_ref().map_or(end_lsn, |c| c.consistent_point).saturating_sub(1);
        for table in &changes.drop {
            // A table also copied (its key changed) is dropped just before its copy, which
            // makes it anew on devices with the new key.
            let at = if changes.copy.contains(table) { version.saturating_sub(1) } else { version };
            tracing::info!(table = %table, at = %replication::format_lsn(at), "table left the publication or changed its key; dropping it on devices");
            let delta = drop_delta(table, at);
            for partition in 0..publisher.partitions() {
                publisher.send(&delta, Some(partition), tx).await?;
            }
            metrics::counter!("pgfanout_capture_ddl_tables_dropped_total").increment(1);
        }
        let Some(copy) = copy else { return Ok(()) };
        // Stopping waits for the copy: the next session would only copy again.
        let (_never_triggered, shutdown) = Shutdown::new();
        let mut copier = TableCopier::new(&copy.reader, publisher, tx, version);
        for (i, table) in copy.tables.iter().enumerate() {
            let name = format!("{}.{}", table.relation.namespace, table.relation.name);
            tracing::info!(table = %name, at = %replication::format_lsn(copy.consistent_point), "table changed by DDL; copying it again");
            copier.copy(i, table, &shutdown).await?;
            metrics::counter!("pgfanout_capture_ddl_tables_copied_total").increment(1);
        }
        copy.finish().await
    }
}

/// The delta that removes `table` from devices, at `version`.
fn drop_delta(table: &str, version: Lsn) -> Delta {
    let lsn = i64::try_from(version).unwrap_or(i64::MAX);
    Delta {
        table: table.to_string(),
        op: DeltaOp::Drop,
        key: Vec::new(),
        after: None,
        old_key: None,
        commit_lsn: lsn,
        lsn,
        xid: 0,
        commit_ts: now_micros(),
        seq: 0,
        instruction_id: None,
    }
}
