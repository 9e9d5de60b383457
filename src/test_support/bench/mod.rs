//! What the benchmark programs share: settings from the environment `bench/run` prepares
//! (it starts PostgreSQL and the broker and exports their addresses as the components'
//! own `PGFANOUT_*` variables), components run as child processes that stop with the
//! benchmark, records through Kafka ([`flow`]), how loads are driven and timed
//! ([`measure`]), PostgreSQL's own logical replication as a reference ([`native`]) and what
//! processes used ([`usage`]).

pub mod flow;
pub mod measure;
pub mod native;
pub mod usage;

use std::path::Path;
use std::process::Child;

use super::process::{append_log, pgfanout_bin, register_device, terminate};
use crate::component::component_command;
use crate::config::{parse_properties, KafkaSettings, PostgresSettings};
use crate::contract::codec::encode_instruction;
use crate::contract::{now_micros, Field, Instruction, Operation, OperationKind, Value};

/// A variable `bench/run` sets.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the benchmark with bench/run"))
}

/// The Kafka settings of the broker `bench/run` started (3 partitions).
pub fn kafka_settings() -> KafkaSettings {
    KafkaSettings {
        brokers: env("PGFANOUT_BROKERS"),
        topic_prefix: std::env::var("PGFANOUT_TOPIC_PREFIX").unwrap_or_else(|_| "pgfanout.".into()),
        properties: parse_properties(&env("PGFANOUT_KAFKA_PROPERTIES"))
            .unwrap_or_else(|e| panic!("PGFANOUT_KAFKA_PROPERTIES: {e}")),
        partitions: 3,
        replication_factor: 1,
    }
}

/// The PostgreSQL settings of the database `bench/run` prepared.
pub fn postgres_settings() -> PostgresSettings {
    PostgresSettings {
        conninfo: env("PGFANOUT_POSTGRES"),
        publication: std::env::var("PGFANOUT_PUBLICATION").unwrap_or_else(|_| "pgfanout".into()),
    }
}

/// A child process stopped (SIGTERM, then waited for) on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        terminate(&self.0);
        let _ = self.0.wait();
    }
}

/// Starts `pgfanout <args>` (`PGFANOUT_BIN`, the release build `bench/run` made) with the
/// benchmark's settings, its output appended to `<dir>/<label>.log`.
pub fn start(dir: &Path, label: &str, args: &[&str]) -> Process {
    start_with(dir, label, args, &[])
}

/// Registers device `id` in the fleet and starts `pgfanout device --id <id> <args>` with
/// its key.
pub fn start_device(dir: &Path, id: &str, args: &[&str]) -> Process {
    let key = register_device(&kafka_settings(), &postgres_settings(), id, &[]);
    let mut all = vec!["device", "--id", id];
    all.extend_from_slice(args);
    start_with(dir, &format!("device-{id}"), &all, &[("PGFANOUT_DEVICE_KEY", &key)])
}

/// Retires device `id` from the fleet (`pgfanout fleet retire`).
pub fn retire_device(id: &str) {
    let out = component_command(pgfanout_bin(), &["fleet", "retire", id], &kafka_settings(), &postgres_settings())
        .output()
        .unwrap_or_else(|e| panic!("run pgfanout fleet retire: {e}"));
    assert!(out.status.success(), "retire device {id}: {}", String::from_utf8_lossy(&out.stderr));
}

fn start_with(dir: &Path, label: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
    let (out, err) = append_log(&dir.join(format!("{label}.log")));
    let child = component_command(pgfanout_bin(), args, &kafka_settings(), &postgres_settings())
        .envs(env.iter().copied())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {label}: {e}"));
    Process(child)
}

/// Instruction `n` of a benchmark's load: a single-row upsert of `items` (ids cycle through
/// 100,000), with a new id; returns the id and the encoded instruction.
pub fn upsert_item(n: u64) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let instruction = Instruction {
        instruction_id: id.clone(),
        issued_by: "bench".into(),
        issued_at: now_micros(),
        operations: vec![Operation {
            op: OperationKind::Upsert,
            table: "public.items".into(),
            key: vec![Field { name: "id".into(), value: Value::Long((n % 100_000) as i64) }],
            values: vec![
                Field { name: "name".into(), value: Value::String("item".into()) },
                Field { name: "qty".into(), value: Value::Long((n % 1000) as i64) },
                Field { name: "price".into(), value: Value::String("12.50".into()) },
            ],
            expect: vec![],
        }],
        target: None,
    };
    (id, encode_instruction(&instruction).unwrap())
}
