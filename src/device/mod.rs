//! A target device: consumes the deltas topic and applies every delta to its local SQLite
//! store, idempotently.
//!
//! The device's positions live in its store, not in Kafka: on start it assigns itself every
//! partition of the deltas topic at the offsets recorded in the store (or the beginning),
//! and each batch's rows and offsets commit in one SQLite transaction ([`store`]). So a
//! crash at any moment loses nothing and applies nothing twice, and rewinding the stored
//! offsets ([`replay`]) replays history safely, since a delta only changes a row it is
//! newer than.
//!
//! A reader of the store sees only states PostgreSQL had: each SQLite transaction applies
//! every source transaction below the cut — the smallest watermark over all partitions —
//! and nothing above it, holding later deltas until their transaction is complete on every
//! partition (`store`'s consistent apply explains why). Running, `replay` and `rebuild`
//! all apply through it.
//!
//! Once a second, when they moved, the device also commits its stored positions to its
//! consumer group (`pgfanout-device-<id>`), so that Kafka's own tools (consumer-group lag, a job that
//! deletes records every reader has passed) see how far each device is. Those commits are
//! reports only: the device never resumes from them.

pub mod ack;
pub mod rebuild;
pub mod replay;
pub mod status;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{parse_properties, KafkaSettings, Properties};
use crate::contract::codec::decode_delta_view;
use crate::contract::fragment::{FragmentHeader, FRAGMENT_HEADER};
use crate::contract::{now_micros, DeltaOp, TOMBSTONE_DELTA_HEADER};
use crate::error_kind::ErrorKind;
use crate::fleet::signature::DeviceKey;
use crate::fleet::{topic as fleet_topic, FleetError};
use crate::kafka::{self, ClientRole, MetricsContext};
use crate::shutdown::Shutdown;
use ack::{AckPublisher, AppliedPositions};
use store::{Fragment, Record, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct DeviceSettings {
    /// This device's id; its consumer group is `pgfanout-device-<id>`.
    #[arg(long = "id", visible_alias = "device", env = "PGFANOUT_DEVICE_ID")]
    pub id: String,
    /// Path of the device's SQLite store (created if missing).
    #[arg(long = "store", env = "PGFANOUT_DEVICE_STORE")]
    pub store: PathBuf,
    /// Most deltas applied in one SQLite transaction.
    #[arg(long = "batch-size", env = "PGFANOUT_DEVICE_BATCH_SIZE", default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,
    /// Least milliseconds between two acknowledgements of a moving watermark on the
    /// device-acks topic: lower confirms `submit --wait all-devices` sooner, at one more
    /// record per interval per device.
    #[arg(long = "ack-interval-ms", env = "PGFANOUT_ACK_INTERVAL_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub ack_interval_ms: u64,
    /// MiB of deltas held in memory while their transactions are incomplete on some
    /// partition; beyond that they are staged in the store (slower: written, read back and
    /// deleted). Once 4 MiB (at most this) are held, the device applies what arrives in a
    /// SQLite transaction that commits when the transactions it took are complete, so a
    /// large transaction is mostly written once and only what one partition delivers ahead
    /// of the others waits here.
    #[arg(long = "hold-mib", env = "PGFANOUT_DEVICE_HOLD_MIB", default_value_t = store::DEFAULT_HOLD_MIB, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    pub hold_mib: u32,
    /// Tables this device keeps (schema.table, comma separated); default: all. Deltas of
    /// other tables are skipped but still move the offsets and the watermark.
    #[arg(long = "tables", env = "PGFANOUT_DEVICE_TABLES", value_delimiter = ',')]
    pub tables: Option<Vec<String>>,
    /// This device's key, as `pgfanout fleet add` printed it (hex): it signs the device's
    /// acknowledgements. A running device needs it; a replay or rebuild without it
    /// publishes acknowledgements that count for nothing.
    #[arg(long = "key", env = "PGFANOUT_DEVICE_KEY", value_parser = DeviceKey::parse, hide_env_values = true)]
    pub key: Option<DeviceKey>,
    /// A file holding the device's key (instead of `--key`): a mounted secret.
    #[arg(long = "key-file", env = "PGFANOUT_DEVICE_KEY_FILE", conflicts_with = "key", value_parser = key_from_file)]
    pub key_file: Option<DeviceKey>,
    /// Extra librdkafka properties for this device's clients only, applied after
    /// `--kafka-properties` (for example a longer `fetch.wait.max.ms` for a large fleet
    /// than the pipeline's own components use).
    #[arg(long = "device-kafka-properties", env = "PGFANOUT_DEVICE_KAFKA_PROPERTIES", default_value = "", value_parser = parse_properties)]
    pub kafka_properties: Properties,
}

fn key_from_file(path: &str) -> Result<DeviceKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the device key from {path}: {e}"))?;
    DeviceKey::parse(&text).map_err(|e| format!("{path}: {e}"))
}

