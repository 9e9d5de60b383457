//! The end-to-end benchmark (run by `bench/run e2e`, which starts PostgreSQL and the
//! broker, creates `items` with publication `pgfanout` and runs `pgfanout setup`).
//!
//! Executor, capture and three devices run as processes of the release binary. An
//! instruction is *applied everywhere* when every device's acknowledged watermark (the
//! device-acks topic) has reached the commit LSN in its result. In one run:
//! 1. open-loop latency: single-row upserts at 1,000/s for `BENCH_SECONDS` (60): submit →
//!    result, and submit → applied everywhere;
//! 2. throughput: a burst shows the pipeline's capacity; then the highest rate (starting at
//!    90% of it) that holds for `BENCH_SECONDS` with the backlog not growing over the last
//!    half;
//! 3. a relay chain with the same topology and client settings but no PostgreSQL and no
//!    SQLite: producer → topic → relay (consume, produce) → topic → three consumers;
//! 4. the broker's own hop: producer → consumer at 1,000/s, produce to receipt.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use pgfanout::config::KafkaSettings;
use pgfanout::contract::codec::{decode_device_ack, decode_result, encode_instruction};
use pgfanout::contract::{now_micros, Field, Instruction, Operation, OperationKind, Value};
use pgfanout::kafka::{self, ClientRole, TopicSpec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Offset;

mod common;

use common::{env, kafka_settings, start, Process};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: [&str; 3] = ["a", "b", "c"];

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

type Producer_ = ThreadedProducer<DefaultProducerContext>;

/// Enqueues a record, waiting while the producer's queue is full.
fn produce(producer: &Producer_, topic: &str, key: &[u8], payload: &[u8]) {
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

/// Follows a topic from its end on a thread, handing each record's payload and arrival time
/// to `on_record` until `stop`.
fn follow(
    settings: &KafkaSettings,
    topic: &str,
    stop: Arc<AtomicBool>,
    mut on_record: impl FnMut(&[u8], Instant) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let consumer: BaseConsumer = kafka::reader_at(settings, topic, |_, _| Ok(Offset::End)).unwrap().expect("topic exists");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                if let Some(p) = m.payload() {
                    on_record(p, Instant::now());
                }
            }
        }
    })
}

fn upsert(n: u64) -> (String, Vec<u8>) {
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
    };
    (id, encode_instruction(&instruction).unwrap())
}

/// What the followers saw: results by instruction id, and the fleet's watermark over time
/// (the minimum over the devices of their acknowledged watermarks).
#[derive(Default)]
struct Seen {
    results: HashMap<String, (i64, Instant)>,
    fleet: Vec<(Instant, i64)>,
}

enum Event {
    Result(String, i64, Instant),
    Ack(String, i64, Instant),
}

struct Pipeline {
    settings: KafkaSettings,
    producer: Producer_,
    events: mpsc::Receiver<Event>,
    seen: Seen,
    acks: HashMap<String, i64>,
    submitted: HashMap<String, Instant>,
    counter: u64,
}

