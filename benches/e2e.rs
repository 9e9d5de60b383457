//! The end-to-end benchmark (run by `bench/run e2e`, which starts PostgreSQL and the
//! broker, creates `items` with publication `pgfanout` and runs `pgfanout setup`).
//!
//! Executor, capture and three devices run as processes of the release binary. An
//! instruction is *applied everywhere* when every device has acknowledged (device-acks
//! topic) a watermark at or past the commit LSN in its result; the moment is the latest of
//! those acknowledgements' times (`at`, stamped by each device when it publishes, on the
//! same clock as the submitter's; the devices publish at most a millisecond after an
//! apply). In one run:
//! 1. open-loop latency: single-row upserts at 1,000/s for `BENCH_SECONDS` (60): submit →
//!    result received, and submit → applied everywhere;
//! 2. throughput: a burst shows the capacity; then the highest rate, from 90% of it down by
//!    10%, that holds for `BENCH_SECONDS` without the backlog growing over the last half;
//! 3. the same throughput search for a relay chain with the same topology and client
//!    settings but no PostgreSQL and no SQLite: producer → topic → relay (consume,
//!    produce) → topic → three consumer groups;
//! 4. the broker's own hop: producer → consumer at 1,000/s, produce to receipt.
//!
//! `BENCH_E2E_PHASES` (comma separated: latency, throughput, relay, hop; default all) runs
//! a part, for tuning.
//!
//! The local broker's memory storage lists every stored batch of a partition on each fetch
//! that returns records, so its cost per fetch grows with the topic; Kafka's does not (it
//! finds an offset through its index). So that figures do not depend on how long a run has
//! been going, the benchmark deletes (DeleteRecords), twice a second, the records every
//! reader of a topic has passed, like a retention job: consumer groups' committed offsets
//! (the executor's, each device's position report) and the positions of the benchmark's
//! own readers. Both the pipeline and the relay chain run so. `BENCH_TRIM=0` keeps
//! everything. `BENCH_STAGES=1` also follows the deltas topic and splits the time between
//! execution and application into its stages.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use pgfanout::config::KafkaSettings;
use pgfanout::contract::codec::{decode_delta, decode_device_ack, decode_result};
use pgfanout::contract::{now_micros, Delta};
use pgfanout::kafka::{self, ClientRole, TopicSpec};
use pgfanout::test_support::bench::flow::{block_on, follow, passed, produce, trim, Positions, Producer_, Reader};
use pgfanout::test_support::bench::measure::{
    applied_everywhere_at, broker_hop, open_loop, percentile, settle, sorted_ms, sustained, Chain,
};
use pgfanout::test_support::bench::{env, kafka_settings, start, start_device, upsert_item, Process};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: [&str; 3] = ["a", "b", "c"];

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

fn phase(name: &str) -> bool {
    std::env::var("BENCH_E2E_PHASES").map_or(true, |p| p.split(',').any(|p| p.trim() == name))
}

enum Event {
    Result {
        id: String,
        lsn: i64,
        executed_at: i64,
        at: i64,
    },
    Ack {
        device: String,
        lsn: i64,
        at: i64,
    },
    /// An instruction's first delta: its commit time and when capture produced it (µs).
    Delta {
        id: String,
        commit_ts: i64,
        produced_at: i64,
    },
}

/// The pipeline seen from a submitter: instructions in, results and device acks out.
struct Pipeline {
    settings: KafkaSettings,
    producer: Producer_,
    events: mpsc::Receiver<Event>,
    /// Submit time (µs) by instruction id.
    submitted: HashMap<String, i64>,
    /// Result's commit LSN, execution time and arrival (µs) by instruction id.
    results: HashMap<String, (i64, i64, i64)>,
    /// Commit time and capture's produce time (µs) of each instruction's first delta, with
    /// `BENCH_STAGES=1`.
    deltas: HashMap<String, (i64, i64)>,
    /// Per device, every rise of its acknowledged watermark: (LSN, when, µs).
    acks: HashMap<String, Vec<(i64, i64)>>,
    /// Submitted, not yet applied everywhere, in submit order.
    outstanding: VecDeque<String>,
    counter: u64,
    stop: Arc<AtomicBool>,
    _followers: Vec<std::thread::JoinHandle<()>>,
    _processes: Vec<Process>,
}