impl DeviceSettings {
    /// The key given by `--key` or `--key-file`.
    pub fn key(&self) -> Option<&DeviceKey> {
        self.key.as_ref().or(self.key_file.as_ref())
    }

    /// `kafka_settings` with this device's own properties after the shared ones: what every
    /// client of a device, a replay or a rebuild uses, from the first (the registration
    /// check, the topic's bounds) to the last.
    pub(crate) fn kafka(&self, kafka_settings: &KafkaSettings) -> KafkaSettings {
        let mut merged = kafka_settings.clone();
        merged.properties.0.extend(self.kafka_properties.0.iter().cloned());
        merged
    }
}

/// Why the device, a replay, a rebuild or a status read stopped: one variant per cause.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("topic {0} does not exist or has no partitions; start capture first or create the topics")]
    NoPartitions(String),
    #[error("topic {topic} has no partition {partition}")]
    NoSuchPartition { topic: String, partition: i32 },
    #[error("partition {partition} holds offsets {low}..{high}; {offset} is outside")]
    OffsetOutOfRange { partition: i32, low: i64, high: i64, offset: i64 },
    #[error(
        "the deltas topic no longer holds its whole history (partition {partition} starts at offset {low}): a store rebuilt from it would miss rows. \
         Give the topic cleanup.policy=compact (see the README), or copy the store of a device that is up to date, \
         or recreate the capture slot so that a fresh snapshot is published"
    )]
    HistoryIncomplete { partition: i32, low: i64 },
    #[error("rebuild interrupted; the old store is untouched")]
    RebuildInterrupted,
    #[error("cannot remove {}: {source}", path.display())]
    RemoveFile { path: PathBuf, source: std::io::Error },
    #[error("cannot swap in the rebuilt store: {0}")]
    SwapStore(#[source] std::io::Error),
    #[error("cannot open store {}: {source}", path.display())]
    OpenStore { path: PathBuf, source: rusqlite::Error },
    #[error("{} is not a device store: {source}", path.display())]
    NotAStore { path: PathBuf, source: rusqlite::Error },
    #[error("{0}")]
    Fleet(#[from] FleetError),
    #[error("device {0:?} has no key: start it with PGFANOUT_DEVICE_KEY (or --key, or --key-file) set to what `pgfanout fleet add {0}` printed")]
    NoKey(String),
}

impl DeviceError {
    /// Whether the same command may succeed later as it is (the topic is created, the
    /// other process holding the store stops, the broker is back), never will (the input,
    /// the topic's history or the file is wrong), or needs new clients.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeviceError::Kafka(e) => ErrorKind::of_kafka(e),
            DeviceError::Fleet(e) => e.kind(),
            DeviceError::Store(store::StoreError::InUse(_)) | DeviceError::NoPartitions(_) | DeviceError::RebuildInterrupted => {
                ErrorKind::Transient
            }
            DeviceError::Store(_)
            | DeviceError::NoSuchPartition { .. }
            | DeviceError::OffsetOutOfRange { .. }
            | DeviceError::HistoryIncomplete { .. }
            | DeviceError::RemoveFile { .. }
            | DeviceError::SwapStore(_)
            | DeviceError::OpenStore { .. }
            | DeviceError::NotAStore { .. }
            | DeviceError::NoKey(_) => ErrorKind::Definite,
        }
    }
}

/// A device's store, consumer and watermark, wired together.
pub(crate) struct Device {
    settings: DeviceSettings,
    topic: String,
    store: Store,
    consumer: BaseConsumer<MetricsContext>,
    watermark: AppliedPositions,
    acks: AckPublisher,
    positions: HashMap<i32, i64>,
    lag_checked: Instant,
    /// When the positions were last committed to the consumer group, and which they were.
    reported: (Instant, HashMap<i32, i64>),
    /// Whether the last lag measurement found records waiting (or could not tell).
    behind: bool,
    /// When a record last arrived (or the consumer was last created).
    last_record: Instant,
    kafka_settings: KafkaSettings,
}

