//! Capture: reads committed changes from a logical replication slot (pgoutput) and
//! publishes each as a delta on the deltas topic.
//!
//! Guarantees and why they hold:
//! - *Every committed change reaches Kafka.* The flush LSN reported to PostgreSQL comes
//!   only from [`flush::FlushLsnTracker`], which passes a transaction only once Kafka has
//!   acknowledged all its deltas and those of every earlier transaction. The tracker is
//!   owned by [`publisher::Publisher`], the only place that counts an acknowledgement (from
//!   librdkafka's report for that very record), and this module is the only place that
//!   reports a flush LSN. After a crash, PostgreSQL re-sends from the last reported point:
//!   a delta may reach Kafka twice, never zero times.
//! - *Bounded memory.* Changes stream to the producer as they are decoded; a transaction
//!   is never held whole. When the producer queue is full, reading pauses until Kafka
//!   acknowledges.
//! - *Order per row.* Deltas are keyed by (table, primary key), so one row's changes land
//!   in one partition in WAL order; the idempotent producer keeps that order across retries.

pub mod changes;
mod error;
pub mod flush;
pub mod pgoutput;
pub mod publisher;
pub mod replication;
pub mod snapshot;

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::config::{KafkaSettings, PostgresSettings};
use crate::contract::{Delta, DeltaOp};
use crate::kafka;
use crate::pg;
use crate::shutdown::Shutdown;
use changes::{Change, ChangeDecoder};
use flush::{FlushLsnTracker, Lsn, TxHandle};
use pgoutput::PgOutputMessage;
use publisher::Publisher;
use replication::{ReplicationClient, ReplicationConfig, ReplicationError, ReplicationEvent, ReplicationStream};
use snapshot::SnapshotMode;

pub use error::CaptureError;

/// Prefix of capture's heartbeat messages.
const HEARTBEAT_PREFIX: &str = "pgfanout.heartbeat";

/// Most replication messages handled in one round of the capture loop after the first.
const BURST: usize = 256;

/// How often the slot's lag behind the server is measured.
const SLOT_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct CaptureSettings {
    /// Logical replication slot (created with the pgoutput plugin on first start).
    #[arg(long = "slot", env = "PGFANOUT_SLOT", default_value = "pgfanout")]
    pub slot: String,
    /// Milliseconds between status updates sent to PostgreSQL (each asks the server for
    /// its position, which moves the slot and the watermark while tables are idle).
    #[arg(long = "status-interval-ms", env = "PGFANOUT_STATUS_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub status_interval_ms: u64,
    /// Milliseconds between watermark deltas (sent to every partition when the watermark
    /// moved).
    #[arg(long = "watermark-interval-ms", env = "PGFANOUT_WATERMARK_INTERVAL_MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub watermark_interval_ms: u64,
    /// When to copy the published tables' existing rows as `snapshot` deltas before
    /// streaming: on the slot's first start (`initial`), on every start, or never.
    #[arg(long = "snapshot", env = "PGFANOUT_SNAPSHOT", value_enum, default_value_t = SnapshotMode::Initial)]
    pub snapshot: SnapshotMode,
    /// Seconds the slot may stand still, with nothing pending in capture while the
    /// server's WAL moves on, before capture writes a heartbeat (a non-transactional
    /// logical message) so that the slot follows; 0 disables heartbeats.
    #[arg(long = "heartbeat-secs", env = "PGFANOUT_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,
}