impl Pipeline {
    fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Result(id, lsn, at) => {
                    self.seen.results.insert(id, (lsn, at));
                }
                Event::Ack(device, lsn, at) => {
                    let e = self.acks.entry(device).or_insert(lsn);
                    *e = (*e).max(lsn);
                    if self.acks.len() == DEVICES.len() {
                        let min = *self.acks.values().min().unwrap();
                        if self.seen.fleet.last().is_none_or(|(_, last)| min > *last) {
                            self.seen.fleet.push((at, min));
                        }
                    }
                }
            }
        }
    }

    fn fleet_watermark(&self) -> i64 {
        self.seen.fleet.last().map_or(0, |(_, w)| *w)
    }

    /// When the fleet's watermark first reached `lsn`.
    fn applied_at(&self, lsn: i64) -> Option<Instant> {
        let i = self.seen.fleet.partition_point(|(_, w)| *w < lsn);
        self.seen.fleet.get(i).map(|(t, _)| *t)
    }

    fn submit(&mut self) -> String {
        let (id, payload) = upsert(self.counter);
        self.counter += 1;
        let topic = self.settings.topics().instructions;
        self.submitted.insert(id.clone(), Instant::now());
        produce(&self.producer, &topic, b"bench", &payload);
        id
    }

    /// Submits at `rate` per second for `duration`; every second, records how many of the
    /// instructions submitted so far are not applied everywhere yet. Returns the ids and
    /// that backlog.
    fn open_loop(&mut self, rate: f64, duration: Duration) -> (Vec<String>, Vec<usize>) {
        let started = Instant::now();
        let mut ids = Vec::new();
        let mut backlog = Vec::new();
        let mut next_sample = started + Duration::from_secs(1);
        while started.elapsed() < duration {
            let due = (started.elapsed().as_secs_f64() * rate) as usize;
            while ids.len() < due {
                ids.push(self.submit());
            }
            if Instant::now() >= next_sample {
                self.drain();
                let watermark = self.fleet_watermark();
                let applied =
                    ids.iter().filter(|id| self.seen.results.get(*id).is_some_and(|(lsn, _)| *lsn <= watermark)).count();
                backlog.push(ids.len() - applied);
                next_sample += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (ids, backlog)
    }

    /// Waits until every instruction of `ids` has a result and is applied everywhere.
    fn settle(&mut self, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            let watermark = self.fleet_watermark();
            let pending = ids.iter().filter(|id| self.seen.results.get(*id).is_none_or(|(lsn, _)| *lsn > watermark)).count();
            if pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{pending} of {} instructions not applied everywhere", ids.len());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The relay chain's rate: `count` records produced as fast as possible, relayed once, and
/// received by three consumers; records per second until the last consumer has them all.
fn relay_chain(settings: &KafkaSettings, count: u64, payload: &[u8]) -> f64 {
    let (input, output) = (format!("{}relay-in", settings.topic_prefix), format!("{}relay-out", settings.topic_prefix));
    block_on(kafka::ensure_topics(
        settings,
        &[TopicSpec { name: &input, partitions: 3, config: vec![] }, TopicSpec { name: &output, partitions: 3, config: vec![] }],
    ))
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let received: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut threads = Vec::new();
    for (i, counter) in received.iter().enumerate() {
        let counter = counter.clone();
        let consumer: BaseConsumer =
            kafka::client_config(settings, ClientRole::Consumer { group_id: &format!("relay-reader-{i}") }).create().unwrap();
        consumer.subscribe(&[&output]).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(_)) = consumer.poll(Duration::from_millis(50)) {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let relay: BaseConsumer = kafka::client_config(settings, ClientRole::Consumer { group_id: "relay" }).create().unwrap();
    relay.subscribe(&[&input]).unwrap();
    let relay_producer: Producer_ = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
    {
        let (stop, output) = (stop.clone(), output.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = relay.poll(Duration::from_millis(50)) {
                    produce(&relay_producer, &output, m.key().unwrap_or_default(), m.payload().unwrap_or_default());
                }
            }
            relay_producer.flush(Duration::from_secs(10)).unwrap();
        }));
    }
    // Every group has its partitions before the clock starts.
    std::thread::sleep(Duration::from_secs(8));
    let producer: Producer_ = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
    let started = Instant::now();
    for n in 0..count {
        produce(&producer, &input, &n.to_le_bytes(), payload);
    }
    while received.iter().any(|c| c.load(Ordering::Relaxed) < count) {
        assert!(started.elapsed() < Duration::from_secs(600), "the relay chain did not deliver everything");
        std::thread::sleep(Duration::from_millis(2));
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().for_each(|t| t.join().unwrap());
    rate
}

/// The broker's hop: records at 1,000/s, each carrying its send time; p99 of produce to
/// receipt, in milliseconds.
fn broker_hop(settings: &KafkaSettings, duration: Duration) -> f64 {
    let topic = format!("{}hop", settings.topic_prefix);
    block_on(kafka::ensure_topics(settings, &[TopicSpec { name: &topic, partitions: 3, config: vec![] }])).unwrap();
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let reader = follow(settings, &topic, stop.clone(), move |p, at| {
        let sent = u64::from_le_bytes(p[..8].try_into().unwrap());
        let _ = tx.send(at.duration_since(origin).as_nanos() as u64 - sent);
    });
    let producer: Producer_ = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
    // Warm up: the producer has its metadata and connections, the reader its positions.
    for n in 0..2000u64 {
        produce(&producer, &topic, &n.to_le_bytes(), &(origin.elapsed().as_nanos() as u64).to_le_bytes());
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    while rx.try_recv().is_ok() {}
    let started = Instant::now();
    let mut sent = 0u64;
    let mut payload = vec![0u8; 200];
    while started.elapsed() < duration {
        while sent < (started.elapsed().as_secs_f64() * 1000.0) as u64 {
            payload[..8].copy_from_slice(&(origin.elapsed().as_nanos() as u64).to_le_bytes());
            produce(&producer, &topic, &sent.to_le_bytes(), &payload);
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (latencies.len() as u64) < sent && Instant::now() < deadline {
        if let Ok(ns) = rx.recv_timeout(Duration::from_millis(100)) {
            latencies.push(ns as f64 / 1e6);
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    assert_eq!(latencies.len() as u64, sent, "every hop record arrived");
    latencies.sort_by(f64::total_cmp);
    percentile(&latencies, 0.99)
}

fn main() {
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    let settings = kafka_settings();
    let duration = Duration::from_secs(seconds());

    let _executor = start(&dir, "executor", &["executor"]);
    let _capture = start(&dir, "capture", &["capture"]);
    let _devices: Vec<Process> = DEVICES
        .iter()
        .map(|d| {
            let store = dir.join(format!("device-{d}.sqlite"));
            start(
                &dir,
                &format!("device-{d}"),
                &["device", "--id", d, "--store", store.to_str().unwrap(), "--ack-interval-ms", "10"],
            )
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, events) = mpsc::channel();
    let results_tx = tx.clone();
    let results = follow(&settings, &settings.topics().results, stop.clone(), move |p, at| {
        if let Ok(r) = decode_result(p) {
            let _ = results_tx.send(Event::Result(r.instruction_id, r.commit_lsn.unwrap_or(i64::MAX), at));
        }
    });
    let acks = follow(&settings, &settings.topics().device_acks, stop.clone(), move |p, at| {
        if let Ok(a) = decode_device_ack(p) {
            let _ = tx.send(Event::Ack(a.device_id, a.applied_lsn, at));
        }
    });
    let mut p = Pipeline {
        producer: kafka::client_config(&settings, ClientRole::Producer).create().unwrap(),
        settings: settings.clone(),
        events,
        seen: Seen::default(),
        acks: HashMap::new(),
        submitted: HashMap::new(),
        counter: 0,
    };
    // Warm up: every component is up and every device acknowledges.
    let warm: Vec<String> = (0..100).map(|_| p.submit()).collect();
    p.settle(&warm, Duration::from_secs(120));

    // (1) Open-loop latency at 1,000/s.
    let (ids, _) = p.open_loop(1000.0, duration);
    p.settle(&ids, Duration::from_secs(120));
    let (mut commit, mut e2e) = (Vec::new(), Vec::new());
    for id in &ids {
        let submitted = p.submitted[id];
        let (lsn, result_at) = p.seen.results[id];
        commit.push(ms(result_at - submitted));
        e2e.push(ms(p.applied_at(lsn).expect("applied") - submitted));
    }
    commit.sort_by(f64::total_cmp);
    e2e.sort_by(f64::total_cmp);

    // (2) Throughput: a burst for the capacity, then the highest rate that holds.
    let burst_started = Instant::now();
    let burst: Vec<String> = (0..100_000).map(|_| p.submit()).collect();
    p.settle(&burst, Duration::from_secs(300));
    let capacity = burst.len() as f64 / burst_started.elapsed().as_secs_f64();
    let mut rate = (capacity * 0.9).floor();
    let sustained = loop {
        let (ids, backlog) = p.open_loop(rate, duration);
        p.settle(&ids, Duration::from_secs(300));
        let half = backlog.len() / 2;
        let (early, late) =
            (backlog[..half].iter().max().copied().unwrap_or(0), backlog[half..].iter().max().copied().unwrap_or(0));
        // Bounded: the second half's worst backlog is no worse than the first half's, give
        // or take a second of submissions.
        println!("rate {rate:.0}/s: backlog max {early} (first half), {late} (second half)");
        if late <= early + rate as usize || rate < 100.0 {
            break rate;
        }
        rate = (rate * 0.85).floor();
    };
    stop.store(true, Ordering::Relaxed);
    results.join().unwrap();
    acks.join().unwrap();

    // (3) and (4): the broker with the same client settings.
    let sample = upsert(0).1;
    let relay = relay_chain(&settings, 200_000, &sample);
    let hop_p99 = broker_hop(&settings, Duration::from_secs(20));

    let e2e_p99 = percentile(&e2e, 0.99);
    println!("open loop: {} instructions at 1,000/s; burst capacity {capacity:.0}/s", ids.len());
    println!("RESULT e2e_p50_ms_at_1000 {:.1}", percentile(&e2e, 0.5));
    println!("RESULT e2e_p99_ms_at_1000 {e2e_p99:.1}");
    println!("RESULT commit_p99_ms_at_1000 {:.1}", percentile(&commit, 0.99));
    println!("RESULT broker_hop_p99_ms {hop_p99:.1}");
    println!("RESULT e2e_overhead_p99_ms {:.1}", e2e_p99 - 2.0 * hop_p99);
    println!("RESULT e2e_sustained_instructions_per_s {sustained:.0}");
    println!("RESULT relay_sustained_per_s {relay:.0}");
    println!("RESULT e2e_vs_relay {:.2}", sustained / relay);
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}
