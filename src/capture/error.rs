//! Why capture stopped or starts over: one variant per source, and what retrying can do
//! about it ([`CaptureError::kind`], which the reconnect loop decides on).

use rdkafka::error::KafkaError;

use super::changes::ChangeError;
use super::pgoutput::DecodeError;
use super::replication::ReplicationError;
use crate::error_kind::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// A replication message that is not pgoutput as capture reads it.
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// Decoded messages that do not fit together (a change before its relation, a row of
    /// the wrong width, a change outside a transaction).
    #[error("cannot follow the replication stream: {0}")]
    Change(#[from] ChangeError),
    #[error("{0}")]
    Config(String),
}

impl CaptureError {
    /// Transient: lost connections, servers or brokers away or busy — a new session gets
    /// past them. Fatal: the producer failed for good — a new producer gets past it.
    /// Definite: a stream capture cannot read or a setting that is wrong.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CaptureError::Replication(e) if e.is_transient() => ErrorKind::Transient,
            CaptureError::Postgres(e) => ErrorKind::of_postgres(e),
            CaptureError::Kafka(e) => ErrorKind::of_kafka(e),
            CaptureError::Replication(_) | CaptureError::Decode(_) | CaptureError::Change(_) | CaptureError::Config(_) => {
                ErrorKind::Definite
            }
        }
    }
}
