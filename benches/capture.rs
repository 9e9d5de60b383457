//! The capture benchmark (run by `bench/run capture`, which starts PostgreSQL and the broker
//! and creates table `items` with publication `pgfanout`).
//!
//! In one run, with capture and `pg_recvlogical` each on its own slot and both streaming
//! before the workload starts (200,000 inserts in one transaction, then 200,000 updates in
//! 200 transactions of 1,000 rows):
//! - capture: from the workload's start until its slot's confirmed flush position passes
//!   the end of the workload (it reports a position only once Kafka acknowledged everything
//!   below it; status updates every 10 ms here);
//! - `pg_recvlogical` (pgoutput, same publication): from the workload's start until a
//!   logical message emitted after the workload appears in its output;
//! - the broker's ceiling: a plain producer with capture's producer settings sending the
//!   same records (same keys and values) to a new topic, until all are acknowledged;
//! - capture's CPU time (user + system, all its threads, from `/proc/<pid>/stat`) over the
//!   same streaming interval, per change: less noisy than the rates, which depend on how
//!   the machine's cores are shared at the moment;
//! - capture's peak RSS while a single 1,000,000-row UPDATE streams through;
//! - large rows ([`large`]): five 20 MB rows through capture, and capture's peak RSS with one
//!   100 MB value.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use pgfanout::config::KafkaSettings;
use pgfanout::kafka::{self, ClientRole, TopicSpec};
use pgfanout::test_support::process::peak_rss_mb;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;

mod common;
#[path = "capture/large.rs"]
mod large;

use common::{env, kafka_settings, start, Process};
use pgfanout::test_support::bench::native::{
    current_lsn, drop_slot_when_released, flushed_past, start_recvlogical, wait_streaming,
};
use pgfanout::test_support::bench::usage::cpu_seconds;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHANGES: u64 = 400_000;
const MARKER: &str = "pgfanout-bench-end";

fn start_capture(dir: &Path) -> Process {
    start(dir, "capture", &["capture", "--status-interval-ms", "10"])
}

/// Reads what a growing file gained since the last call and reports whether `needle` has
/// appeared in it.
struct FileWatch {
    file: std::fs::File,
    tail: Vec<u8>,
}

impl FileWatch {
    fn found(&mut self, needle: &[u8]) -> bool {
        let mut chunk = Vec::new();
        self.file.read_to_end(&mut chunk).unwrap();
        self.tail.extend_from_slice(&chunk);
        if self.tail.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = self.tail.len().saturating_sub(needle.len());
        self.tail.drain(..keep);
        false
    }
}

/// Rows `from..=to` of `items`, in one transaction.
async fn insert_items(client: &tokio_postgres::Client, from: u64, to: u64) {
    client
        .batch_execute(&format!(
            "INSERT INTO items (id, name, qty, price, updated_at)
             SELECT g, 'item-' || g, g % 1000, (g % 10000) / 100.0, now() FROM generate_series({from}, {to}) g"
        ))
        .await
        .unwrap();
}

/// The workload; returns the WAL position right after it.
async fn workload(client: &tokio_postgres::Client) -> String {
    insert_items(client, 1, 200_000).await;
    for k in 0..200 {
        client
            .batch_execute(&format!(
                "UPDATE items SET qty = qty + 1, updated_at = now() WHERE id BETWEEN {} AND {}",
                k * 1000 + 1,
                k * 1000 + 1000
            ))
            .await
            .unwrap();
    }
    current_lsn(client).await
}

/// Every record of the deltas topic (key and value), read from the beginning.
fn read_deltas(settings: &KafkaSettings) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let topic = settings.topics().deltas;
    let mut ends = Vec::new();
    let consumer: BaseConsumer = kafka::reader_at(settings, &topic, |c: &BaseConsumer, p| {
        ends.push(c.fetch_watermarks(&topic, p, Duration::from_secs(10))?.1);
        Ok(Offset::Beginning)
    })
    .expect("reader")
    .expect("the deltas topic exists");
    let total: i64 = ends.iter().sum();
    let mut records = Vec::with_capacity(total as usize);
    while (records.len() as i64) < total {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            records.push((m.key().unwrap_or_default().to_vec(), m.payload().map(<[u8]>::to_vec)));
        }
    }
    records
}

/// The broker's ceiling: the records produced again by a plain producer with capture's
/// settings, timed until all are acknowledged. Returns records per second.
async fn raw_produce(settings: &KafkaSettings, records: &[(Vec<u8>, Option<Vec<u8>>)]) -> f64 {
    let topic = format!("{}bench-raw", settings.topic_prefix);
    kafka::ensure_topics(settings, &[TopicSpec { name: &topic, partitions: settings.partitions, config: vec![] }]).await.unwrap();
    let producer: FutureProducer = kafka::client_config(settings, ClientRole::Producer).create().unwrap();
    let mut in_flight = FuturesUnordered::new();
    let started = Instant::now();
    for (key, value) in records {
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(key);
            if let Some(v) = value {
                record = record.payload(v);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    in_flight.next().await.expect("a delivery").expect("delivered").expect("acknowledged");
                }
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        done.expect("delivered").expect("acknowledged");
    }
    records.len() as f64 / started.elapsed().as_secs_f64()
}

