//! Why a fleet command, or a device's registration check, failed.

use crate::error_kind::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot make a device key: {0}")]
    Key(#[from] openssl::error::ErrorStack),
    #[error("{0}")]
    Codec(#[from] crate::contract::codec::CodecError),
    #[error("device {0:?} is not registered in the fleet: register it with `pgfanout fleet add {0}` and start it with the key that prints")]
    NotRegistered(String),
    #[error(
        "device {0:?} is already registered (`pgfanout fleet list` shows it; `pgfanout fleet rotate-key {0}` gives it a new key)"
    )]
    AlreadyRegistered(String),
    #[error("device {0:?} was retired from the fleet; register the device under a new id")]
    Retired(String),
    #[error("device {id:?} holds a key other than its registered one (registered fingerprint {registered}, this key's {held}): use the key `pgfanout fleet rotate-key {id}` printed last")]
    WrongKey { id: String, registered: String, held: String },
    #[error("{0:?} is not a device id: 1 to 128 characters among letters, digits, '.', '_' and '-'")]
    InvalidId(String),
    #[error("labels in the registry are not a JSON object of strings: {0}")]
    Labels(String),
    #[error("topic {0} does not exist; run `pgfanout setup`")]
    NoTopic(String),
}

impl FleetError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FleetError::Kafka(e) => ErrorKind::of_kafka(e),
            FleetError::Postgres(_) | FleetError::NoTopic(_) => ErrorKind::Transient,
            _ => ErrorKind::Definite,
        }
    }
}
