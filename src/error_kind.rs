//! What retrying can do about an error: the classification every component's error type
//! gives through its `kind()`, so that a retry loop decides on the kind and not on the
//! error's text (as Materialize splits transient from definite errors, and etl gives each
//! error kind a retry policy).

use rdkafka::error::KafkaError;

use crate::{kafka, pg};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// May succeed when tried again as it is: a connection lost, a broker or server away
    /// or busy, a transaction that lost a race, something another process holds for now.
    Transient,
    /// Tried again, it fails the same way: the input, the configuration or the setup is
    /// wrong, and the message says what to change.
    Definite,
    /// The client that reported it can do nothing more (librdkafka's fatal error: an
    /// idempotent producer whose sequence the broker refused); only new clients can go on.
    Fatal,
}

impl ErrorKind {
    /// The kind of a Kafka client's error ([`kafka::is_fatal`], [`kafka::is_transient`]).
    pub fn of_kafka(e: &KafkaError) -> ErrorKind {
        if kafka::is_fatal(e) {
            ErrorKind::Fatal
        } else if kafka::is_transient(e) {
            ErrorKind::Transient
        } else {
            ErrorKind::Definite
        }
    }

    /// The kind of a PostgreSQL error, by its SQLSTATE ([`crate::sqlstate::is_transient`]).
    pub fn of_postgres(e: &tokio_postgres::Error) -> ErrorKind {
        if pg::is_transient(e) {
            ErrorKind::Transient
        } else {
            ErrorKind::Definite
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    #[test]
    fn kafka_errors_by_code() {
        let flush = |code| KafkaError::Flush(code);
        assert_eq!(ErrorKind::of_kafka(&flush(RDKafkaErrorCode::Fatal)), ErrorKind::Fatal);
        assert_eq!(ErrorKind::of_kafka(&flush(RDKafkaErrorCode::BrokerTransportFailure)), ErrorKind::Transient);
        assert_eq!(ErrorKind::of_kafka(&flush(RDKafkaErrorCode::MessageSizeTooLarge)), ErrorKind::Definite);
    }
}
