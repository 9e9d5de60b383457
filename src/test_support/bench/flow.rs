//! Records through Kafka for the benchmarks: producing with back-pressure, following a
//! topic on a thread, and trimming what every reader has passed.
//!
//! The local broker's memory storage lists every stored batch of a partition on each fetch
//! that returns records, so its cost per fetch grows with the topic; Kafka's does not (it
//! finds an offset through its index). So that figures do not depend on how long a run has
//! been going, [`trim`] deletes (DeleteRecords), twice a second, the records every reader of
//! a topic has passed, like a retention job. `BENCH_TRIM=0` keeps everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::kafka::{self, ClientRole};

pub type Producer_ = ThreadedProducer<DefaultProducerContext>;

/// Enqueues a record, waiting while the producer's queue is full.
pub fn produce(producer: &Producer_, topic: &str, key: &[u8], payload: &[u8]) {
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
}

/// Next offset per partition of a reader in this process.
pub type Positions = Arc<Mutex<HashMap<i32, i64>>>;

/// Records that the reader behind `positions` has passed `m`.
pub fn passed(positions: &Positions, m: &impl Message) {
    positions.lock().unwrap().insert(m.partition(), m.offset() + 1);
}

/// Follows a topic from its end on a thread, handing each record's payload and timestamp
/// (ms) to `on_record` until `stop`; `positions` follows what it has read.
pub fn follow(
    settings: &KafkaSettings,
    topic: &str,
    stop: Arc<AtomicBool>,
    positions: Positions,
    mut on_record: impl FnMut(&[u8], i64) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let consumer: BaseConsumer = kafka::reader_at(settings, topic, |_, _| Ok(Offset::End)).unwrap().expect("topic exists");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                passed(&positions, &m);
                if let Some(p) = m.payload() {
                    on_record(p, m.timestamp().to_millis().unwrap_or(0));
                }
            }
        }
    })
}

/// One reader of a topic, as the trimmer sees it.
pub enum Reader {
    /// A consumer group's committed offsets.
    Group(String),
    /// A reader in this process.
    Local(Positions),
    /// The confirmation service, by the checkpoint it keeps in PostgreSQL: its connection
    /// string, and the topic's name there (`results`, `device-acks`, `confirmations`).
    Confirm { conninfo: String, name: &'static str },
}

/// Twice a second, deletes from each topic the records every one of its readers has passed
/// (see the module documentation); a partition with a reader whose position is unknown is
/// left alone. Runs until `stop` unless `BENCH_TRIM=0`.
pub fn trim(
    settings: &KafkaSettings,
    topics: Vec<(String, Vec<Reader>)>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    if std::env::var("BENCH_TRIM").is_ok_and(|v| v == "0") {
        return None;
    }
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(settings, ClientRole::Admin).create().unwrap();
    let settings = settings.clone();
    let mut groups: HashMap<String, BaseConsumer> = HashMap::new();
    let mut committed = move |group_id: &str, topic: &str| -> HashMap<i32, i64> {
        let consumer = groups
            .entry(group_id.to_string())
            .or_insert_with(|| kafka::client_config(&settings, ClientRole::UncommittedConsumer { group_id }).create().unwrap());
        kafka::committed_offsets(consumer, topic, settings.partitions, Duration::from_secs(2)).unwrap_or_default()
    };
    Some(std::thread::spawn(move || {
        let mut checkpoints = ConfirmCheckpoints::default();
        let mut trimmed: HashMap<(String, i32), i64> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let mut cuts = TopicPartitionList::new();
            for (topic, readers) in &topics {
                let known: Vec<HashMap<i32, i64>> = readers
                    .iter()
                    .map(|r| match r {
                        Reader::Group(g) => committed(g, topic),
                        Reader::Local(positions) => positions.lock().unwrap().clone(),
                        Reader::Confirm { conninfo, name } => checkpoints.positions(conninfo, name),
                    })
                    .collect();
                for p in known[0].keys() {
                    // Every reader's position, or none when one of them has none yet.
                    let positions: Option<Vec<i64>> = known.iter().map(|k| k.get(p).copied()).collect();
                    let Some(cut) = positions.and_then(|v| v.into_iter().min()) else { continue };
                    let done = trimmed.entry((topic.clone(), *p)).or_insert(0);
                    if cut > *done {
                        cuts.add_partition_offset(topic, *p, Offset::Offset(cut)).unwrap();
                        *done = cut;
                    }
                }
            }
            if cuts.count() > 0 {
                if let Err(e) = block_on(admin.delete_records(&cuts, &AdminOptions::new())) {
                    eprintln!("trimming consumed records: {e}");
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }))
}

/// The confirmation service's checkpoints, read over one connection per database (a
/// connection per read would be PostgreSQL work the benchmarks count).
#[derive(Default)]
struct ConfirmCheckpoints {
    runtime: Option<tokio::runtime::Runtime>,
    clients: HashMap<String, tokio_postgres::Client>,
}

impl ConfirmCheckpoints {
    /// Where the confirmation service resumes reading topic `name` (its checkpoint); empty
    /// when it has none yet or it cannot be read now.
    fn positions(&mut self, conninfo: &str, name: &str) -> HashMap<i32, i64> {
        let runtime =
            self.runtime.get_or_insert_with(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
        if !self.clients.contains_key(conninfo) {
            let Ok(client) = runtime.block_on(crate::pg::connect(conninfo)) else { return HashMap::new() };
            self.clients.insert(conninfo.to_string(), client);
        }
        let client = &self.clients[conninfo];
        let sql = "SELECT partition, next_offset FROM pgfanout.confirm_positions WHERE topic = $1";
        match runtime.block_on(client.query(sql, &[&name])) {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(_) => {
                self.clients.remove(conninfo);
                HashMap::new()
            }
        }
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}