/// Runs capture until `shutdown`, reconnecting after transient failures.
pub async fn run(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &CaptureSettings,
    mut shutdown: Shutdown,
) -> Result<(), CaptureError> {
    let mut publisher = Publisher::new(kafka_settings).await?;
    let mut backoff = Backoff::new();
    let snapshot_taken = std::cell::Cell::new(false);
    let received_bytes = metrics::counter!("pgfanout_capture_received_bytes_total");
    metrics::counter!("pgfanout_capture_reconnects_total").increment(0);
    metrics::counter!("pgfanout_capture_heartbeats_total").increment(0);
    metrics::counter!("pgfanout_capture_snapshot_rows_total").increment(0);
    metrics::gauge!("pgfanout_capture_snapshot_running").set(0.0);
    loop {
        let session = Session { settings, pg_settings, snapshot_taken: &snapshot_taken, received_bytes: received_bytes.clone() };
        match session.run(&mut publisher, &mut shutdown).await {
            Ok(()) => break,
            // The session starts again from the slot's confirmed position, with a producer
            // that can send.
            Err(CaptureError::Kafka(e)) if kafka::is_fatal(&e) && !shutdown.is_triggered() => {
                metrics::counter!("pgfanout_capture_reconnects_total").increment(1);
                tracing::warn!(error = %e, "the Kafka producer failed for good; replacing it and reconnecting");
                publisher.replace_producer(kafka_settings)?;
            }
            Err(e) if e.is_transient() && !shutdown.is_triggered() => {
                metrics::counter!("pgfanout_capture_reconnects_total").increment(1);
                tracing::warn!(error = %e, "capture interrupted; reconnecting");
                backoff.wait(&mut shutdown).await;
            }
            Err(e) => return Err(e),
        }
    }
    publisher.flush(Duration::from_secs(10))?;
    tracing::info!("capture stopped");
    Ok(())
}

struct Session<'a> {
    settings: &'a CaptureSettings,
    pg_settings: &'a PostgresSettings,
    /// Set once this process has copied a snapshot: `--snapshot always` copies on start,
    /// not again on every reconnect.
    snapshot_taken: &'a std::cell::Cell<bool>,
    /// `pgfanout_capture_received_bytes_total`, looked up once.
    received_bytes: metrics::Counter,
}

