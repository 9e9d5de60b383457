//! A target device: consumes the deltas topic and applies every delta to its local SQLite
//! store, idempotently.
//!
//! The device's positions live in its store, not in Kafka: on start it assigns itself every
//! partition of the deltas topic at the offsets recorded in the store (or the beginning),
//! and each batch's rows and offsets commit in one SQLite transaction ([`store`]). So a
//! crash at any moment loses nothing and applies nothing twice, and rewinding the stored
//! offsets replays history safely, since a delta only changes a row it is newer than.

pub mod ack;
pub mod store;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::contract::codec::decode_delta;
use crate::contract::now_micros;
use crate::kafka::{self, ClientRole};
use crate::shutdown::Shutdown;
use ack::{AckPublisher, Watermark};
use store::{Record, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct DeviceSettings {
    /// This device's id; its consumer group is `pgfanout-device-<id>`.
    #[arg(long = "id", env = "PGFANOUT_DEVICE_ID")]
    pub id: String,
    /// Path of the device's SQLite store (created if missing).
    #[arg(long = "store", env = "PGFANOUT_DEVICE_STORE")]
    pub store: PathBuf,
    /// Most deltas applied in one SQLite transaction.
    #[arg(long = "batch-size", env = "PGFANOUT_DEVICE_BATCH_SIZE", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("store: {0} (is the store path writable, and used by this device only?)")]
    Store(#[from] store::StoreError),
    #[error("topic {0} does not exist or has no partitions; start capture first or create the topics")]
    NoPartitions(String),
}

/// Runs the device on the current thread until `shutdown`. Blocking: call it from a
/// dedicated thread or `spawn_blocking`.
pub fn run_blocking(kafka_settings: &KafkaSettings, settings: &DeviceSettings, shutdown: Shutdown) -> Result<(), DeviceError> {
    let topic = kafka_settings.topics().deltas;
    let mut store = Store::open(&settings.store)?;
    let group_id = format!("pgfanout-device-{}", settings.id);
    let consumer: BaseConsumer =
        kafka::client_config(kafka_settings, ClientRole::UncommittedConsumer { group_id: &group_id }).create()?;
    let partitions = assign_from_store(&consumer, &store, &topic, &shutdown)?;
    let mut watermark = Watermark::new(partitions, store.applied_lsns(&topic)?);
    let mut acks = AckPublisher::new(
        kafka::client_config(kafka_settings, ClientRole::Producer).create()?,
        kafka_settings.topics().device_acks,
        settings.id.clone(),
    );
    tracing::info!(device = %settings.id, store = %settings.store.display(), "device started");

    let device_label = settings.id.clone();
    while !shutdown.is_triggered() {
        let batch = match kafka::poll_batch(
            &consumer,
            settings.batch_size as usize,
            Duration::from_millis(200),
            Duration::from_millis(5),
        ) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if batch.is_empty() {
            acks.maybe_publish(watermark.value());
            continue;
        }
        let started = Instant::now();
        let records: Vec<Record<'_>> = batch
            .iter()
            .map(|m| Record {
                partition: m.partition(),
                offset: m.offset(),
                delta: match m.payload() {
                    Some(p) => decode_delta(p).map_err(|e| e.to_string()),
                    None => Err("record has no value".to_string()),
                },
                key: m.key(),
            })
            .collect();
        let stats = store.apply_batch(&topic, &records)?;
        watermark.update(&stats.applied_lsn);
        acks.maybe_publish(watermark.value());
        let now = now_micros();
        for r in &records {
            if let Ok(d) = &r.delta {
                if d.commit_ts > 0 {
                    metrics::histogram!("pgfanout_device_end_to_end_seconds", "device" => device_label.clone())
                        .record((now - d.commit_ts).max(0) as f64 / 1e6);
                }
            }
        }
        for (op, n) in &stats.applied_by_op {
            metrics::counter!("pgfanout_device_deltas_applied_total", "device" => device_label.clone(), "op" => *op)
                .increment(*n);
        }
        metrics::counter!("pgfanout_device_deltas_skipped_total", "device" => device_label.clone())
            .increment(stats.skipped_older);
        metrics::counter!("pgfanout_device_deltas_rejected_total", "device" => device_label.clone()).increment(stats.rejected);
        metrics::histogram!("pgfanout_device_apply_batch_duration_seconds", "device" => device_label.clone())
            .record(started.elapsed().as_secs_f64());
    }
    kafka::close_consumer(consumer);
    tracing::info!(device = %settings.id, "device stopped");
    Ok(())
}

/// Assigns every partition of `topic`, each at the offset the store recorded; returns the
/// partitions.
fn assign_from_store(consumer: &BaseConsumer, store: &Store, topic: &str, shutdown: &Shutdown) -> Result<Vec<i32>, DeviceError> {
    let offsets = store.offsets(topic)?;
    let partitions = loop {
        match kafka::partition_count(consumer.client(), topic) {
            Ok(n) if n > 0 => break n,
            Ok(_) => tracing::info!(topic, "waiting for the deltas topic to exist"),
            Err(e) => tracing::warn!(error = %e, "cannot read topic metadata; retrying"),
        }
        if shutdown.is_triggered() {
            return Err(DeviceError::NoPartitions(topic.to_string()));
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let offset = offsets.get(&p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
        tpl.add_partition_offset(topic, p, offset)?;
    }
    consumer.assign(&tpl)?;
    Ok((0..partitions as i32).collect())
}
