//! What the benchmark programs share: settings from the environment `bench/run` prepares,
//! and child processes that stop with the benchmark. Each benchmark uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};

use pgfanout::config::{KafkaSettings, Properties};

/// A variable `bench/run` sets.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the benchmark with bench/run"))
}

/// The Kafka settings of the broker `bench/run` started (3 partitions).
pub fn kafka_settings() -> KafkaSettings {
    KafkaSettings {
        brokers: env("PGFANOUT_BROKERS"),
        topic_prefix: std::env::var("PGFANOUT_TOPIC_PREFIX").unwrap_or_else(|_| "pgfanout.".into()),
        properties: Properties(
            env("PGFANOUT_KAFKA_PROPERTIES")
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        ),
        partitions: 3,
        replication_factor: 1,
    }
}

/// A child process stopped (SIGTERM, then waited for) on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child this value owns.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Starts `pgfanout <args>` (the release binary), its output appended to `<dir>/<label>.log`.
pub fn start(dir: &Path, label: &str, args: &[&str]) -> Process {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{label}.log"))).unwrap();
    let child = Command::new(env("PGFANOUT_BIN"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {label}: {e}"));
    Process(child)
}