impl Session<'_> {
    async fn run(&self, publisher: &mut Publisher, shutdown: &mut Shutdown) -> Result<(), CaptureError> {
        let Some((mut stream, confirmed, monitor)) = self.start(publisher, shutdown).await? else {
            return Ok(()); // stopped during the initial snapshot
        };
        publisher.restart(confirmed);
        let mut slot_check = tokio::time::interval(SLOT_CHECK_INTERVAL);
        let mut slot_seen = SlotSeen { confirmed: None, since: Instant::now() };
        let mut decoder = ChangeDecoder::new();
        let mut current_tx: Option<TxHandle> = None;
        let mut status = tokio::time::interval(Duration::from_millis(self.settings.status_interval_ms));
        let mut watermark_timer = tokio::time::interval(Duration::from_millis(self.settings.watermark_interval_ms));
        let mut watermark = Watermark { candidate: confirmed, sent: confirmed };
        let mut reported = confirmed;
        tracing::info!(slot = %self.settings.slot, from = %replication::format_lsn(confirmed), "streaming changes");

        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break Ok(()),
                _ = publisher.delivered() => {
                    if let Err(e) = publisher.take_deliveries() {
                        break Err(e);
                    }
                }
                _ = status.tick() => {
                    if let Err(e) = report(&mut stream, publisher.tracker(), &mut reported, true).await {
                        break Err(e);
                    }
                }
                _ = slot_check.tick() => {
                    // Monitoring only: a failure here must not stop the stream.
                    if let Err(e) = self.report_slot(&monitor, publisher.tracker(), &mut slot_seen).await {
                        tracing::debug!(error = %e, "slot lag not measured");
                    }
                }
                _ = watermark_timer.tick() => {
                    if let Err(e) = publisher.take_deliveries() {
                        break Err(e);
                    }
                    // Never past a delta Kafka has not acknowledged: a watermark beyond a
                    // delivery that failed would confirm, on every device, a change none has.
                    let due = watermark.candidate.min(publisher.tracker().flushed());
                    if due > watermark.sent {
                        if let Err(e) = send_watermark(publisher, due).await {
                            break Err(e);
                        }
                        watermark.sent = due;
                    }
                }
                event = stream.next_event() => {
                    let step = match event {
                        Ok(Some(ev)) => self.on_burst(ev, &mut stream, &monitor, &mut decoder, publisher, &mut current_tx, &mut reported, &mut watermark).await,
                        // A server shutting down ends the stream: reconnect, as after a lost connection.
                        Ok(None) => Err(CaptureError::Replication(ReplicationError::Io(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the server ended the replication stream",
                        )))),
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = step {
                        break Err(e);
                    }
                }
            }
        };
        // Let what is in flight land, so the final status covers as much as possible.
        publisher.settle(Duration::from_secs(30)).await;
        if result.is_ok() {
            report(&mut stream, publisher.tracker(), &mut reported, false).await?;
            stream.close().await?;
        }
        result
    }

    /// Checks the server, creates the slot if needed, copies the initial snapshot if one is
    /// due, and starts streaming. Returns the stream and the slot's confirmed position, or
    /// nothing when `shutdown` interrupted the snapshot.
    async fn start(
        &self,
        publisher: &mut Publisher,
        shutdown: &Shutdown,
    ) -> Result<Option<(ReplicationStream, Lsn, tokio_postgres::Client)>, CaptureError> {
        let client = pg::connect(&self.pg_settings.conninfo).await?;
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
        let publication = &self.pg_settings.publication;
        if !pg::publication_exists(&client, publication).await? {
            return Err(CaptureError::Config(format!(
                "publication {publication:?} does not exist; create it with CREATE PUBLICATION {} FOR TABLE ...",
                pg::quote_ident(publication)
            )));
        }
        let slot_row = client
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn, '0/0')::text, plugin::text FROM pg_replication_slots
                  WHERE slot_name = $1 AND database = current_database()",
                &[&self.settings.slot],
            )
            .await?;
        let cfg = ReplicationConfig::from_conninfo(&self.pg_settings.conninfo)?;
        let confirmed = match slot_row {
            Some(row) => {
                let plugin: String = row.get(1);
                if plugin != "pgoutput" {
                    return Err(CaptureError::Config(format!(
                        "slot {:?} uses plugin {plugin}, not pgoutput; drop it or choose another --slot",
                        self.settings.slot
                    )));
                }
                replication::parse_lsn(&row.get::<_, String>(0))?
            }
            None => {
                let created = ReplicationClient::connect(&cfg).await?.create_logical_slot(&self.settings.slot, false).await?;
                tracing::info!(slot = %created.slot_name, at = %replication::format_lsn(created.consistent_point), "replication slot created");
                created.consistent_point
            }
        };
        if self.snapshot_needed(&client).await? && !self.copy_snapshot(&client, &cfg, publisher, shutdown).await? {
            return Ok(None);
        }
        let repl = ReplicationClient::connect(&cfg).await?;
        let stream = repl.start_replication(&self.settings.slot, confirmed, publication).await?;
        Ok(Some((stream, confirmed, client)))
    }

    /// Handles `first`, then up to [`BURST`] more events already buffered, before the loop
    /// looks at its timers and the socket again: in a burst of changes, the loop's own
    /// round (every branch polled, the runtime's wake-ups) cost as much as handling a
    /// change.
    #[allow(clippy::too_many_arguments)]
    async fn on_burst(
        &self,
        first: ReplicationEvent,
        stream: &mut ReplicationStream,
        monitor: &tokio_postgres::Client,
        decoder: &mut ChangeDecoder,
        publisher: &mut Publisher,
        current_tx: &mut Option<TxHandle>,
        reported: &mut Lsn,
        watermark: &mut Watermark,
    ) -> Result<(), CaptureError> {
        self.on_event(first, stream, monitor, decoder, publisher, current_tx, reported, watermark).await?;
        for _ in 0..BURST {
            let Some(event) = stream.next_buffered_event()? else { break };
            self.on_event(event, stream, monitor, decoder, publisher, current_tx, reported, watermark).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_event(
        &self,
        event: ReplicationEvent,
        stream: &mut ReplicationStream,
        monitor: &tokio_postgres::Client,
        decoder: &mut ChangeDecoder,
        publisher: &mut Publisher,
        current_tx: &mut Option<TxHandle>,
        reported: &mut Lsn,
        watermark: &mut Watermark,
    ) -> Result<(), CaptureError> {
        match event {
            ReplicationEvent::Keepalive { reply_requested, wal_end, .. } => {
                if current_tx.is_none() {
                    // Everything committed before wal_end has been received and handed on.
                    publisher.idle_at(wal_end);
                    watermark.candidate = watermark.candidate.max(wal_end);
                }
                if reply_requested {
                    report(stream, publisher.tracker(), reported, false).await?;
                }
                Ok(())
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let mut message = pgoutput::decode(&data).map_err(|e| CaptureError::Decode(e.to_string()))?;
                if let PgOutputMessage::Relation(rel) = &mut message {
                    key_by_primary_key(monitor, rel).await?;
                }
                self.received_bytes.increment(data.len() as u64);
                if let PgOutputMessage::Message { transactional: false, prefix, .. } = &message {
                    if prefix == HEARTBEAT_PREFIX && current_tx.is_none() {
                        // Our own heartbeat came through: everything before it is handled.
                        publisher.idle_at(wal_start);
                        watermark.candidate = watermark.candidate.max(wal_start);
                        return report(stream, publisher.tracker(), reported, false).await;
                    }
                }
                if let PgOutputMessage::Truncate { relation_ids, .. } = &message {
                    let tx = current_tx.ok_or_else(|| CaptureError::Decode("Truncate outside a transaction".into()))?;
                    for delta in decoder.on_truncate(wal_start, relation_ids).map_err(|e| CaptureError::Decode(e.to_string()))? {
                        // A truncate touches rows in every partition: tell every partition.
                        for partition in 0..publisher.partitions() {
                            publisher.send(&delta, Some(partition), tx).await?;
                        }
                        decoder.next_seq();
                    }
                    return Ok(());
                }
                match decoder.on_message(wal_start, message).map_err(|e| CaptureError::Decode(e.to_string()))? {
                    None => {}
                    Some(Change::Begin) => *current_tx = Some(publisher.begin()),
                    Some(Change::Delta(delta)) => {
                        let tx = current_tx.ok_or_else(|| CaptureError::Decode("change outside a transaction".into()))?;
                        publisher.send(&delta, None, tx).await?;
                        decoder.next_seq();
                    }
                    Some(Change::Commit { end_lsn }) => {
                        tracing::debug!(end_lsn = %replication::format_lsn(end_lsn), "transaction received");
                        if let Some(tx) = current_tx.take() {
                            publisher.committed(tx, end_lsn);
                        }
                        watermark.candidate = watermark.candidate.max(end_lsn);
                        metrics::counter!("pgfanout_capture_transactions_total").increment(1);
                    }
                }
                Ok(())
            }
        }
    }

    /// Publishes how far the slot trails the server: WAL bytes not yet confirmed, WAL
    /// bytes the slot retains, and how long the oldest unconfirmed transaction has waited.
    /// Measures the slot's lag and, when the slot has stood still for `--heartbeat-secs`
    /// with nothing pending here while the server's WAL moved on, writes a heartbeat.
    ///
    /// Keepalives normally carry the server's position and move the slot while only
    /// unpublished tables change; the heartbeat is the fallback that gives the walsender a
    /// record to decode and confirm when they do not.
    async fn report_slot(
        &self,
        monitor: &tokio_postgres::Client,
        tracker: &FlushLsnTracker,
        seen: &mut SlotSeen,
    ) -> Result<(), tokio_postgres::Error> {
        let row = monitor
            .query_opt(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8, (pg_current_wal_lsn() - restart_lsn)::float8,
                        confirmed_flush_lsn::text
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.settings.slot],
            )
            .await?;
        metrics::gauge!("pgfanout_capture_slot_lag_seconds").set(tracker.oldest_pending_age().as_secs_f64());
        let Some(row) = row else { return Ok(()) };
        let lag = row.get::<_, Option<f64>>(0).unwrap_or(0.0);
        metrics::gauge!("pgfanout_capture_slot_lag_bytes").set(lag);
        metrics::gauge!("pgfanout_capture_slot_retained_bytes").set(row.get::<_, Option<f64>>(1).unwrap_or(0.0));
        let confirmed: Option<String> = row.get(2);
        if confirmed != seen.confirmed {
            *seen = SlotSeen { confirmed, since: Instant::now() };
            return Ok(());
        }
        let idle = tracker.in_flight() == 0 && tracker.oldest_pending_age().is_zero();
        if self.settings.heartbeat_secs > 0 && idle && lag > 0.0 && seen.since.elapsed().as_secs() >= self.settings.heartbeat_secs
        {
            monitor.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&HEARTBEAT_PREFIX]).await?;
            metrics::counter!("pgfanout_capture_heartbeats_total").increment(1);
            tracing::debug!(lag_bytes = lag, "slot stood still; heartbeat written");
            seen.since = Instant::now();
        }
        Ok(())
    }
}