impl Pipeline {
    fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Result { id, lsn, executed_at, at } => {
                    self.results.insert(id, (lsn, executed_at, at));
                }
                Event::Delta { id, commit_ts, produced_at } => {
                    self.deltas.entry(id).or_insert((commit_ts, produced_at));
                }
                Event::Ack { device, lsn, at } => {
                    let history = self.acks.entry(device).or_default();
                    if history.last().is_none_or(|(last, _)| lsn > *last) {
                        history.push((lsn, at));
                    }
                }
            }
        }
    }

    /// The LSN every device has applied.
    fn fleet_watermark(&self) -> i64 {
        if self.acks.len() < DEVICES.len() {
            return 0;
        }
        self.acks.values().map(|h| h.last().map_or(0, |(lsn, _)| *lsn)).min().unwrap_or(0)
    }

    /// When the last device acknowledged `lsn` (µs).
    fn applied_at(&self, lsn: i64) -> Option<i64> {
        applied_everywhere_at(&self.acks, lsn)
    }

    fn submit_one(&mut self) -> String {
        let (id, payload) = upsert_item(self.counter);
        self.counter += 1;
        let topic = self.settings.topics().instructions;
        self.submitted.insert(id.clone(), now_micros());
        produce(&self.producer, &topic, b"bench", &payload);
        self.outstanding.push_back(id.clone());
        id
    }
}

impl Chain for Pipeline {
    fn submit(&mut self) {
        self.submit_one();
    }

    fn pending(&mut self) -> usize {
        self.drain();
        let watermark = self.fleet_watermark();
        let results = &self.results;
        self.outstanding.retain(|id| results.get(id).is_none_or(|(lsn, _, _)| *lsn > watermark));
        self.outstanding.len()
    }
}

/// The relay chain: the pipeline's topology with plain Kafka clients.
struct Relay {
    producer: Producer_,
    input: String,
    payload: Vec<u8>,
    submitted: u64,
    received: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(settings: &KafkaSettings, payload: Vec<u8>) -> Relay {
        let (input, output) = (format!("{}relay-in", settings.topic_prefix), format!("{}relay-out", settings.topic_prefix));
        block_on(kafka::ensure_topics(
            settings,
            &[
                TopicSpec { name: &input, partitions: 3, config: vec![] },
                TopicSpec { name: &output, partitions: 3, config: vec![] },
            ],
        ))
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut threads = Vec::new();
        let mut output_readers = Vec::new();
        for (i, counter) in received.iter().enumerate() {
            let counter = counter.clone();
            let consumer: BaseConsumer =
                kafka::client_config(settings, ClientRole::Consumer { group_id: &format!("relay-reader-{i}") }).create().unwrap();
            consumer.subscribe(&[&output]).unwrap();
            let stop = stop.clone();
            let positions = Positions::default();
            output_readers.push(Reader::Local(positions.clone()));
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                        passed(&positions, &m);
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let relay: BaseConsumer = kafka::client_config(settings, ClientRole::Consumer { group_id: "relay" }).create().unwrap();
        relay.subscribe(&[&input]).unwrap();
        let relay_producer: Producer_ = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
        let relayed = Positions::default();
        {
            let stop = stop.clone();
            let relayed = relayed.clone();
            let output = output.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(m)) = relay.poll(Duration::from_millis(50)) {
                        produce(&relay_producer, &output, m.key().unwrap_or_default(), m.payload().unwrap_or_default());
                        passed(&relayed, &m);
                    }
                }
                relay_producer.flush(Duration::from_secs(10)).unwrap();
            }));
        }
        threads.extend(trim(
            settings,
            vec![(input.clone(), vec![Reader::Local(relayed)]), (output, output_readers)],
            stop.clone(),
        ));
        let producer = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
        Relay { producer, input, payload, submitted: 0, received, stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.into_iter().for_each(|t| t.join().unwrap());
    }
}

impl Chain for Relay {
    fn submit(&mut self) {
        produce(&self.producer, &self.input, &self.submitted.to_le_bytes(), &self.payload);
        self.submitted += 1;
    }

