//! The fleet benchmark (run by `bench/run fleet`, which starts PostgreSQL and the broker,
//! creates `items` with publication `pgfanout` and runs `pgfanout setup`).
//!
//! Executor, capture and the confirmation service run as processes of the release binary.
//! For each fleet size N (`BENCH_FLEET_SIZES`, default `3,16`), N registered devices, each
//! a process with its own store, apply single-row upserts submitted at 1,000/s for
//! `BENCH_SECONDS` (60). Per instruction:
//! - *confirmation latency*: submit → its final `applied` confirmation read from the
//!   confirmations topic;
//! - *after the last apply*: that read − the last device's apply. A device stamps each
//!   acknowledgement (`at`) when it publishes it, at most a millisecond after the apply
//!   (`--ack-interval-ms 1`), on the machine's one clock. This spans the acknowledgement's
//!   hop to the service, its decision and the confirmation's hop back; the broker's own hop
//!   is measured too, and `confirm_overhead_p99_ms` is the worst p99 of this less two hops
//!   (as `e2e_overhead_p99_ms` in the end-to-end benchmark). Inside the service, the
//!   confirmation is decided in the same step that reads the last acknowledgement needed.
//!
//! Between sizes, the previous fleet's devices are stopped and retired, so that every
//! confirmation of a phase waits for exactly N devices (checked). Topics are trimmed as in
//! the end-to-end benchmark (`pgfanout::test_support::bench::flow`), the confirmation
//! service's readers by its checkpoint.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use pgfanout::config::KafkaSettings;
use pgfanout::confirm::positions::{ACKS, RESULTS};
use pgfanout::contract::codec::{decode_confirmation, decode_device_ack, decode_result};
use pgfanout::contract::{now_micros, Confirmation, ConfirmationStatus, ResultStatus};
use pgfanout::kafka::{self, ClientRole};
use pgfanout::test_support::bench::flow::{follow, produce, trim, Positions, Producer_, Reader};
use pgfanout::test_support::bench::measure::{
    applied_everywhere_at, broker_hop, open_loop, percentile, settle, sorted_ms, Chain,
};
use pgfanout::test_support::bench::{env, kafka_settings, retire_device, start, start_device, upsert_item, Process};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

fn sizes() -> Vec<usize> {
    let sizes = std::env::var("BENCH_FLEET_SIZES").unwrap_or_else(|_| "3,16".into());
    sizes.split(',').map(|n| n.trim().parse().expect("BENCH_FLEET_SIZES: numbers, comma separated")).collect()
}

enum Event {
    /// An instruction's result: its commit LSN when committed.
    Result {
        id: String,
        lsn: Option<i64>,
    },
    Ack {
        device: String,
        lsn: i64,
        at: i64,
    },
    /// A final confirmation, and when the benchmark read it (µs).
    Applied {
        confirmation: Confirmation,
        read_at: i64,
    },
}

/// One fleet's phase, seen from a submitter.
struct Fleet {
    devices: Vec<String>,
    producer: Producer_,
    topic: String,
    events: mpsc::Receiver<Event>,
    submitted: HashMap<String, i64>,
    lsns: HashMap<String, i64>,
    /// Per device of this fleet, every rise of its acknowledged watermark: (LSN, when, µs).
    acks: HashMap<String, Vec<(i64, i64)>>,
    confirmed: HashMap<String, (Confirmation, i64)>,
    /// Submitted and not yet confirmed (or rejected), in submit order.
    outstanding: VecDeque<String>,
    rejected: HashSet<String>,
    counter: u64,
}

impl Fleet {
    fn drain(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Result { id, lsn: Some(lsn) } => {
                    self.lsns.insert(id, lsn);
                }
                Event::Result { id, lsn: None } => {
                    self.rejected.insert(id);
                }
                Event::Ack { device, lsn, at } => {
                    if let Some(history) = self.acks.get_mut(&device) {
                        if history.last().is_none_or(|(last, _)| lsn > *last) {
                            history.push((lsn, at));
                        }
                    }
                }
                Event::Applied { confirmation, read_at } => {
                    self.confirmed.insert(confirmation.instruction_id.clone(), (confirmation, read_at));
                }
            }
        }
    }

    /// When the last device of the fleet acknowledged `lsn` (µs).
    fn applied_at(&self, lsn: i64) -> Option<i64> {
        applied_everywhere_at(&self.acks, lsn)
    }
}

