//! Capture: reads committed changes from a logical replication slot (pgoutput) and
//! publishes each as a delta on the deltas topic.
//!
//! Guarantees and why they hold:
//! - *Every committed change reaches Kafka.* The flush LSN reported to PostgreSQL comes
//!   only from [`flush::FlushLsnTracker`], which passes a transaction only once Kafka has
//!   acknowledged all its deltas and those of every earlier transaction. The tracker is
//!   owned by [`publisher::Publisher`], the only place that counts an acknowledgement (from
//!   librdkafka's report for that very record), and the streaming loop in `session` is
//!   the only place that reports a flush LSN. After a crash, PostgreSQL re-sends from the last reported point:
//!   a delta may reach Kafka twice, never zero times.
//! - *Bounded memory.* Changes stream to the producer as they are decoded; a transaction
//!   is never held whole. When the producer queue is full, reading pauses until Kafka
//!   acknowledges.
//! - *Order per row.* Deltas are keyed by (table, primary key), so one row's changes land
//!   in one partition in WAL order; the idempotent producer keeps that order across retries.
//!
//! The parts: [`run`] (here) reconnects after transient failures and replaces a producer
//! that failed for good; `session` checks the server and the slot, then runs the streaming
//! loop; [`changes`] turns decoded [`pgoutput`] messages (and the [`snapshot`]'s rows) into
//! numbered deltas; [`ddl`] learns DDL on published tables at its commit and `recopy`
//! drops or copies those tables again while streaming goes on; [`publisher`] sends them and tracks their acknowledgements; `watermark`
//! and `slot` send watermarks and watch the slot.

pub mod changes;
mod copy_snapshot;
pub mod ddl;
mod error;
pub mod flush;
pub mod pgoutput;
pub mod publisher;
mod recopy;
pub mod refused;
pub mod replication;
mod session;
mod settings;
mod slot;
pub mod snapshot;
mod watermark;

use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::{KafkaSettings, PostgresSettings};
use crate::error_kind::ErrorKind;
use crate::shutdown::Shutdown;
use publisher::Publisher;
use session::Session;

pub use error::CaptureError;
pub use settings::CaptureSettings;

/// Runs capture until `shutdown`, reconnecting after transient failures.
pub async fn run(
    kafka_settings: &KafkaSettings,
    pg_settings: &PostgresSettings,
    settings: &CaptureSettings,
    mut shutdown: Shutdown,
) -> Result<(), CaptureError> {
    let mut publisher = Publisher::new(kafka_settings).await?;
    publisher.set_fragment_bytes(settings.fragment_bytes);
    let mut backoff = Backoff::new();
    let snapshot_taken = std::cell::Cell::new(false);
    let received_bytes = metrics::counter!("pgfanout_capture_received_bytes_total");
    metrics::counter!("pgfanout_capture_reconnects_total").increment(0);
    metrics::counter!("pgfanout_capture_heartbeats_total").increment(0);
    metrics::counter!("pgfanout_capture_snapshot_rows_total").increment(0);
    metrics::counter!("pgfanout_capture_ddl_tables_copied_total").increment(0);
    metrics::counter!("pgfanout_capture_ddl_tables_dropped_total").increment(0);
    metrics::gauge!("pgfanout_capture_snapshot_running").set(0.0);
    loop {
        let session = Session { settings, pg_settings, snapshot_taken: &snapshot_taken, received_bytes: received_bytes.clone() };
        match session.run(&mut publisher, &mut shutdown).await {
            Ok(()) => break,
            // The session starts again from the slot's confirmed position, with a producer
            // that can send.
            Err(e) if e.kind() == ErrorKind::Fatal && !shutdown.is_triggered() => {
                metrics::counter!("pgfanout_capture_reconnects_total").increment(1);
                tracing::warn!(error = %e, "the Kafka producer failed for good; replacing it and reconnecting");
                publisher.replace_producer(kafka_settings)?;
            }
            Err(e) if e.kind() == ErrorKind::Transient && !shutdown.is_triggered() => {
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
