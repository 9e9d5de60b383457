//! The fleet benchmark (run by `bench/run fleet`, which starts PostgreSQL and the broker,
//! creates `items` with publication `pgfanout` and runs `pgfanout setup`).
//!
//! Executor, capture and the confirmation service run as processes of the release binary.
//! For each fleet size N (`BENCH_FLEET_SIZES`, default `3,16,64`), N registered devices, each
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
//! Per size also: the slowest device's lag each second of the load (now − submit time of
//! the oldest instruction it has not acknowledged), at the end and its growth over the last
//! 30 s; CPU seconds per 1,000 instructions of the broker, of all devices together and of
//! PostgreSQL (the postmaster and all its children, those that exited included), from the
//! load's start until the last confirmation; the bytes one device's consumer received
//! (librdkafka's statistics) per change; and, after 30 s without traffic, one device's
//! resident memory and CPU.
//!
//! Between sizes, the previous fleet's devices are stopped and retired, so that every
//! confirmation of a phase waits for exactly N devices (checked). Topics are trimmed as in
//! the end-to-end benchmark (`pgfanout::test_support::bench::flow`), the confirmation
//! service's readers by its checkpoint.
//!
//! Then the anchor ([`native`]): capture and the confirmation service stop, and for each N
//! the same load runs with N `pg_recvlogical` on N slots of their own instead, as N native
//! subscribers would; PostgreSQL's CPU per 1,000 instructions against pgfanout's with N
//! devices is `pg_cpu_ratio_native_vs_pgfanout_N`.

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
use pgfanout::test_support::bench::usage::{cpu_seconds, pid_in, postgres_cpu_seconds};
use pgfanout::test_support::bench::{env, kafka_settings, retire_device, start, start_device, upsert_item, Process};
use pgfanout::test_support::http::{free_addr, http_get};
use pgfanout::test_support::process::rss_mb;

#[path = "fleet/native.rs"]
mod native;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

