//! The publisher against librdkafka's mock cluster: acknowledgements and refusals as
//! Kafka reports them, in an order no real broker can be made to produce on demand.

use std::time::Duration;

use rdkafka::mocking::MockCluster;

use super::*;
use crate::config::KafkaSettings;
use crate::contract::{Column, Value};

fn delta(commit_lsn: i64, len: usize) -> Delta {
    let c = |name: &str, value| Column { name: name.into(), type_name: "bytea".into(), value, unchanged: false };
    Delta {
        table: "public.blobs".into(),
        op: DeltaOp::Insert,
        key: vec![c("id", Value::Long(commit_lsn))],
        after: Some(vec![c("id", Value::Long(commit_lsn)), c("body", Value::Bytes(vec![7; len]))]),
        old_key: None,
        commit_lsn,
        lsn: commit_lsn,
        xid: 1,
        commit_ts: 0,
        seq: 0,
        instruction_id: None,
    }
}

/// A publisher on a two-broker mock cluster whose deltas topic has partition 0 led by
/// broker 2 and partition 1 by broker 1.
async fn publisher(mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Publisher {
    let settings = KafkaSettings {
        brokers: mock.bootstrap_servers(),
        topic_prefix: "mock.".into(),
        properties: crate::config::parse_properties("message.timeout.ms=1500").unwrap(),
        partitions: 2,
        replication_factor: 1,
    };
    let topic = settings.topics().deltas;
    mock.create_topic(&topic, 2, 1).unwrap();
    mock.partition_leader(&topic, 0, Some(2)).unwrap();
    mock.partition_leader(&topic, 1, Some(1)).unwrap();
    Publisher::new(&settings).await.unwrap()
}

/// Takes outcomes until `done` holds or one is a refusal (returned).
async fn take_until(p: &mut Publisher, done: impl Fn(&Publisher) -> bool) -> Option<CaptureError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(p) {
        assert!(tokio::time::Instant::now() < deadline, "no outcome in time");
        let _ = tokio::time::timeout(Duration::from_millis(100), p.delivered()).await;
        if let Err(e) = p.take_deliveries() {
            return Some(e);
        }
    }
    None
}

/// Transaction A's delta is refused (its partition's leader is down, the record times out)
/// after transaction B's, sent later to another partition, was acknowledged: the flush
/// position passes neither, and the refusal names A's table and position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_later_acknowledgements_holds_the_flush_position() {
    let mock = MockCluster::new(2).unwrap();
    let mut p = publisher(&mock).await;
    mock.broker_down(2).unwrap();
    p.restart(10);
    let a = p.begin();
    p.send(&delta(100, 10), Some(0), a).await.unwrap();
    p.committed(a, 150);
    let b = p.begin();
    // B is large: its fragments all count.
    p.set_fragment_bytes(4096);
    p.send(&delta(200, 20_000), Some(1), b).await.unwrap();
    p.committed(b, 250);
    assert_eq!(p.tracker().in_flight(), 1 + 5);

    let refused = take_until(&mut p, |p| p.tracker().in_flight() == 1).await;
    assert!(refused.is_none(), "B is acknowledged before A is refused: {refused:?}");
    assert_eq!(p.tracker().flushed(), 10, "B is acknowledged, A is not: nothing moves");

    let refused = take_until(&mut p, |_| false).await.expect("A is refused");
    let text = refused.to_string();
    assert!(text.contains("public.blobs") && text.contains("0/64") && text.contains("partition 0"), "{text}");
    assert_eq!(p.tracker().flushed(), 10, "a refused transaction is never passed");
    assert!(p.tracker().tracks(a));
}

/// A record above the producer's `message.max.bytes` is refused before it is sent; the
/// error names the table and the transaction, and the settings to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_names_its_table_and_the_settings() {
    let mock = MockCluster::new(2).unwrap();
    let mut p = publisher(&mock).await;
    p.restart(10);
    p.set_fragment_bytes(2_000_000);
    let a = p.begin();
    let e = p.send(&delta(300, 1_500_000), Some(1), a).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("public.blobs") && text.contains("0/12C") && text.contains("--fragment-bytes"), "{text}");
    assert_eq!(p.tracker().flushed(), 10);
}

/// Capture names every record's partition itself ([`partition_of`]); it is the partition
/// librdkafka's default partitioner picks for the same key, so rows stay where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_are_the_ones_librdkafka_picks_by_default() {
    use rdkafka::producer::{BaseProducer, BaseRecord};
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic("keys", 7, 1).unwrap();
    let producer: BaseProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).create().unwrap();
    let keys: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            crate::contract::delta_kafka_key(
                "public.t",
                &[Column { name: "id".into(), type_name: "int8".into(), value: Value::Long(i), unchanged: false }],
            )
        })
        .collect();
    for key in &keys {
        producer.send(BaseRecord::<[u8], [u8]>::to("keys").key(key).payload(b"x")).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "check")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    rdkafka::consumer::Consumer::subscribe(&consumer, &["keys"]).unwrap();
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen < keys.len() {
        assert!(std::time::Instant::now() < deadline, "read {seen} of {} records", keys.len());
        let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = m.unwrap();
        let key = rdkafka::Message::key(&m).unwrap();
        assert_eq!(rdkafka::Message::partition(&m), partition_of(key, 7), "key {:?}", String::from_utf8_lossy(key));
        seen += 1;
    }
}