impl Chain for Fleet {
    fn submit(&mut self) {
        let (id, payload) = upsert_item(self.counter);
        self.counter += 1;
        self.submitted.insert(id.clone(), now_micros());
        produce(&self.producer, &self.topic, b"bench", &payload);
        self.outstanding.push_back(id);
    }

    fn pending(&mut self) -> usize {
        self.drain();
        let (confirmed, rejected) = (&self.confirmed, &self.rejected);
        self.outstanding.retain(|id| !confirmed.contains_key(id) && !rejected.contains(id));
        self.outstanding.len()
    }
}

/// Starts `n` devices and follows results, acknowledgements and confirmations until every
/// device has applied a first hundred instructions.
fn start_fleet(dir: &Path, settings: &KafkaSettings, n: usize, stop: &Arc<AtomicBool>) -> (Fleet, Vec<Process>) {
    let devices: Vec<String> = (1..=n).map(|i| format!("n{n}-{i}")).collect();
    let processes = devices
        .iter()
        .map(|d| {
            let store = dir.join(format!("{d}.sqlite"));
            start_device(dir, d, &["--store", store.to_str().unwrap(), "--ack-interval-ms", "1"])
        })
        .collect();
    let topics = settings.topics();
    let (tx, events) = mpsc::channel();
    let (results_tx, acks_tx) = (tx.clone(), tx.clone());
    let (results_read, acks_read, confirmations_read) = (Positions::default(), Positions::default(), Positions::default());
    follow(settings, &topics.results, stop.clone(), results_read.clone(), move |p, _| {
        if let Ok(r) = decode_result(p) {
            let lsn = r.commit_lsn.filter(|_| r.status == ResultStatus::Committed);
            let _ = results_tx.send(Event::Result { id: r.instruction_id, lsn });
        }
    });
    follow(settings, &topics.device_acks, stop.clone(), acks_read.clone(), move |p, _| {
        if let Ok(a) = decode_device_ack(p) {
            let _ = acks_tx.send(Event::Ack { device: a.device_id, lsn: a.applied_lsn, at: a.at });
        }
    });
    follow(settings, &topics.confirmations, stop.clone(), confirmations_read.clone(), move |p, _| {
        if let Ok(c) = decode_confirmation(p) {
            if c.status == ConfirmationStatus::Applied {
                let _ = tx.send(Event::Applied { confirmation: c, read_at: now_micros() });
            }
        }
    });
    let conninfo = env("PGFANOUT_POSTGRES");
    let confirm = |name| Reader::Confirm { conninfo: conninfo.clone(), name };
    trim(
        settings,
        vec![
            (topics.instructions.clone(), vec![Reader::Group("pgfanout-executor".into())]),
            (topics.deltas.clone(), devices.iter().map(|d| Reader::Group(format!("pgfanout-device-{d}"))).collect()),
            (topics.results.clone(), vec![Reader::Local(results_read), confirm(RESULTS)]),
            (topics.device_acks.clone(), vec![Reader::Local(acks_read), confirm(ACKS)]),
            (topics.confirmations.clone(), vec![Reader::Local(confirmations_read)]),
        ],
        stop.clone(),
    );
    let mut fleet = Fleet {
        acks: devices.iter().map(|d| (d.clone(), Vec::new())).collect(),
        devices,
        // Not idempotent: the local broker now and then answers out of sequence, which an
        // idempotent producer takes as fatal (RELIABILITY.md, broker faults); the pipeline's
        // components replace such a producer, and the executor deduplicates by id anyway.
        producer: kafka::client_config(settings, ClientRole::Producer).set("enable.idempotence", "false").create().unwrap(),
        topic: topics.instructions,
        events,
        submitted: HashMap::new(),
        lsns: HashMap::new(),
        confirmed: HashMap::new(),
        outstanding: VecDeque::new(),
        rejected: HashSet::new(),
        counter: 0,
    };
    for _ in 0..100 {
        fleet.submit();
    }
    settle(&mut fleet, Duration::from_secs(300));
    (fleet, processes)
}

