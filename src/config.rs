//! Typed configuration shared by the components: where Kafka and PostgreSQL are, topic
//! names, and client properties. Every option is a command-line flag with an environment
//! variable (`PGFANOUT_*`), validated when parsed.

use std::net::SocketAddr;

use clap::Args;

/// Kafka connection and topic settings.
#[derive(Debug, Clone, Args)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers (host:port, comma separated).
    #[arg(long = "brokers", env = "PGFANOUT_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Prefix of every topic name, so several pipelines can share a cluster.
    #[arg(long = "topic-prefix", env = "PGFANOUT_TOPIC_PREFIX", default_value = "pgfanout.")]
    pub topic_prefix: String,
    /// Extra librdkafka properties for every client, as `key=value` pairs separated by
    /// commas (for example `fetch.wait.max.ms=20,security.protocol=ssl`).
    #[arg(long = "kafka-properties", env = "PGFANOUT_KAFKA_PROPERTIES", default_value = "", value_parser = parse_properties)]
    pub properties: Properties,
    /// Partitions of topics the pipeline creates.
    #[arg(long = "topic-partitions", env = "PGFANOUT_TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
    /// Replication factor of topics the pipeline creates.
    #[arg(long = "topic-replication", env = "PGFANOUT_TOPIC_REPLICATION", default_value_t = 1)]
    pub replication_factor: i32,
}

/// librdkafka properties given by the user; they override the pipeline's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<(String, String)>);

/// Parses `key=value` pairs separated by commas (blanks around each trimmed, empty pairs
/// skipped), as `--kafka-properties` takes them.
pub fn parse_properties(s: &str) -> Result<Properties, String> {
    let mut out = Vec::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("kafka property {pair:?} is not key=value"))?;
        if k.trim().is_empty() {
            return Err(format!("kafka property {pair:?} has an empty key"));
        }
        out.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Properties(out))
}

impl KafkaSettings {
    pub fn topics(&self) -> Topics {
        let p = &self.topic_prefix;
        Topics {
            instructions: format!("{p}instructions"),
            results: format!("{p}results"),
            deltas: format!("{p}deltas"),
            device_acks: format!("{p}device-acks"),
            dlq: format!("{p}dlq"),
            fleet: format!("{p}fleet"),
            confirmations: format!("{p}confirmations"),
        }
    }
}

/// The pipeline's topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub instructions: String,
    pub results: String,
    pub deltas: String,
    pub device_acks: String,
    pub dlq: String,
    /// The fleet registry as devices read it, compacted, keyed by device id.
    pub fleet: String,
    pub confirmations: String,
}

impl Topics {
    pub fn all(&self) -> [&str; 7] {
        [&self.instructions, &self.results, &self.deltas, &self.device_acks, &self.dlq, &self.fleet, &self.confirmations]
    }
}

/// PostgreSQL connection settings.
#[derive(Debug, Clone, Args)]
pub struct PostgresSettings {
    /// PostgreSQL connection string (libpq key=value form or a postgres:// URL).
    #[arg(
        long = "postgres",
        env = "PGFANOUT_POSTGRES",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    )]
    pub conninfo: String,
    /// Publication whose tables the pipeline captures and the executor may write.
    #[arg(long = "publication", env = "PGFANOUT_PUBLICATION", default_value = "pgfanout")]
    pub publication: String,
}

/// Where the process serves Prometheus metrics.
#[derive(Debug, Clone, Args)]
pub struct MetricsSettings {
    /// Listen address of the Prometheus metrics endpoint (for example 127.0.0.1:9187);
    /// no endpoint when absent.
    #[arg(long = "metrics-addr", env = "PGFANOUT_METRICS_ADDR")]
    pub listen: Option<SocketAddr>,
}

impl std::fmt::Display for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&pairs.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_parse_and_reject() {
        assert_eq!(
            parse_properties(" a=1, b.c = x=y ,").unwrap(),
            Properties(vec![("a".into(), "1".into()), ("b.c".into(), "x=y".into())])
        );
        assert!(parse_properties("novalue").is_err());
        assert!(parse_properties("=1").is_err());
        assert_eq!(parse_properties("").unwrap(), Properties::default());
    }
}
