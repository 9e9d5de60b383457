//! The device benchmark (run by `bench/run device`, which starts PostgreSQL and the broker,
//! runs the 400,000-change `items` workload through capture, then this program).
//!
//! In one run: (a) a device applying the whole deltas topic into an empty store; (b) a
//! plain consumer reading the same topic, with librdkafka's default prefetch settings and
//! with the device's; (c) plain rusqlite upserting the same row images
//! in batches of the device's size; (d) the device's decode-and-apply path fed the same
//! encoded deltas from memory; (e) a rebuild of a store from the topic.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgfanout::config::KafkaSettings;
use pgfanout::contract::codec::{decode_delta, decode_delta_view};
use pgfanout::contract::{DeltaOp, Value};
use pgfanout::device::rebuild::rebuild_blocking;
use pgfanout::device::replay::{replay_blocking, ReplayFrom, ReplaySettings};
use pgfanout::device::store::{Record, Store};
use pgfanout::device::DeviceSettings;
use pgfanout::kafka;
use pgfanout::shutdown::Shutdown;
use pgfanout::test_support::bench::{env, kafka_settings};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::Offset;

/// The same allocator as the `pgfanout` binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 2000;

/// A consumed record: partition, offset and value (none for a tombstone).
type RawRecord = (i32, i64, Option<Vec<u8>>);

fn remove_store(path: &Path) {
    for suffix in ["", "-wal", "-shm", ".lock", ".rebuild", ".rebuild.lock"] {
        let mut f = path.as_os_str().to_owned();
        f.push(suffix);
        let _ = std::fs::remove_file(f);
    }
}

/// (b): every record of the deltas topic, read by a plain consumer; returns the payloads.
fn raw_consume(kafka: &KafkaSettings) -> (Vec<RawRecord>, f64) {
    let topic = kafka.topics().deltas;
    let mut ends = Vec::new();
    let started = Instant::now();
    let consumer: BaseConsumer = kafka::reader_at(kafka, &topic, |c: &BaseConsumer, p| {
        ends.push((p, c.fetch_watermarks(&topic, p, Duration::from_secs(10))?.1));
        Ok(Offset::Beginning)
    })
    .expect("reader")
    .expect("the deltas topic exists");
    let total: i64 = ends.iter().map(|(_, e)| e).sum();
    let mut records = Vec::with_capacity(total as usize);
    while (records.len() as i64) < total {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            records.push((m.partition(), m.offset(), m.payload().map(<[u8]>::to_vec)));
        }
    }
    (records, started.elapsed().as_secs_f64())
}