    fn pending(&mut self) -> usize {
        let through = self.received.iter().map(|c| c.load(Ordering::Relaxed)).min().unwrap_or(0);
        self.submitted.saturating_sub(through) as usize
    }
}

/// Starts executor, capture and three devices, follows results and device acks, and waits
/// until a first hundred instructions are applied everywhere.
fn start_pipeline(dir: &std::path::Path, settings: &KafkaSettings) -> Pipeline {
    let mut processes = vec![start(dir, "executor", &["executor"]), start(dir, "capture", &["capture"])];
    for d in DEVICES {
        let store = dir.join(format!("device-{d}.sqlite"));
        processes.push(start_device(dir, d, &["--store", store.to_str().unwrap(), "--ack-interval-ms", "1"]));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, events) = mpsc::channel();
    let results_tx = tx.clone();
    let results_tx_stages = tx.clone();
    let (results_read, acks_read) = (Positions::default(), Positions::default());
    let topics = settings.topics();
    let mut followers = vec![
        follow(settings, &topics.results, stop.clone(), results_read.clone(), move |p, _| {
            if let Ok(r) = decode_result(p) {
                let lsn = r.commit_lsn.unwrap_or(i64::MAX);
                let (id, executed_at, at) = (r.instruction_id, r.executed_at, now_micros());
                let _ = results_tx.send(Event::Result { id, lsn, executed_at, at });
            }
        }),
        follow(settings, &topics.device_acks, stop.clone(), acks_read.clone(), move |p, _| {
            if let Ok(a) = decode_device_ack(p) {
                let _ = tx.send(Event::Ack { device: a.device_id, lsn: a.applied_lsn, at: a.at });
            }
        }),
    ];
    let mut delta_readers: Vec<Reader> = DEVICES.iter().map(|d| Reader::Group(format!("pgfanout-device-{d}"))).collect();
    if std::env::var("BENCH_STAGES").is_ok_and(|v| v == "1") {
        // Where the time between execution and application goes; one more reader of the
        // deltas topic.
        let read = Positions::default();
        delta_readers.push(Reader::Local(read.clone()));
        let tx = results_tx_stages;
        followers.push(follow(settings, &topics.deltas, stop.clone(), read, move |p, ms| {
            if let Ok(Delta { instruction_id: Some(id), commit_ts, .. }) = decode_delta(p) {
                let _ = tx.send(Event::Delta { id, commit_ts, produced_at: ms * 1000 });
            }
        }));
    }
    followers.extend(trim(
        settings,
        vec![
            (topics.instructions.clone(), vec![Reader::Group("pgfanout-executor".into())]),
            (topics.deltas.clone(), delta_readers),
            (topics.results.clone(), vec![Reader::Local(results_read)]),
            (topics.device_acks.clone(), vec![Reader::Local(acks_read)]),
        ],
        stop.clone(),
    ));
    let mut p = Pipeline {
        producer: kafka::client_config(settings, ClientRole::Producer).create().unwrap(),
        settings: settings.clone(),
        events,
        submitted: HashMap::new(),
        results: HashMap::new(),
        deltas: HashMap::new(),
        acks: HashMap::new(),
        outstanding: VecDeque::new(),
        counter: 0,
        stop,
        _followers: followers,
        _processes: processes,
    };
    for _ in 0..100 {
        p.submit();
    }
    settle(&mut p, Duration::from_secs(120));
    p
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// (1) Open-loop latency at 1,000/s: each stage's p50 and p99, and the RESULT figures.
fn measure_latency(p: &mut Pipeline, duration: Duration, results: &mut Vec<(&str, f64, usize)>) {
    p.submitted.clear();
    open_loop(p, 1000.0, duration);
    settle(p, Duration::from_secs(120));
    let ids: Vec<&String> = p.submitted.keys().collect();
    let result = |id: &String| p.results[id];
    let applied = |id: &String| p.applied_at(result(id).0).expect("applied");
    let e2e = sorted_ms(ids.iter().map(|id| applied(id) - p.submitted[*id]));
    let commit = sorted_ms(ids.iter().map(|id| result(id).2 - p.submitted[*id]));
    println!("open loop: {} instructions at 1,000/s", ids.len());
    let show =
        |label: &str, v: &[f64]| println!("  {label}: p50 {:.1} ms, p99 {:.1} ms", percentile(v, 0.5), percentile(v, 0.99));
    show(
        "submit → executed (instructions hop, executor's poll)",
        &sorted_ms(ids.iter().map(|id| result(id).1 - p.submitted[*id])),
    );
    show(
        "executed → applied everywhere (commit, capture, deltas hop, devices)",
        &sorted_ms(ids.iter().map(|id| applied(id) - result(id).1)),
    );
    if !p.deltas.is_empty() {
        let traced: Vec<(&String, (i64, i64))> = ids.iter().filter_map(|id| p.deltas.get(*id).map(|d| (*id, *d))).collect();
        show(
            "  executed → committed (PostgreSQL's commit time)",
            &sorted_ms(traced.iter().map(|(id, (commit_ts, _))| commit_ts - result(id).1)),
        );
        show(
            "  committed → delta produced (capture; Kafka timestamp, ms)",
            &sorted_ms(traced.iter().map(|(_, (commit_ts, produced_at))| produced_at - commit_ts)),
        );
        show(
            "  delta produced → applied everywhere (deltas hop, devices)",
            &sorted_ms(traced.iter().map(|(id, (_, produced_at))| applied(id) - produced_at)),
        );
    }
    show("submit → result received", &commit);
    show("submit → applied everywhere", &e2e);
    results.push(("e2e_p50_ms_at_1000", percentile(&e2e, 0.5), 1));
    results.push(("e2e_p99_ms_at_1000", percentile(&e2e, 0.99), 1));
    results.push(("commit_p99_ms_at_1000", percentile(&commit, 0.99), 1));
}

fn main() {
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    let settings = kafka_settings();
    let duration = Duration::from_secs(seconds());
    // RESULT lines: name, value, decimals.
    let mut results: Vec<(&str, f64, usize)> = Vec::new();

    if phase("latency") || phase("throughput") {
        let mut p = start_pipeline(&dir, &settings);
        if phase("latency") {
            measure_latency(&mut p, duration, &mut results);
        }
        if phase("throughput") {
            // (2) The pipeline's throughput.
            p.submitted.clear();
            p.results.clear();
            let (capacity, rate) = sustained("pipeline", &mut p, 100_000, duration);
            println!("pipeline: burst capacity {capacity:.0}/s");
            results.push(("e2e_sustained_instructions_per_s", rate, 0));
        }
    }
    if phase("relay") {
        // (3) The relay chain.
        let mut relay = Relay::start(&settings, upsert_item(0).1);
        // Every group has its partitions before the clock starts.
        for _ in 0..1000 {
            relay.submit();
        }
        settle(&mut relay, Duration::from_secs(60));
        let (capacity, rate) = sustained("relay", &mut relay, 200_000, duration);
        relay.stop();
        println!("relay: burst capacity {capacity:.0}/s");
        results.push(("relay_sustained_per_s", rate, 0));
    }
    if phase("hop") {
        // (4) The broker's hop.
        results.push(("broker_hop_p99_ms", broker_hop(&settings, Duration::from_secs(20)), 1));
    }

    let value = |results: &[(&str, f64, usize)], name: &str| results.iter().find(|r| r.0 == name).map(|r| r.1);
    if let (Some(e2e), Some(hop)) = (value(&results, "e2e_p99_ms_at_1000"), value(&results, "broker_hop_p99_ms")) {
        results.push(("e2e_overhead_p99_ms", e2e - 2.0 * hop, 1));
    }
    if let (Some(e2e), Some(relay)) =
        (value(&results, "e2e_sustained_instructions_per_s"), value(&results, "relay_sustained_per_s"))
    {
        results.push(("e2e_vs_relay", e2e / relay, 2));
    }
    // SAFETY: getrusage(2) fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    println!("the benchmark's own CPU time: {} s user, {} s system", usage.ru_utime.tv_sec, usage.ru_stime.tv_sec);
    for (name, value, decimals) in results {
        println!("RESULT {name} {value:.decimals$}");
    }
}
