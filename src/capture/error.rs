//! Why capture stopped or starts over: one variant per source, and whether retrying can help
//! ([`CaptureError::is_transient`], which the reconnect loop decides on).

use rdkafka::error::KafkaError;

use super::replication::ReplicationError;
use crate::{kafka, pg};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
}

impl CaptureError {
    pub(super) fn is_transient(&self) -> bool {
        match self {
            CaptureError::Replication(e) => e.is_transient(),
            CaptureError::Postgres(e) => pg::is_transient(e),
            CaptureError::Kafka(e) => kafka::is_transient(e),
            CaptureError::Decode(_) | CaptureError::Config(_) => false,
        }
    }
}