/// Sends a watermark delta to every partition: every transaction that committed at or
/// before `lsn` has all its deltas ahead of it in each partition.
async fn send_watermark(publisher: &mut Publisher, lsn: Lsn) -> Result<(), CaptureError> {
    let lsn_i64 = i64::try_from(lsn).unwrap_or(i64::MAX);
    let delta = Delta {
        table: String::new(),
        op: DeltaOp::Watermark,
        key: Vec::new(),
        after: None,
        old_key: None,
        commit_lsn: lsn_i64,
        lsn: lsn_i64,
        xid: 0,
        commit_ts: crate::contract::now_micros(),
        seq: 0,
        instruction_id: None,
    };
    // Tracked like a transaction that moves nothing: the flush LSN waits for it only
    // through the transactions before it.
    let tx = publisher.begin();
    for partition in 0..publisher.partitions() {
        publisher.send(&delta, Some(partition), tx).await?;
    }
    publisher.committed(tx, 0);
    metrics::gauge!("pgfanout_capture_watermark_lsn").set(lsn as f64);
    Ok(())
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

/// The slot's confirmed position at the last check, and since when it has not moved.
struct SlotSeen {
    confirmed: Option<String>,
    since: Instant,
}

/// The watermark: the newest LSN below which every committed transaction has been handed
/// to the producer (`candidate`), and the last one sent to the partitions. What is sent is
/// the candidate only as far as the flush position (every delta at or below it acknowledged
/// by Kafka), so every delta a watermark covers lies before it in each partition.
struct Watermark {
    candidate: Lsn,
    sent: Lsn,
}

/// Sends a standby status update carrying the tracker's flush LSN; `ask` requests the
/// server's position in reply (a keepalive).
async fn report(
    stream: &mut ReplicationStream,
    tracker: &FlushLsnTracker,
    reported: &mut Lsn,
    ask: bool,
) -> Result<(), CaptureError> {
    let flushed = tracker.flushed();
    stream.send_status(flushed, flushed, flushed, ask).await?;
    if flushed != *reported {
        tracing::debug!(flush = %replication::format_lsn(flushed), "flush position reported");
        *reported = flushed;
    }
    metrics::gauge!("pgfanout_capture_confirmed_flush_lsn").set(flushed as f64);
    metrics::gauge!("pgfanout_capture_in_flight_deltas").set(tracker.in_flight() as f64);
    Ok(())
}
