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

mod error;
pub mod positions;
mod service;
mod settings;
mod startup;
pub mod tracker;

use crate::config::{KafkaSettings, PostgresSettings};
use crate::error_kind::ErrorKind;
use crate::shutdown::Shutdown;
pub use error::ConfirmError;
pub use settings::ConfirmSettings;

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