fn sizes() -> Vec<usize> {
    let sizes = std::env::var("BENCH_FLEET_SIZES").unwrap_or_else(|_| "3,16,64".into());
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

/// Starts `n` devices (the first serving metrics at `metrics`) and follows results,
/// acknowledgements and confirmations until every device has applied a first hundred
/// instructions.
fn start_fleet(dir: &Path, settings: &KafkaSettings, n: usize, metrics: &str, stop: &Arc<AtomicBool>) -> (Fleet, Vec<Process>) {
    let devices: Vec<String> = (1..=n).map(|i| format!("n{n}-{i}")).collect();
    let processes = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let store = dir.join(format!("{d}.sqlite"));
            let mut args = vec!["--store", store.to_str().unwrap(), "--ack-interval-ms", "1"];
            if i == 0 {
                args.extend(["--metrics-addr", metrics]);
            }
            start_device(dir, d, &args)
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
        producer: bench_producer(settings),
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

/// The benchmark's producer of instructions. Not idempotent: the local broker now and then
/// answers out of sequence, which an idempotent producer takes as fatal (RELIABILITY.md,
/// broker faults); the pipeline's components replace such a producer, and the executor
/// deduplicates by id anyway.
fn bench_producer(settings: &KafkaSettings) -> Producer_ {
    kafka::client_config(settings, ClientRole::Producer).set("enable.idempotence", "false").create().unwrap()
}

/// The processes whose CPU the benchmark counts.
struct Machine {
    broker: u32,
    postmaster: u32,
}

impl Machine {
    /// The broker and PostgreSQL that `bench/run` started in `dir`.
    fn of(dir: &Path) -> Machine {
        Machine { broker: pid_in(&dir.join("broker/broker.pid")), postmaster: pid_in(&dir.join("pg/postmaster.pid")) }
    }
}

/// CPU seconds of the broker, of a set of devices together and of PostgreSQL.
#[derive(Clone, Copy)]
struct Cpu {
    broker: f64,
    devices: f64,
    postgres: f64,
}

impl Cpu {
    fn now(machine: &Machine, devices: &[Process]) -> Cpu {
        Cpu {
            broker: cpu_seconds(machine.broker, false),
            devices: devices.iter().map(|d| cpu_seconds(d.0.id(), false)).sum(),
            postgres: postgres_cpu_seconds(machine.postmaster),
        }
    }

    /// What was used since `before`, per 1,000 of `instructions`.
    fn per_thousand_since(self, before: Cpu, instructions: usize) -> Cpu {
        let k = instructions as f64 / 1000.0;
        Cpu {
            broker: (self.broker - before.broker) / k,
            devices: (self.devices - before.devices) / k,
            postgres: (self.postgres - before.postgres) / k,
        }
    }
}

/// What one fleet size measured.
struct Figures {
    n: usize,
    /// Submit → confirmation read, p50 and p99 (ms).
    latency: [f64; 2],
    /// Last device's apply → confirmation read, p99 (ms).
    after_apply: f64,
    /// The slowest device's lag at the end of the load, and its growth over the last 30 s (ms).
    lag: [f64; 2],
    /// Per 1,000 instructions.
    cpu: Cpu,
    /// Bytes one device's consumer received per change.
    bytes_per_change: f64,
    /// One device after 30 s without traffic: resident memory (MB) and CPU (% of a core).
    idle: [f64; 2],
}

/// The slowest device's lag each second from `from` to `to` (µs): at each moment, the age
/// of the oldest submitted instruction whose commit LSN a device had not acknowledged yet.
fn lag_series(fleet: &Fleet, from: i64, to: i64) -> Vec<f64> {
    // Instructions in commit order, each with the earliest submit time from it on.
    let mut order: Vec<(i64, i64)> = fleet.lsns.iter().filter_map(|(id, lsn)| Some((*lsn, *fleet.submitted.get(id)?))).collect();
    order.sort_unstable();
    let mut oldest_from = vec![i64::MAX; order.len() + 1];
    for i in (0..order.len()).rev() {
        oldest_from[i] = oldest_from[i + 1].min(order[i].1);
    }
    (0..)
        .map(|s| from + s * 1_000_000)
        .take_while(|t| *t <= to)
        .map(|t| {
            let lag = fleet.acks.values().map(|history| {
                let applied = history.partition_point(|(_, at)| *at <= t).checked_sub(1).map_or(i64::MIN, |i| history[i].0);
                let oldest = oldest_from[order.partition_point(|(lsn, _)| *lsn <= applied)];
                if oldest <= t {
                    t - oldest
                } else {
                    0
                }
            });
            lag.max().unwrap_or(0) as f64 / 1e3
        })
        .collect()
}

/// The lag at the end and its growth over the last 30 s (ms), each the mean of five
/// one-second samples.
fn lag_figures(series: &[f64]) -> [f64; 2] {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len().max(1) as f64;
    let n = series.len();
    let end = mean(&series[n.saturating_sub(5)..]);
    let before = mean(&series[n.saturating_sub(35)..n.saturating_sub(30).max(1).min(n)]);
    [end, end - before]
}

/// The sum of every sample of metric `name` (all its label sets) at `addr`.
fn metric_sum(addr: &str, name: &str) -> f64 {
    let body = http_get(addr, "/metrics").unwrap_or_default();
    let prefix = format!("{name}{{");
    body.lines()
        .filter(|l| l.starts_with(&prefix) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Bytes received and deltas applied by the device serving metrics at `addr`, once its
/// statistics of the last seconds are in.
fn consumed(addr: &str) -> [f64; 2] {
    std::thread::sleep(Duration::from_millis(u64::from(kafka::STATISTICS_INTERVAL_MS) + 1000));
    [metric_sum(addr, "pgfanout_device_kafka_consumed_bytes_total"), metric_sum(addr, "pgfanout_device_deltas_applied_total")]
}

/// One device's resident memory (MB) and CPU (% of a core) over 30 s without traffic.
fn idle_footprint(device: &Process) -> [f64; 2] {
    let pid = device.0.id();
    let before = cpu_seconds(pid, false);
    std::thread::sleep(Duration::from_secs(30));
    [rss_mb(pid), (cpu_seconds(pid, false) - before) / 30.0 * 100.0]
}

/// The fleet of `n` devices at 1,000/s for `duration`.
fn measure(dir: &Path, settings: &KafkaSettings, machine: &Machine, n: usize, duration: Duration) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = free_addr();
    let (mut fleet, processes) = start_fleet(dir, settings, n, &metrics, &stop);
    fleet.submitted.clear();
    let [bytes_before, applied_before] = consumed(&metrics);
    let (cpu_before, started) = (Cpu::now(machine, &processes), now_micros());
    open_loop(&mut fleet, 1000.0, duration);
    let loaded = now_micros();
    settle(&mut fleet, Duration::from_secs(300));
    fleet.drain();
    let ids: Vec<&String> = fleet.submitted.keys().filter(|id| fleet.lsns.contains_key(*id)).collect();
    let cpu = Cpu::now(machine, &processes).per_thousand_since(cpu_before, ids.len());
    for id in &ids {
        let devices = fleet.confirmed[*id].0.devices;
        assert_eq!(devices as usize, n, "instruction {id} confirmed for {devices} devices, not the fleet's {n}");
    }
    let lag = lag_figures(&lag_series(&fleet, started, loaded));
    let [bytes, applied] = consumed(&metrics);
    let bytes_per_change = (bytes - bytes_before) / (applied - applied_before).max(1.0);
    let idle = idle_footprint(&processes[0]);
    let [latency, after_apply] = report(&fleet, &ids, n);
    println!("  slowest device's lag: {:.1} ms at the end, {:+.1} ms over the last 30 s", lag[0], lag[1]);
    println!(
        "  CPU per 1,000 instructions: broker {:.3} s, devices {:.3} s ({:.4} s each), PostgreSQL {:.3} s",
        cpu.broker,
        cpu.devices,
        cpu.devices / n as f64,
        cpu.postgres
    );
    println!("  one device: {bytes_per_change:.0} bytes received per change; idle {:.1} MB, {:.2} % of a core", idle[0], idle[1]);
    stop.store(true, Ordering::Relaxed);
    drop(processes);
    for d in &fleet.devices {
        retire_device(d);
    }
    let latency = [percentile(&latency, 0.5), percentile(&latency, 0.99)];
    Figures { n, latency, after_apply: percentile(&after_apply, 0.99), lag, cpu, bytes_per_change, idle }
}

/// Prints the latencies of instructions `ids` and where they went; returns submit →
/// confirmation and last apply → confirmation, sorted (ms).
fn report(fleet: &Fleet, ids: &[&String], n: usize) -> [Vec<f64>; 2] {
    let read_at = |id: &String| fleet.confirmed[id].1;
    let applied_at = |id: &String| fleet.applied_at(fleet.lsns[id]).expect("applied");
    let latency = sorted_ms(ids.iter().map(|id| read_at(id) - fleet.submitted[*id]));
    let after_apply = sorted_ms(ids.iter().map(|id| read_at(id) - applied_at(id)));
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
        &sorted_ms(ids.iter().map(|id| confirmation(id).last_applied_at.expect("a final's last time") - applied_at(id))),
    );
    show("  confirmation: service → reader", &sorted_ms(ids.iter().map(|id| read_at(id) - confirmation(id).confirmed_at)));
    [latency, after_apply]
}

fn main() {
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    let settings = kafka_settings();
    let machine = Machine::of(&dir);
    let duration = Duration::from_secs(seconds());
    let executor = start(&dir, "executor", &["executor"]);
    let services = [start(&dir, "capture", &["capture"]), start(&dir, "confirm", &["confirm"])];
    let figures: Vec<Figures> = sizes().into_iter().map(|n| measure(&dir, &settings, &machine, n, duration)).collect();
    let hop = broker_hop(&settings, Duration::from_secs(20));
    drop(services);
    let anchor = native::measure(&settings, machine.postmaster, &sizes(), duration);
    drop(executor);
    let mut results: Vec<(String, f64)> = Vec::new();
    for f in &figures {
        let n = f.n;
        results.extend([
            (format!("confirm_p50_ms_{n}"), f.latency[0]),
            (format!("confirm_p99_ms_{n}"), f.latency[1]),
            // As `e2e_overhead_p99_ms`: what is left of last apply → confirmation read when
            // the two broker hops on the way are taken out.
            (format!("confirm_overhead_p99_ms_{n}"), f.after_apply - 2.0 * hop),
            (format!("slowest_lag_end_ms_{n}"), f.lag[0]),
            (format!("slowest_lag_growth_30s_ms_{n}"), f.lag[1]),
            (format!("broker_cpu_s_per_1000_{n}"), f.cpu.broker),
            (format!("devices_cpu_s_per_1000_{n}"), f.cpu.devices),
            (format!("pg_cpu_s_per_1000_{n}"), f.cpu.postgres),
            (format!("device_bytes_per_change_{n}"), f.bytes_per_change),
            (format!("idle_device_rss_mb_{n}"), f.idle[0]),
            (format!("idle_device_cpu_percent_{n}"), f.idle[1]),
        ]);
    }
    if let (Some(first), Some(last)) = (figures.first(), figures.last()) {
        results.push((format!("pg_cpu_ratio_{}_vs_{}", last.n, first.n), last.cpu.postgres / first.cpu.postgres));
    }
    for a in &anchor {
        results.push((format!("native_pg_cpu_s_per_1000_{}", a.n), a.pg_cpu));
        results.push((format!("native_bytes_per_change_{}", a.n), a.bytes_per_change));
        if let Some(f) = figures.iter().find(|f| f.n == a.n) {
            results.push((format!("pg_cpu_ratio_native_vs_pgfanout_{}", a.n), a.pg_cpu / f.cpu.postgres));
            results.push((format!("bytes_ratio_device_vs_native_{}", a.n), f.bytes_per_change / a.bytes_per_change));
        }
    }
    let worst = figures.iter().map(|f| f.after_apply).fold(f64::MIN, f64::max);
    results.push(("confirm_overhead_p99_ms".into(), worst - 2.0 * hop));
    results.push(("broker_hop_p99_ms".into(), hop));
    for (name, value) in results {
        println!("RESULT {name} {value:.3}");
    }
}