/// How often a running device measures its lag behind the topic's end.
const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// How often a running device commits its positions to its consumer group.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for records when none arrive.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How long records may wait in the topic with none arriving before the device replaces
/// its consumer (after a broker restart, a consumer can stay wedged with its requests
/// queued; a new one resumes from the store's offsets).
const STALL: Duration = Duration::from_secs(30);

/// What one step of the device did.
pub(crate) struct Step {
    pub processed: u64,
    /// Next offset per partition after the records consumed so far (the stored offsets
    /// may be behind, at deltas held in memory).
    pub positions: HashMap<i32, i64>,
}

impl Device {
    /// Opens the store (exclusively), assigns every partition at its stored offset.
    /// `kafka_settings` already carry the device's own properties ([`DeviceSettings::kafka`]).
    pub(crate) fn open(
        kafka_settings: &KafkaSettings,
        settings: &DeviceSettings,
        shutdown: &Shutdown,
    ) -> Result<Device, DeviceError> {
        let topic = kafka_settings.topics().deltas;
        let mut store = Store::open(&settings.store)?;
        store.subscribe_to(settings.tables.as_ref().map(|t| t.iter().map(|s| s.trim().to_string()).collect::<HashSet<_>>()));
        let consumer = new_consumer(kafka_settings, &settings.id)?;
        let partitions = assign_from_store(&consumer, &store, &topic, shutdown)?;
        store.set_partitions(partitions.clone());
        store.set_hold_bytes((settings.hold_mib as usize) << 20);
        let watermark = AppliedPositions::new(partitions, store.applied_lsns(&topic)?);
        let ack_gap = Duration::from_millis(settings.ack_interval_ms);
        let acks = AckPublisher::new(kafka_settings, settings.id.clone(), settings.key().cloned(), ack_gap)?;
        let positions = store.offsets(&topic)?;
        metrics::counter!("pgfanout_device_deltas_skipped_total", "device" => settings.id.clone()).increment(0);
        metrics::counter!("pgfanout_device_deltas_rejected_total", "device" => settings.id.clone()).increment(0);
        let lag_checked = Instant::now() - LAG_INTERVAL;
        Ok(Device {
            settings: settings.clone(),
            topic,
            store,
            consumer,
            watermark,
            acks,
            positions,
            lag_checked,
            reported: (Instant::now(), HashMap::new()),
            behind: false,
            last_record: Instant::now(),
            kafka_settings: kafka_settings.clone(),
        })
    }