/// What the streaming phase measured, in seconds from the workload's start.
struct Streamed {
    workload_secs: f64,
    recv_secs: f64,
    capture_secs: f64,
    /// Capture's CPU time over the same interval.
    capture_cpu_secs: f64,
}

/// Runs the workload with both readers streaming, and times each until it has passed the
/// workload's end.
async fn stream_workload(client: &tokio_postgres::Client, watch: &mut FileWatch, capture_pid: u32) -> Streamed {
    let cpu_before = cpu_seconds(capture_pid, false);
    let started = Instant::now();
    let end = workload(client).await;
    let workload_secs = started.elapsed().as_secs_f64();
    client.batch_execute(&format!("SELECT pg_logical_emit_message(true, '{MARKER}', 'end')")).await.unwrap();
    let (mut recv_secs, mut capture) = (None, None);
    while recv_secs.is_none() || capture.is_none() {
        if recv_secs.is_none() && watch.found(MARKER.as_bytes()) {
            recv_secs = Some(started.elapsed().as_secs_f64());
        }
        if capture.is_none() && flushed_past(client, "pgfanout", &end).await {
            capture = Some((started.elapsed().as_secs_f64(), cpu_seconds(capture_pid, false) - cpu_before));
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the workload did not get through");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (capture_secs, capture_cpu_secs) = capture.unwrap();
    Streamed { workload_secs, recv_secs: recv_secs.unwrap(), capture_secs, capture_cpu_secs }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    let conninfo = env("PGFANOUT_POSTGRES");
    let settings = kafka_settings();
    let client = pgfanout::pg::connect(&conninfo).await.unwrap();

    let capture = start_capture(&dir);
    wait_streaming(&client, "pgfanout").await;
    let output = dir.join("recvlogical.out");
    let recv = start_recvlogical(&client, &conninfo, "bench_recv", &output).await;
    let mut watch = FileWatch { file: std::fs::File::open(&output).unwrap(), tail: Vec::new() };
    watch.file.seek(SeekFrom::End(0)).unwrap();

    let streamed = stream_workload(&client, &mut watch, capture.0.id()).await;
    drop(recv);
    drop_slot_when_released(&client, "bench_recv").await;
    let Streamed { workload_secs, recv_secs, capture_secs, capture_cpu_secs } = streamed;

    let records = read_deltas(&settings);
    let raw_rate = raw_produce(&settings, &records).await;

    // Peak memory while one 1,000,000-row UPDATE streams through a freshly started capture.
    insert_items(&client, 200_001, 1_000_000).await;
    let filled = current_lsn(&client).await;
    while !flushed_past(&client, "pgfanout", &filled).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(capture);
    let capture = start_capture(&dir);
    wait_streaming(&client, "pgfanout").await;
    let big_started = Instant::now();
    client.batch_execute("UPDATE items SET qty = qty + 1").await.unwrap();
    let big_end = current_lsn(&client).await;
    client.batch_execute(&format!("SELECT pg_logical_emit_message(true, '{MARKER}', 'end')")).await.unwrap();
    while !flushed_past(&client, "pgfanout", &big_end).await {
        assert!(big_started.elapsed() < Duration::from_secs(600), "the 1,000,000-row transaction did not get through");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let big_secs = big_started.elapsed().as_secs_f64();
    let rss = peak_rss_mb(capture.0.id());
    drop(capture);
    let large = large::run(&client, &dir).await;

    let changes = CHANGES as f64;
    let capture_rate = changes / capture_secs;
    let recv_rate = changes / recv_secs;
    println!("workload: {workload_secs:.2} s to commit; 1,000,000-row UPDATE through capture in {big_secs:.1} s");
    println!("RESULT capture_events_per_s {capture_rate:.0}");
    println!("RESULT pg_recvlogical_events_per_s {recv_rate:.0}");
    println!("RESULT raw_produce_events_per_s {raw_rate:.0}");
    println!("RESULT capture_vs_pg_recvlogical {:.2}", capture_rate / recv_rate);
    println!("RESULT capture_vs_ceiling {:.2}", capture_rate / recv_rate.min(raw_rate));
    println!("RESULT capture_cpu_us_per_change {:.2}", capture_cpu_secs * 1e6 / changes);
    println!("RESULT capture_peak_rss_mb_1m_row_tx {rss:.0}");
    let mb_20 = 20.0 * large.rows_20mb as f64;
    println!("RESULT capture_20mb_rows_mb_per_s {:.1}", mb_20 / large.secs_20mb);
    println!("RESULT capture_20mb_row_secs {:.2}", large.secs_20mb / large.rows_20mb as f64);
    println!("RESULT capture_peak_rss_mb_100mb_value {:.0}", large.peak_rss_mb_100mb);
    println!("RESULT capture_rss_vs_3x_value_plus_30mb {:.2}", large.peak_rss_mb_100mb / (3.0 * 100.0 + 30.0));
}