/// (c): the row images of the deltas, upserted with plain rusqlite in batches.
fn sqlite_raw(rows: &[(i64, String, i64, String, String)], path: &Path) -> f64 {
    remove_store(path);
    let mut conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.execute_batch("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price TEXT, updated_at TEXT)")
        .unwrap();
    let started = Instant::now();
    for chunk in rows.chunks(BATCH) {
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO items (id, name, qty, price, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty, price = excluded.price, updated_at = excluded.updated_at",
                )
                .unwrap();
            for (id, name, qty, price, at) in chunk {
                stmt.execute(rusqlite::params![id, name, qty, price, at]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// (d): decodes the records and applies them to a new store from memory, as the device
/// does; returns the seconds it took.
fn apply_core(records: &[RawRecord], core_path: &Path) -> f64 {
    remove_store(core_path);
    let mut store = Store::open(core_path).unwrap();
    let started = Instant::now();
    for chunk in records.chunks(BATCH) {
        let batch: Vec<Record> = chunk
            .iter()
            .map(|(p, o, payload)| Record {
                partition: *p,
                offset: *o,
                delta: match payload {
                    Some(b) => decode_delta_view(b).map(Some).map_err(|e| e.to_string()),
                    None => Ok(None),
                },
                tombstone: payload.is_none(),
                fragment: None,
                encoded: payload.as_deref(),
            })
            .collect();
        store.apply_batch("bench", &batch).unwrap();
    }
    started.elapsed().as_secs_f64()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn main() {
    let kafka = kafka_settings();
    let dir = PathBuf::from(env("PGFANOUT_BENCH_DIR"));
    // (b) with librdkafka's own prefetch settings (a full 64 MB queue pauses fetching for
    // a second), as the ceiling was measured before devices set their own; then with the
    // device's.
    let mut defaults = kafka.clone();
    defaults
        .properties
        .0
        .extend([("queued.max.messages.kbytes", "65536"), ("fetch.queue.backoff.ms", "1000")].map(|(k, v)| (k.into(), v.into())));
    let (_, default_secs) = raw_consume(&defaults);
    let (records, raw_secs) = raw_consume(&kafka);
    let n = records.len() as f64;

    // The row images, for (c).
    let mut rows = Vec::new();
    for (_, _, payload) in &records {
        let Some(p) = payload else { continue };
        let d = decode_delta(p).unwrap();
        if matches!(d.op, DeltaOp::Insert | DeltaOp::Update) {
            let after = d.after.unwrap();
            let get = |name: &str| after.iter().find(|c| c.name == name).map(|c| c.value.clone()).unwrap_or(Value::Null);
            let (Value::Long(id), Value::Long(qty)) = (get("id"), get("qty")) else {
                panic!("items rows have ids and quantities")
            };
            rows.push((id, text(&get("name")), qty, text(&get("price")), text(&get("updated_at"))));
        }
    }
    let sqlite_secs = sqlite_raw(&rows, &dir.join("raw.sqlite"));

    // (d): decode and apply from memory, as the device does.
    let core_secs = apply_core(&records, &dir.join("core.sqlite"));

    // (a): a device applying the whole topic into an empty store.
    let device = DeviceSettings {
        id: "bench".into(),
        store: dir.join("device.sqlite"),
        batch_size: BATCH as u32,
        tables: None,
        ack_interval_ms: 100,
        key: None,
        key_file: None,
        hold_mib: pgfanout::device::store::DEFAULT_HOLD_MIB,
        kafka_properties: Default::default(),
    };
    remove_store(&device.store);
    let (_, shutdown) = Shutdown::new();
    let started = Instant::now();
    let report =
        replay_blocking(&kafka, &ReplaySettings { device: device.clone(), from: ReplayFrom::Beginning }, shutdown.clone())
            .unwrap();
    let device_secs = started.elapsed().as_secs_f64();
    assert_eq!(report.processed as usize, records.len());

    // (e): rebuild the same store from the topic.
    let started = Instant::now();
    rebuild_blocking(&kafka, &device, shutdown).unwrap();
    let rebuild_secs = started.elapsed().as_secs_f64();

    let device_rate = n / device_secs;
    let raw_rate = n / raw_secs;
    let default_rate = n / default_secs;
    let sqlite_rate = rows.len() as f64 / sqlite_secs;
    let core_rate = n / core_secs;
    println!("records {} (row images {})", records.len(), rows.len());
    println!("RESULT device_apply_deltas_per_s {device_rate:.0}");
    println!("RESULT raw_consume_default_prefetch_per_s {default_rate:.0}");
    println!("RESULT raw_consume_per_s {raw_rate:.0}");
    println!("RESULT sqlite_raw_upserts_per_s {sqlite_rate:.0}");
    println!("RESULT device_vs_ceiling {:.2}", device_rate / default_rate.min(sqlite_rate));
    println!("RESULT device_vs_own_consumer {:.2}", device_rate / raw_rate.min(sqlite_rate));
    println!("RESULT apply_core_deltas_per_s {core_rate:.0}");
    println!("RESULT apply_core_vs_sqlite_raw {:.2}", core_rate / sqlite_rate);
    println!("RESULT rebuild_{}k_seconds {rebuild_secs:.1}", records.len() / 1000);
}
