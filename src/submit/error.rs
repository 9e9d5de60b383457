//! What can go wrong while submitting or waiting.

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("line {line}: {reason}")]
    Input { line: usize, reason: String },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("{0}")]
    Other(String),
}
