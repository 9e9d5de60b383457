//! The services' addresses, from the environment `deploy/local/test.sh` exports
//! (`PGFANOUT_TEST_*`), and names no other test uses.

use crate::config::{parse_properties, KafkaSettings, Properties};

/// The variable `name`, which the suite runner sets: a missing one is a failure, not a skip.
pub fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!("{name} is not set: run the suite with ./deploy/local/test.sh, which starts PostgreSQL and the broker"),
    }
}

/// Conninfo of a superuser of the test PostgreSQL, on its `postgres` database.
pub fn admin_conninfo() -> String {
    required_env("PGFANOUT_TEST_POSTGRES")
}

/// Bootstrap servers of the shared test broker.
pub fn brokers() -> String {
    required_env("PGFANOUT_TEST_BROKERS")
}

/// The extra librdkafka properties the suite runs with (`PGFANOUT_TEST_KAFKA_PROPERTIES`).
pub fn kafka_properties() -> Properties {
    let text = std::env::var("PGFANOUT_TEST_KAFKA_PROPERTIES").unwrap_or_default();
    parse_properties(&text).unwrap_or_else(|e| panic!("PGFANOUT_TEST_KAFKA_PROPERTIES: {e}"))
}

/// Kafka settings of a pipeline on `brokers` whose topics start with `prefix`
/// (3 partitions, no replication).
pub fn kafka_settings(brokers: &str, prefix: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers.to_string(),
        topic_prefix: prefix.to_string(),
        properties: kafka_properties(),
        partitions: 3,
        replication_factor: 1,
    }
}

/// `<prefix>_<pid>_<nanoseconds>`: a name (database, slot, topic prefix) no other test of
/// this or a parallel run uses; lowercase, so it is also a plain SQL identifier.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("{prefix}_{}_{nanos:08x}", std::process::id())
}

/// The same conninfo on database `db`.
pub fn with_dbname(conninfo: &str, db: &str) -> String {
    let kept: Vec<&str> = conninfo.split_whitespace().filter(|kv| !kv.starts_with("dbname=")).collect();
    format!("{} dbname={db}", kept.join(" "))
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free local port").port()
}