/// Confirmation latency at 1,000/s with `n` devices: p99s in milliseconds of submit →
/// confirmation and of last apply → confirmation.
fn measure(dir: &Path, settings: &KafkaSettings, n: usize, duration: Duration) -> [f64; 2] {
    let stop = Arc::new(AtomicBool::new(false));
    let (mut fleet, processes) = start_fleet(dir, settings, n, &stop);
    fleet.submitted.clear();
    open_loop(&mut fleet, 1000.0, duration);
    settle(&mut fleet, Duration::from_secs(300));
    fleet.drain();
    let ids: Vec<&String> = fleet.submitted.keys().filter(|id| fleet.lsns.contains_key(*id)).collect();
    for id in &ids {
        let devices = fleet.confirmed[*id].0.devices;
        assert_eq!(devices as usize, n, "instruction {id} confirmed for {devices} devices, not the fleet's {n}");
    }
    let read_at = |id: &String| fleet.confirmed[id].1;
    let latency = sorted_ms(ids.iter().map(|id| read_at(id) - fleet.submitted[*id]));
    let after_apply = sorted_ms(ids.iter().map(|id| read_at(id) - fleet.applied_at(fleet.lsns[*id]).expect("applied")));
    println!("{n} devices: {} instructions at 1,000/s, {} rejected", ids.len(), fleet.rejected.len());
    let show =
        |label: &str, v: &[f64]| println!("  {label}: p50 {:.1} ms, p99 {:.1} ms", percentile(v, 0.5), percentile(v, 0.99));
    show("submit → confirmation read", &latency);
    show("last device's apply → confirmation read", &after_apply);
    // Where that goes: the acknowledgement's way to the service (its receipt is the
    // confirmation's `last_applied_at`), the service's decision (`confirmed_at` is taken in
    // the step that read that acknowledgement), the confirmation's way to its reader.
    let confirmation = |id: &String| &fleet.confirmed[id].0;
    show(
        "  acknowledgement: device → service",
        &sorted_ms(ids.iter().map(|id| {
            confirmation(id).last_applied_at.expect("a final's last time") - fleet.applied_at(fleet.lsns[*id]).expect("applied")
        })),
    );
    show("  confirmation: service → reader", &sorted_ms(ids.iter().map(|id| read_at(id) - confirmation(id).confirmed_at)));
    stop.store(true, Ordering::Relaxed);
    drop(processes);
    for d in &fleet.devices {
        retire_device(d);
    }
    [percentile(&latency, 0.99), percentile(&after_apply, 0.99)]
}

fn main() {
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    let settings = kafka_settings();
    let duration = Duration::from_secs(seconds());
    let _services =
        [start(&dir, "executor", &["executor"]), start(&dir, "capture", &["capture"]), start(&dir, "confirm", &["confirm"])];
    let mut results: Vec<(String, f64)> = Vec::new();
    let mut after_apply = Vec::new();
    for n in sizes() {
        let [latency, after] = measure(&dir, &settings, n, duration);
        results.push((format!("confirm_p99_ms_{n}"), latency));
        after_apply.push((n, after));
    }
    let hop = broker_hop(&settings, Duration::from_secs(20));
    // As `e2e_overhead_p99_ms`: what is left of last apply → confirmation read when the
    // two broker hops on the way are taken out; the unsuffixed figure is the worst.
    for (n, after) in &after_apply {
        results.push((format!("confirm_overhead_p99_ms_{n}"), after - 2.0 * hop));
    }
    let worst = after_apply.iter().map(|(_, a)| *a).fold(f64::MIN, f64::max);
    results.push(("confirm_overhead_p99_ms".into(), worst - 2.0 * hop));
    results.push(("broker_hop_p99_ms".into(), hop));
    for (name, value) in results {
        println!("RESULT {name} {value:.1}");
    }
}