    /// Publishes the lag per partition (records between the position and the topic's end).
    /// While records arrive, the topic's end is the one librdkafka learnt from its last fetch
    /// response: asking the broker (ListOffsets) blocked the apply loop on a round trip per
    /// partition every few seconds. Once none arrived for half of [`STALL`], the broker is
    /// asked: a wedged consumer's fetch responses say nothing new, and this is what tells
    /// that records wait ([`Device::replace_stalled_consumer`]).
    fn measure_lag(&mut self) {
        if self.lag_checked.elapsed() < LAG_INTERVAL {
            return;
        }
        self.lag_checked = Instant::now();
        let ask_broker = self.last_record.elapsed() >= STALL / 2;
        let mut behind = false;
        for p in self.watermark.per_partition().map(|(p, _)| p).collect::<Vec<_>>() {
            let ends = if ask_broker {
                self.consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(1)).ok()
            } else {
                kafka::cached_watermarks(&self.consumer, &self.topic, p)
            };
            match ends {
                Some((low, high)) => {
                    let position = self.positions.get(&p).copied().unwrap_or(low);
                    behind |= high > position;
                    metrics::gauge!("pgfanout_device_lag_records", "device" => self.settings.id.clone(), "partition" => p.to_string())
                        .set((high - position).max(0) as f64);
                }
                None => behind = true,
            }
        }
        self.behind = behind;
    }

    /// Commits the stored positions to the device's consumer group when they moved, at most
    /// once per [`REPORT_INTERVAL`]. A failed commit only delays the report. Not on stop:
    /// with the broker away, closing the consumer would wait for that commit.
    fn report_positions(&mut self) {
        if self.reported.0.elapsed() < REPORT_INTERVAL || self.reported.1 == self.positions {
            return;
        }
        self.reported.0 = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in &self.positions {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*offset)) {
                tracing::debug!(error = %e, "position report");
                return;
            }
        }
        match self.consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            Ok(()) => self.reported.1 = self.positions.clone(),
            Err(e) => tracing::debug!(error = %e, "position report"),
        }
    }

    /// Replaces a consumer that lets records wait for [`STALL`] without delivering any.
    fn replace_stalled_consumer(&mut self, shutdown: &Shutdown) -> Result<(), DeviceError> {
        if !self.behind || self.last_record.elapsed() < STALL {
            return Ok(());
        }
        tracing::warn!(seconds = STALL.as_secs(), "records wait in the topic but none arrived; replacing the consumer");
        let consumer = new_consumer(&self.kafka_settings, &self.settings.id)?;
        assign_from_store(&consumer, &self.store, &self.topic, shutdown)?;
        kafka::close_consumer(std::mem::replace(&mut self.consumer, consumer));
        self.last_record = Instant::now();
        Ok(())
    }

    /// Polls one batch and applies it in one SQLite transaction.
    pub(crate) fn step(&mut self, shutdown: &Shutdown) -> Result<Step, DeviceError> {
        self.measure_lag();
        self.report_positions();
        // An acknowledgement held back by the interval goes out when due, not with the next
        // record.
        let wait = self.acks.due_in(self.watermark.value()).map_or(IDLE_POLL, |d| d.clamp(Duration::from_millis(1), IDLE_POLL));
        let batch = match kafka::poll_batch(&self.consumer, self.settings.batch_size as usize, wait, Duration::from_millis(1)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
                return Ok(Step { processed: 0, positions: HashMap::new() });
            }
        };
        if batch.is_empty() {
            self.acks.maybe_publish(self.watermark.value());
            self.replace_stalled_consumer(shutdown)?;
            return Ok(Step { processed: 0, positions: HashMap::new() });
        }
        self.last_record = Instant::now();
        let started = Instant::now();
        let records: Vec<Record> = batch.iter().map(record_of).collect();
        let stats = self.store.apply_batch(&self.topic, &records)?;
        self.watermark.update(&stats.applied_lsn);
        self.acks.maybe_publish(self.watermark.value());
        let device = self.settings.id.clone();
        let now = now_micros();
        for d in records.iter().filter(|r| !r.tombstone).filter_map(|r| r.delta.as_ref().ok().and_then(Option::as_ref)) {
            // A snapshot row's commit time is the snapshot's, not the row's.
            if d.commit_ts > 0 && d.op != DeltaOp::Snapshot {
                metrics::histogram!("pgfanout_device_end_to_end_seconds", "device" => device.clone())
                    .record((now - d.commit_ts).max(0) as f64 / 1e6);
            }
        }
        for (op, n) in &stats.applied_by_op {
            metrics::counter!("pgfanout_device_deltas_applied_total", "device" => device.clone(), "op" => *op).increment(*n);
        }
        metrics::counter!("pgfanout_device_deltas_skipped_total", "device" => device.clone()).increment(stats.skipped_older);
        metrics::counter!("pgfanout_device_deltas_rejected_total", "device" => device.clone()).increment(stats.rejected);
        metrics::counter!("pgfanout_device_fragments_total", "device" => device.clone()).increment(stats.fragments);
        metrics::histogram!("pgfanout_device_apply_batch_duration_seconds", "device" => device)
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("pgfanout_device_held_deltas", "device" => self.settings.id.clone()).set(stats.held as f64);
        self.positions.extend(&stats.next_offset);
        Ok(Step { processed: stats.processed, positions: stats.consumed })
    }

    pub(crate) fn close(self) {
        kafka::close_consumer(self.consumer);
    }
}

/// The device's consumer: positions come from the store, never from Kafka (it only reports
/// them there).
fn new_consumer(kafka_settings: &KafkaSettings, device_id: &str) -> Result<BaseConsumer<MetricsContext>, DeviceError> {
    let group_id = format!("pgfanout-device-{device_id}");
    Ok(MetricsContext::new("device", Some(device_id))
        .create(kafka_settings, ClientRole::UncommittedConsumer { group_id: &group_id })?)
}

/// A consumed record as the store applies it: a delta, a Kafka tombstone (with the delete
/// its header carries), or a fragment of a larger delta.
pub(crate) fn record_of(m: &rdkafka::message::OwnedMessage) -> Record<'_> {
    let (partition, offset) = (m.partition(), m.offset());
    if let Some(header) = header(m, FRAGMENT_HEADER) {
        let (delta, fragment) = match FragmentHeader::decode(header) {
            Ok(header) => (Ok(None), Some(Fragment { header, bytes: m.payload().unwrap_or_default() })),
            Err(e) => (Err(e.to_string()), None),
        };
        return Record { partition, offset, delta, tombstone: false, fragment, encoded: None };
    }
    let encoded = m.payload().or_else(|| header(m, TOMBSTONE_DELTA_HEADER));
    let delta = match encoded {
        Some(p) => decode_delta_view(p).map(Some).map_err(|e| e.to_string()),
        None => Ok(None),
    };
    Record { partition, offset, delta, tombstone: m.payload().is_none(), fragment: None, encoded }
}

