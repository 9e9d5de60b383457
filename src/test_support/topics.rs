//! What a [`Pipeline`]'s topics hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::pipeline::Pipeline;
use super::wait::{Deadline, TIMEOUT};
use crate::config::KafkaSettings;
use crate::contract::fragment::FRAGMENT_HEADER;
use crate::contract::TOMBSTONE_DELTA_HEADER;
use crate::kafka::{self, ClientRole};

/// One record of the deltas topic.
pub struct TopicRecord {
    pub partition: i32,
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    /// The delta a tombstone carries in its header.
    pub header: Option<Vec<u8>>,
    /// A fragment's header ([`FRAGMENT_HEADER`]).
    pub fragment: Option<Vec<u8>>,
}

impl Pipeline {
    /// Every record of the deltas topic as it stands now, in each partition's order.
    pub fn delta_topic_records(&self) -> Vec<TopicRecord> {
        let topic = self.kafka.topics().deltas;
        let mut ends = Vec::new();
        let consumer: BaseConsumer = kafka::reader_at(&self.kafka, &topic, |c: &BaseConsumer, part| {
            ends.push(c.fetch_watermarks(&topic, part, Duration::from_secs(10))?.1);
            Ok(rdkafka::Offset::Beginning)
        })
        .unwrap()
        .unwrap();
        let total: i64 = ends.iter().sum();
        let mut out = Vec::new();
        let deadline = Deadline::after(TIMEOUT, "the deltas to be read");
        while (out.len() as i64) < total {
            assert!(!deadline.passed(), "read {} of {total} records", out.len());
            let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) else { continue };
            let header =
                |name: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value.map(<[u8]>::to_vec)));
            out.push(TopicRecord {
                partition: m.partition(),
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().map(<[u8]>::to_vec),
                header: header(TOMBSTONE_DELTA_HEADER),
                fragment: header(FRAGMENT_HEADER),
            });
        }
        out
    }

    /// Rebuilds a store from what compaction leaves of `records`, before and after it drops
    /// the tombstones, and asserts that each equals PostgreSQL, every column.
    pub async fn assert_rebuilt_from_compacted_equals_postgres(&self, records: &[TopicRecord]) {
        let expected = self.postgres_rows().await;
        for (name, drop_tombstones) in [("compacted", false), ("cleaned", true)] {
            let prefix = self.compacted_copy(records, drop_tombstones, name).await;
            let store = self.store(name).to_string_lossy().into_owned();
            let out = self.run_cli(&["rebuild", "--id", name, "--store", &store, "--topic-prefix", &prefix]).await;
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(self.device_rows(name).await, expected, "{name}: the rebuilt store equals PostgreSQL");
        }
    }

    /// What compaction leaves of `records`: the newest record of each key in each partition,
    /// without the tombstones once `drop_tombstones` (after `delete.retention.ms`), written
    /// to a deltas topic of its own; returns that topic's prefix.
    async fn compacted_copy(&self, records: &[TopicRecord], drop_tombstones: bool, name: &str) -> String {
        let mut newest: HashMap<(i32, &[u8]), usize> = HashMap::new();
        for (i, r) in records.iter().enumerate() {
            newest.insert((r.partition, r.key.as_slice()), i);
        }
        let mut kept: Vec<usize> = newest.into_values().collect();
        kept.sort_unstable();
        let prefix = format!("{}{name}.", self.kafka.topic_prefix);
        let settings = KafkaSettings { topic_prefix: prefix.clone(), ..self.kafka.clone() };
        kafka::ensure_pipeline_topics(&settings).await.unwrap();
        let producer: FutureProducer = kafka::client_config(&settings, ClientRole::Producer).create().unwrap();
        let topic = settings.topics().deltas;
        for r in kept.into_iter().map(|i| &records[i]) {
            if drop_tombstones && r.payload.is_none() {
                continue;
            }
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).partition(r.partition).key(&r.key);
            if let Some(v) = &r.payload {
                record = record.payload(v);
            }
            let mut headers = OwnedHeaders::new();
            for (key, value) in [(TOMBSTONE_DELTA_HEADER, &r.header), (FRAGMENT_HEADER, &r.fragment)] {
                if let Some(value) = value {
                    headers = headers.insert(Header { key, value: Some(value) });
                }
            }
            record = record.headers(headers);
            producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
        }
        prefix
    }

    /// Number of records in the deltas topic (sum over partitions).
    pub fn delta_records(&self) -> i64 {
        let topic = self.kafka.topics().deltas;
        let consumer: BaseConsumer =
            kafka::client_config(&self.kafka, ClientRole::UncommittedConsumer { group_id: "watermarks" }).create().unwrap();
        let mut total = 0;
        for p in 0..self.kafka.partitions {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
            total += high - low;
        }
        total
    }

    /// Waits until the deltas topic has not grown for 500 ms (capture has published what
    /// was committed).
    pub async fn wait_deltas_settled(&self) {
        let mut last = (self.delta_records(), Instant::now());
        let deadline = Deadline::after(TIMEOUT, "the deltas topic to stop growing");
        while last.1.elapsed() < Duration::from_millis(500) {
            deadline.pause().await;
            let n = self.delta_records();
            if n != last.0 {
                last = (n, Instant::now());
            }
        }
    }
}
