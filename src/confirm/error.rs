//! Why the confirmation service stopped or starts over.

use crate::error_kind::ErrorKind;

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
