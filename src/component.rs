//! How a `pgfanout` component is started as a child process (by `pgfanout demo`, the test
//! harness and the benchmarks): its subcommand, and the Kafka and PostgreSQL settings passed
//! through the environment variables the component reads them from (`PGFANOUT_*`, see
//! [`crate::config`]). One function, so that every spawner hands a child the same settings.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use crate::config::{KafkaSettings, PostgresSettings};

/// `bin args…` with the settings in its environment, no metrics endpoint (the caller sets
/// `PGFANOUT_METRICS_ADDR` when it wants one) and no standard input.
pub fn component_command(bin: impl AsRef<OsStr>, args: &[&str], kafka: &KafkaSettings, postgres: &PostgresSettings) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("PGFANOUT_BROKERS", &kafka.brokers)
        .env("PGFANOUT_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("PGFANOUT_KAFKA_PROPERTIES", kafka.properties.to_string())
        .env("PGFANOUT_POSTGRES", &postgres.conninfo)
        .env("PGFANOUT_PUBLICATION", &postgres.publication)
        .env_remove("PGFANOUT_METRICS_ADDR")
        .stdin(Stdio::null());
    cmd
}
