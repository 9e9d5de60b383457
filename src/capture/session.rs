//! One capture session: a connection to the slot, from the checks before streaming to the
//! end of the stream.
//!
//! [`Session`] checks the server and the slot and copies the initial snapshot when one is
//! due; [`Streaming`] is the streaming loop's whole state — the stream, the decoder, the
//! open transaction, the last reported flush position, the watermark and the slot monitor —
//! with the publisher it hands deltas to. Positions move only as the module doc of
//! [`super`] says: the flush position reported here is always the publisher's tracker's.

use std::cell::Cell;
use std::time::Duration;

use super::changes::{Change, ChangeDecoder, ChangeError};
use super::ddl::DDL_PREFIX;
use super::error::CaptureError;
use super::flush::{Lsn, TxHandle};
use super::pgoutput::{self, PgOutputMessage};
use super::publisher::Publisher;
use super::recopy::DdlFollower;
use super::replication::{self, ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream};
use super::settings::CaptureSettings;
use super::slot::{SlotMonitor, HEARTBEAT_PREFIX};
use super::snapshot::InitialSnapshot;
use super::watermark::Watermark;
use crate::config::PostgresSettings;
use crate::pg;
use crate::shutdown::Shutdown;

/// Most replication messages handled in one round of the streaming loop after the first.
const BURST: usize = 256;

/// How often the slot's lag behind the server is measured.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

pub(super) struct Session<'a> {
    pub(super) settings: &'a CaptureSettings,
    pub(super) pg_settings: &'a PostgresSettings,
    /// Set once this process has copied a snapshot: `--snapshot always` copies on start,
    /// not again on every reconnect.
    pub(super) snapshot_taken: &'a Cell<bool>,
    /// `pgfanout_capture_received_bytes_total`, looked up once.
    pub(super) received_bytes: metrics::Counter,
}

impl Session<'_> {
    /// Streams until `shutdown` or an error; Ok when stopped.
    pub(super) async fn run(&self, publisher: &mut Publisher, shutdown: &mut Shutdown) -> Result<(), CaptureError> {
        let Some((stream, confirmed, monitor)) = self.start(publisher, shutdown).await? else {
            return Ok(()); // stopped during the initial snapshot
        };
        publisher.restart(confirmed);
        tracing::info!(slot = %self.settings.slot, from = %replication::format_lsn(confirmed), "streaming changes");
        let streaming = Streaming {
            stream,
            monitor,
            publisher,
            decoder: ChangeDecoder::new(),
            current_tx: None,
            reported: confirmed,
            watermark: Watermark::new(confirmed),
            slot: SlotMonitor::new(&self.settings.slot, self.settings.heartbeat_secs),
            received_bytes: self.received_bytes.clone(),
            ddl: DdlFollower::new(
                &self.pg_settings.conninfo,
                &self.pg_settings.publication,
                &self.settings.slot,
                Duration::from_millis(self.settings.status_interval_ms),
            ),
        };
        streaming.run(self.settings, shutdown).await
    }

    /// Checks the server, creates the slot if needed, copies the initial snapshot if one is
    /// due, and starts streaming. Returns the stream, the slot's confirmed position and a
    /// plain connection for monitoring, or nothing when `shutdown` interrupted the snapshot.
    async fn start(
        &self,
        publisher: &mut Publisher,
        shutdown: &Shutdown,
    ) -> Result<Option<(ReplicationStream, Lsn, tokio_postgres::Client)>, CaptureError> {
        let client = pg::connect(&self.pg_settings.conninfo).await?;
        check_server(&client).await?;
        let publication = &self.pg_settings.publication;
        if !pg::publication_exists(&client, publication).await? {
            return Err(CaptureError::Config(format!(
                "publication {publication:?} does not exist; create it with CREATE PUBLICATION {} FOR TABLE ...",
                pg::quote_ident(publication)
            )));
        }
        super::refused::warn_unpublished_generated_columns(&client, publication).await?;
        let cfg = ReplicationConfig::from_conninfo(&self.pg_settings.conninfo)?;
        let confirmed = self.slot_position(&client, &cfg).await?;
        let snapshot = InitialSnapshot { slot: &self.settings.slot, conninfo: &self.pg_settings.conninfo, publication };
        if snapshot.needed(&client, self.settings.snapshot, self.snapshot_taken.get()).await? {
            if !snapshot.copy(&client, &cfg, publisher, shutdown).await? {
                return Ok(None);
            }
            self.snapshot_taken.set(true);
        }
        let repl = ReplicationClient::connect(&cfg).await?;
        let stream = repl.start_replication(&self.settings.slot, confirmed, publication).await?;
        Ok(Some((stream, confirmed, client)))
    }

    /// The slot's confirmed position, after creating the slot if it does not exist.
    async fn slot_position(&self, client: &tokio_postgres::Client, cfg: &ReplicationConfig) -> Result<Lsn, CaptureError> {
        let slot_row = client
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn, '0/0')::text, plugin::text FROM pg_replication_slots
                  WHERE slot_name = $1 AND database = current_database()",
                &[&self.settings.slot],
            )
            .await?;
        if let Some(row) = slot_row {
            let plugin: String = row.get(1);
            if plugin != "pgoutput" {
                return Err(CaptureError::Config(format!(
                    "slot {:?} uses plugin {plugin}, not pgoutput; drop it or choose another --slot",
                    self.settings.slot
                )));
            }
            return Ok(replication::parse_lsn(&row.get::<_, String>(0))?);
        }
        let created = ReplicationClient::connect(cfg).await?.create_logical_slot(&self.settings.slot, false).await?;
        tracing::info!(slot = %created.slot_name, at = %replication::format_lsn(created.consistent_point), "replication slot created");
        Ok(created.consistent_point)
    }
}

