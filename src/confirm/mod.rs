//! The confirmation service: one confirmation per committed instruction, on
//! `<prefix>confirmations`, saying it is applied on every active device of the registered
//! fleet.
//!
//! It follows the results topic (every committed instruction's `commit_lsn`) and the
//! device-acks topic (every device's watermark), counting only acknowledgements signed with
//! the key the registry holds for the device they name ([`crate::fleet::signature`]). An
//! instruction is `applied` once every active device's watermark is at or past its commit
//! ([`tracker`]); one whose deadline passes first gets a `pending` naming the devices still
//! missing, and its `applied` when they catch up or are retired. A retired device stops
//! counting at the next registry reading (every second); a device registered later counts
//! from then on, for the instructions still waiting too.
//!
//! Time comes from the service's own clock when it receives an acknowledgement, never from
//! the device: a device whose clock is wrong is confirmed and seen like any other.
//!
//! Exactly one final confirmation per instruction, across restarts too: [`positions`]
//! explains how it resumes; results re-published for an id finalized within the dedupe
//! window are not confirmed again. One service runs at a time (a PostgreSQL advisory
//! lock); a second one waits for the lock.
//!
//! Why a component of its own: it needs every device's acknowledgements and the registry,
//! which the executor's hot path should not wait on, and it can stop or restart without
//! delaying any write.

pub mod positions;
mod service;
mod startup;
pub mod tracker;

use std::time::Duration;

use crate::config::{KafkaSettings, PostgresSettings};
use crate::error_kind::ErrorKind;
use crate::shutdown::Shutdown;

#[derive(Debug, Clone, clap::Args)]
pub struct ConfirmSettings {
    /// Seconds a committed instruction may wait for the fleet before a `pending`
    /// confirmation names the devices still missing.
    #[arg(long = "deadline-secs", env = "PGFANOUT_CONFIRM_DEADLINE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub deadline_secs: u64,
    /// Seconds during which a result read again for an id already confirmed is not
    /// confirmed again (the executor re-publishes the stored result when an id is
    /// resubmitted).
    #[arg(long = "dedupe-window-secs", env = "PGFANOUT_CONFIRM_DEDUPE_WINDOW_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub dedupe_window_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("{0}")]
    Codec(#[from] crate::contract::codec::CodecError),
    #[error("topic {0} does not exist; run `pgfanout setup`")]
    NoTopic(String),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("stopped while waiting for another confirmation service to stop")]
    Stopped,
}

impl ConfirmError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConfirmError::Kafka(e) => ErrorKind::of_kafka(e),
            ConfirmError::Fleet(e) => e.kind(),
            ConfirmError::Postgres(_) | ConfirmError::NoTopic(_) => ErrorKind::Transient,
            ConfirmError::Codec(_) | ConfirmError::Join(_) | ConfirmError::Stopped => ErrorKind::Definite,
        }
    }
}

/// Runs until `shutdown`; starts over (from its last checkpoint) after a connection to
/// PostgreSQL or Kafka is lost.
pub async fn run(
    kafka: &KafkaSettings,
    postgres: &PostgresSettings,
    settings: &ConfirmSettings,
    mut shutdown: Shutdown,
) -> Result<(), ConfirmError> {
    let mut backoff = crate::backoff::Backoff::new();
    loop {
        let outcome = match service::Service::start(kafka, postgres, settings, shutdown.clone()).await {
            Ok(mut s) => s.run().await,
            Err(e) => Err(e),
        };
        match outcome {
            Err(e) if e.kind() != ErrorKind::Definite && !shutdown.is_triggered() => {
                tracing::warn!(error = %e, "confirmation service interrupted; starting over from its last checkpoint");
                backoff.wait(&mut shutdown).await;
            }
            Err(ConfirmError::Stopped) => return Ok(()),
            outcome => return outcome,
        }
    }
}

/// How often the registry is read again and a checkpoint written.
const REFRESH: Duration = Duration::from_secs(1);