/// The value of the record's header `name`, if it has one.
fn header<'m>(m: &'m rdkafka::message::OwnedMessage, name: &str) -> Option<&'m [u8]> {
    use rdkafka::message::Headers;
    m.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

/// Runs the device on the current thread until `shutdown`. Blocking: call it from a
/// dedicated thread or `spawn_blocking`. A device that is not registered, retired, or
/// holds another key than its registered one refuses to start ([`fleet_topic`]).
pub fn run_blocking(kafka_settings: &KafkaSettings, settings: &DeviceSettings, shutdown: Shutdown) -> Result<(), DeviceError> {
    let kafka_settings = &settings.kafka(kafka_settings);
    let key = settings.key().ok_or_else(|| DeviceError::NoKey(settings.id.clone()))?;
    let registered = fleet_topic::check_registration_blocking(kafka_settings, &settings.id, key)?;
    let mut device = Device::open(kafka_settings, settings, &shutdown)?;
    tracing::info!(device = %settings.id, store = %settings.store.display(), labels = ?registered.labels, "device started");
    while !shutdown.is_triggered() {
        device.step(&shutdown)?;
    }
    device.close();
    tracing::info!(device = %settings.id, "device stopped");
    Ok(())
}

/// Per partition: its number, first offset and next offset.
pub(crate) type PartitionBounds = (i32, i64, i64);

/// The bounds of every partition of the deltas topic, with the consumer that read them.
/// Blocking.
pub(crate) fn topic_bounds(kafka_settings: &KafkaSettings) -> Result<(BaseConsumer, Vec<PartitionBounds>), DeviceError> {
    let topic = kafka_settings.topics().deltas;
    let probe: BaseConsumer =
        kafka::client_config(kafka_settings, ClientRole::UncommittedConsumer { group_id: "pgfanout-probe" }).create()?;
    let partitions = kafka::partition_count(probe.client(), &topic)?;
    if partitions == 0 {
        return Err(DeviceError::NoPartitions(topic));
    }
    let mut bounds = Vec::with_capacity(partitions);
    for p in 0..partitions as i32 {
        let (low, high) = probe.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        bounds.push((p, low, high));
    }
    Ok((probe, bounds))
}

/// Assigns every partition of `topic`, each at the offset the store recorded; returns the
/// partitions.
fn assign_from_store(
    consumer: &BaseConsumer<MetricsContext>,
    store: &Store,
    topic: &str,
    shutdown: &Shutdown,
) -> Result<Vec<i32>, DeviceError> {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::kafka::client_config;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        device: DeviceSettings,
    }

    /// The ends the lag check reads while records arrive are the ones fetch responses
    /// brought, with no request of their own; none before the first response.
    #[test]
    fn cached_watermarks_come_from_fetch_responses() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let producer: BaseProducer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).create().unwrap();
        for _ in 0..5 {
            producer.send(BaseRecord::<[u8], [u8]>::to("t").payload(b"x")).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "g")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        assert_eq!(kafka::cached_watermarks(&consumer, "t", 0), None, "no fetch response yet");
        let deadline = Instant::now() + Duration::from_secs(20);
        while consumer.poll(Duration::from_millis(100)).is_none_or(|m| m.unwrap().offset() < 4) {
            assert!(Instant::now() < deadline, "records not read");
        }
        assert_eq!(kafka::cached_watermarks(&consumer, "t", 0), Some((0, 5)));
    }

    #[test]
    fn device_properties_come_after_the_shared_ones() {
        let args = ["pgfanout", "--id", "a", "--store", "a.sqlite", "--device-kafka-properties", "fetch.wait.max.ms=100"];
        let device = Args::try_parse_from(args).unwrap().device;
        let shared = KafkaSettings {
            brokers: "b:1".into(),
            topic_prefix: "p.".into(),
            properties: parse_properties("fetch.wait.max.ms=20,session.timeout.ms=6000").unwrap(),
            partitions: 3,
            replication_factor: 1,
        };
        let cfg = client_config(&device.kafka(&shared), ClientRole::UncommittedConsumer { group_id: "g" });
        assert_eq!(cfg.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(cfg.get("session.timeout.ms"), Some("6000"));
        assert_eq!(client_config(&shared, ClientRole::Consumer { group_id: "g" }).get("fetch.wait.max.ms"), Some("20"));
    }
}