/// PostgreSQL 15 or later (publication column lists and row filters), `wal_level = logical`.
async fn check_server(client: &tokio_postgres::Client) -> Result<(), CaptureError> {
    let version: String = client.query_one("SHOW server_version_num", &[]).await?.get(0);
    if version.parse::<u32>().unwrap_or(0) < 150_000 {
        return Err(CaptureError::Config(format!(
            "PostgreSQL {version} is too old: capture needs PostgreSQL 15 or later (publication column lists and row filters)"
        )));
    }
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(CaptureError::Config(format!(
            "wal_level is {wal_level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        )));
    }
    Ok(())
}

/// The streaming loop's state.
struct Streaming<'a> {
    stream: ReplicationStream,
    /// A plain connection: primary keys of relations, the slot's lag, heartbeats.
    monitor: tokio_postgres::Client,
    publisher: &'a mut Publisher,
    decoder: ChangeDecoder,
    /// The publisher's handle of the transaction being received.
    current_tx: Option<TxHandle>,
    /// The flush position last reported to PostgreSQL.
    reported: Lsn,
    watermark: Watermark,
    slot: SlotMonitor,
    received_bytes: metrics::Counter,
    /// DDL on published tables, acted on at its transaction's commit.
    ddl: DdlFollower,
}

impl Streaming<'_> {
    async fn run(mut self, settings: &CaptureSettings, shutdown: &mut Shutdown) -> Result<(), CaptureError> {
        let mut slot_check = tokio::time::interval(SLOT_CHECK_INTERVAL);
        let mut status = tokio::time::interval(Duration::from_millis(settings.status_interval_ms));
        let mut watermark_timer = tokio::time::interval(Duration::from_millis(settings.watermark_interval_ms));
        let result = loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.wait() => break Ok(()),
                _ = self.publisher.delivered() => self.publisher.take_deliveries().map(drop),
                _ = status.tick() => self.report(true).await,
                _ = slot_check.tick() => {
                    // Monitoring only: a failure here must not stop the stream.
                    if let Err(e) = self.slot.check(&self.monitor, self.publisher.tracker()).await {
                        tracing::debug!(error = %e, "slot lag not measured");
                    }
                    Ok(())
                }
                _ = watermark_timer.tick() => self.on_watermark_tick().await,
                event = self.stream.next_event() => match event {
                    Ok(Some(ev)) => self.on_burst(ev).await,
                    // A server shutting down ends the stream: reconnect, as after a lost connection.
                    Ok(None) => Err(CaptureError::Replication(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the server ended the replication stream",
                    )))),
                    Err(e) => Err(e.into()),
                },
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        // Let what is in flight land, so the final status covers as much as possible.
        self.publisher.settle(Duration::from_secs(30)).await;
        if result.is_ok() {
            self.report(false).await?;
            self.stream.close().await?;
        }
        result
    }

    async fn on_watermark_tick(&mut self) -> Result<(), CaptureError> {
        self.publisher.take_deliveries()?;
        self.watermark.send_due(self.publisher).await
    }

    /// Handles `first`, then up to [`BURST`] more events already buffered, before the loop
    /// looks at its timers and the socket again: in a burst of changes, the loop's own
    /// round (every branch polled, the runtime's wake-ups) cost as much as handling a
    /// change.
    async fn on_burst(&mut self, first: ReplicationEvent) -> Result<(), CaptureError> {
        self.on_event(first).await?;
        for _ in 0..BURST {
            let Some(event) = self.stream.next_buffered_event()? else { break };
            self.on_event(event).await?;
        }
        Ok(())
    }

    async fn on_event(&mut self, event: ReplicationEvent) -> Result<(), CaptureError> {
        match event {
            ReplicationEvent::Keepalive { reply_requested, wal_end, .. } => {
                if self.current_tx.is_none() {
                    // Everything committed before wal_end has been received and handed on.
                    self.publisher.idle_at(wal_end);
                    self.watermark.passed(wal_end);
                }
                if reply_requested {
                    self.report(false).await?;
                }
                Ok(())
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let mut message = pgoutput::decode(&data)?;
                self.received_bytes.increment(data.len() as u64);
                // A large value's buffer then belongs to the message alone (see pgoutput).
                drop(data);
                match &mut message {
                    PgOutputMessage::Relation(rel) => key_by_primary_key(&self.monitor, rel).await?,
                    PgOutputMessage::Message { transactional: false, prefix, .. }
                        if prefix.as_str() == HEARTBEAT_PREFIX && self.current_tx.is_none() =>
                    {
                        // Our own heartbeat came through: everything before it is handled.
                        self.publisher.idle_at(wal_start);
                        self.watermark.passed(wal_start);
                        return self.report(false).await;
                    }
                    PgOutputMessage::Message { transactional: true, prefix, content, .. } if prefix.as_str() == DDL_PREFIX => {
                        self.ddl.on_message(content);
                    }
                    _ => {}
                }
                match self.decoder.on_message(wal_start, message)? {
                    Some(change) => self.on_change(change).await,
                    None => Ok(()),
                }
            }
        }
    }

    /// Hands a decoded change to the publisher.
    async fn on_change(&mut self, change: Change) -> Result<(), CaptureError> {
        match change {
            Change::Begin => {
                self.ddl.on_begin();
                self.current_tx = Some(self.publisher.begin());
            }
            Change::Delta(delta) => {
                let tx = self.open_tx()?;
                self.publisher.send(&delta, None, tx).await?;
                if delta.old_key.is_some() {
                    self.publisher.send_old_key_tombstone(&delta, tx).await?;
                }
            }
            Change::Truncate(deltas) => {
                let tx = self.open_tx()?;
                for delta in deltas {
                    for partition in 0..self.publisher.partitions() {
                        self.publisher.send(&delta, Some(partition), tx).await?;
                    }
                }
            }
            Change::Commit { end_lsn } => {
                tracing::debug!(end_lsn = %replication::format_lsn(end_lsn), "transaction received");
                if let Some(tx) = self.current_tx.take() {
                    self.ddl.at_commit(end_lsn, &mut self.stream, self.publisher, tx).await?;
                    self.publisher.committed(tx, end_lsn);
                }
                self.watermark.passed(end_lsn);
                metrics::counter!("pgfanout_capture_transactions_total").increment(1);
            }
        }
        Ok(())
    }

    fn open_tx(&self) -> Result<TxHandle, CaptureError> {
        self.current_tx.ok_or(CaptureError::Change(ChangeError::OutsideTransaction("change")))
    }

    /// Sends a standby status update carrying the tracker's flush LSN; `ask` requests the
    /// server's position in reply (a keepalive).
    async fn report(&mut self, ask: bool) -> Result<(), CaptureError> {
        let tracker = self.publisher.tracker();
        let flushed = tracker.flushed();
        self.stream.send_status(flushed, flushed, flushed, ask).await?;
        if flushed != self.reported {
            tracing::debug!(flush = %replication::format_lsn(flushed), "flush position reported");
            self.reported = flushed;
        }
        metrics::gauge!("pgfanout_capture_confirmed_flush_lsn").set(flushed as f64);
        metrics::gauge!("pgfanout_capture_in_flight_deltas").set(tracker.in_flight() as f64);
        Ok(())
    }
}

/// With `REPLICA IDENTITY FULL`, pgoutput flags every column as part of the key; deltas are
/// keyed by the primary key instead, when the table has one, so that a row keeps its
/// identity on devices when a non-key column changes.
async fn key_by_primary_key(monitor: &tokio_postgres::Client, rel: &mut pgoutput::Relation) -> Result<(), CaptureError> {
    if rel.replica_identity != b'f' {
        return Ok(());
    }
    let key = pg::primary_key_columns(monitor, rel.id).await?;
    if !key.is_empty() {
        for column in &mut rel.columns {
            column.is_key = key.contains(&column.name);
        }
    }
    Ok(())
}
