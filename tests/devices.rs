//! Devices: replay from offsets and times, and partial subscriptions, on real parts.

use std::collections::BTreeMap;
use std::time::Duration;

use pgfanout::kafka::{self, ClientRole};
use pgfanout::test_support::{wait_for, Pipeline, TIMEOUT};
use pgfanout::verify;
use pgfanout::workload::Workload;
use rdkafka::consumer::BaseConsumer;

#[path = "devices/consistent.rs"]
mod consistent;
#[path = "devices/ddl.rs"]
mod ddl;
#[path = "devices/fidelity.rs"]
mod fidelity;

async fn replay(p: &Pipeline, device: &str, from: &str) -> u64 {
    let store = p.store(device).to_string_lossy().into_owned();
    let out = p.run_cli(&["replay", "--device", device, "--store", &store, "--from", from]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let n = stdout.split_whitespace().nth(1).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("no count in {stdout:?}"))
}

fn checksums(p: &Pipeline, device: &str, tables: &[pgfanout::pg::TableInfo]) -> Vec<verify::Summary> {
    let conn = verify::open_store_read_only(&p.store(device)).unwrap();
    tables.iter().map(|t| verify::summarize(&verify::device_rows(&conn, t).unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_moves_a_store_backwards_and_starts_where_asked() {
    let mut p = Pipeline::new("replay").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let mut workload = Workload::new(4, "device-a");
    p.submit_and_wait(&workload.instructions(400)).await;
    p.wait_converged(&["a"]).await;
    p.wait_deltas_settled().await;
    let records_before = p.delta_records();
    let applied_before = p.store_counter("a", "applied");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    p.submit_and_wait(&workload.instructions(300)).await;
    p.wait_converged(&["a"]).await;
    p.wait_deltas_settled().await;
    p.stop("device-a");
    let tables = p.tables().await;
    let before = checksums(&p, "a", &tables);
    let total = p.delta_records();
    let applied = p.store_counter("a", "applied");
    let rows_after_since = applied - applied_before;

    // From the beginning: every record again, nothing changes.
    let processed_before = p.store_counter("a", "processed");
    let replayed = replay(&p, "a", "beginning").await;
    assert!(replayed as i64 >= total, "replayed {replayed} of {total}");
    assert_eq!(p.store_counter("a", "processed") - processed_before, replayed as i64);
    assert_eq!(p.store_counter("a", "applied"), applied, "no delta is newer than what the store holds");
    assert_eq!(checksums(&p, "a", &tables), before, "the store did not move");

    // From a time: only what came after it.
    let replayed = replay(&p, "a", &format!("time:{since}")).await as i64;
    assert!(replayed >= rows_after_since, "replayed {replayed}, but {rows_after_since} row deltas came after {since}");
    // Capture keeps publishing watermarks while the replays run: count up to now.
    let after_since = p.delta_records() - records_before;
    assert!(replayed <= after_since, "replayed {replayed}, more than the {after_since} records after {since}");
    assert_eq!(checksums(&p, "a", &tables), before);

    // A store changed behind the device's back is repaired by a replay.
    {
        let conn = rusqlite::Connection::open(p.store("a")).unwrap();
        conn.execute("DELETE FROM \"public.items\"", []).unwrap();
    }
    replay(&p, "a", "beginning").await;
    assert_eq!(p.device_rows("a").await, p.postgres_rows().await, "the replay restored every row");

    // The device resumes where the replay ended.
    p.start_device("a", &[]);
    p.submit_and_wait(&workload.instructions(50)).await;
    p.wait_converged(&["a"]).await;
}

/// The store's positions (`pgfanout status`), read while the device may run.
fn stored_positions(p: &Pipeline, device: &str) -> BTreeMap<i32, i64> {
    let status = pgfanout::device::status::status_blocking(&p.kafka, &p.store(device)).unwrap();
    status.partitions.iter().map(|s| (s.partition, s.next_offset)).collect()
}

/// The offsets a consumer group has committed on the deltas topic.
fn committed_positions(p: &Pipeline, group_id: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = kafka::client_config(&p.kafka, ClientRole::UncommittedConsumer { group_id }).create().unwrap();
    let committed = kafka::committed_offsets(&consumer, &p.kafka.topics().deltas, p.kafka.partitions, Duration::from_secs(10));
    committed.unwrap().into_iter().collect()
}

/// A device's own Kafka properties reach every client it makes, the first ones included
/// (the registration check, the topic's bounds): with shared properties that cannot reach
/// the broker (TLS to a plain listener) and its own that can, a device starts and
/// converges, and a replay and a rebuild of its store run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_own_kafka_properties_serve_every_client_it_makes() {
    let mut p = Pipeline::new("devprops").await;
    p.start_executor();
    p.start_capture().await;
    let own = ["--kafka-properties", "security.protocol=ssl", "--device-kafka-properties", "security.protocol=plaintext"];
    p.start_device("a", &own);
    p.submit_and_wait(&Workload::new(4, "device-a").instructions(100)).await;
    p.wait_converged(&["a"]).await;
    p.stop("device-a");
    let store = p.store("a").to_string_lossy().into_owned();
    for command in
        [&["replay", "--device", "a", "--store", &store, "--from", "beginning"][..], &["rebuild", "--id", "a", "--store", &store]]
    {
        let out = p.run_cli(&[command, &own[..]].concat()).await;
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(p.device_rows("a").await, p.postgres_rows().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reports_its_positions_to_its_consumer_group() {
    let mut p = Pipeline::new("positions").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let mut workload = Workload::new(6, "device-a");
    p.submit_and_wait(&workload.instructions(200)).await;
    p.wait_converged(&["a"]).await;
    // The group's offsets follow the store's, a second or so behind, and never pass them.
    let stored = stored_positions(&p, "a");
    assert!(stored.values().all(|offset| *offset > 0), "every partition has a stored position: {stored:?}");
    let reported = wait_for("the device's positions reported", TIMEOUT, || async {
        let committed = committed_positions(&p, "pgfanout-device-a");
        stored.iter().all(|(partition, offset)| committed.get(partition).is_some_and(|c| c >= offset)).then_some(committed)
    })
    .await;
    let later = stored_positions(&p, "a");
    for (partition, offset) in &reported {
        assert!(offset <= &later[partition], "partition {partition}: reported {offset}, stored {}", later[partition]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_can_keep_a_subset_of_tables() {
    let mut p = Pipeline::new("partial").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("b", &["--tables", "public.items"]);
    let mut workload = Workload::new(5, "device-b");
    p.submit_and_wait(&workload.instructions(400)).await;
    p.wait_deltas_settled().await;
    let expected = p.postgres_rows().await;
    assert!(!expected["public.sites"].is_empty());
    wait_for("the device to keep its tables", TIMEOUT, || async {
        (p.device_rows("b").await.get("public.items") == expected.get("public.items")).then_some(())
    })
    .await;
    let conn = verify::open_store_read_only(&p.store("b")).unwrap();
    let sites: i64 = conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'public.sites'", [], |r| r.get(0)).unwrap();
    assert_eq!(sites, 0, "no table for what the device does not keep");
    // Skipped deltas still move its offsets and its watermark.
    let records = p.delta_records();
    wait_for("every record to be processed", TIMEOUT, || async { (p.store_counter("b", "processed") >= records).then_some(()) })
        .await;
    assert!(p.store_counter("b", "not_subscribed") > 0);
    let out = p
        .run_cli(&[
            "submit",
            "--op",
            "upsert",
            "--table",
            "public.sites",
            "--key",
            "code=\"x\"",
            "--value",
            "city=\"Cork\"",
            "--wait",
            "all-devices",
            "--devices",
            "b",
            "--timeout-secs",
            "30",
        ])
        .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_swaps_in_a_store_equal_to_postgres() {
    let mut p = Pipeline::new("rebuild").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let mut workload = Workload::new(6, "device-a");
    p.submit_and_wait(&workload.instructions(500)).await;
    p.wait_converged(&["a"]).await;
    let store = p.store("a").to_string_lossy().into_owned();

    // The running device owns its store: a rebuild refuses to touch it.
    let out = p.run_cli(&["rebuild", "--id", "a", "--store", &store]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"), "{}", String::from_utf8_lossy(&out.stderr));

    // Watermarks keep arriving while other databases write WAL: the device is caught up
    // when a status shows no lag.
    let mut last = String::new();
    for _ in 0..50 {
        let status = p.run_cli(&["status", "--store", &store]).await;
        assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
        last = String::from_utf8_lossy(&status.stdout).into_owned();
        if last.contains("lag 0 records") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(last.contains("lag 0 records"), "{last}");

    p.stop("device-a");
    {
        let conn = rusqlite::Connection::open(p.store("a")).unwrap();
        conn.execute("DELETE FROM \"public.sites\"", []).unwrap();
        conn.execute("UPDATE \"public.items\" SET qty = -1", []).unwrap();
    }
    assert_ne!(p.device_rows("a").await, p.postgres_rows().await);
    let out = p.run_cli(&["rebuild", "--id", "a", "--store", &store]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("rebuilt"));
    assert_eq!(p.device_rows("a").await, p.postgres_rows().await, "the rebuilt store equals PostgreSQL");
    assert!(!p.store("a").with_extension("sqlite.rebuild").exists());

    // The device carries on from the rebuilt store's positions.
    p.start_device("a", &[]);
    p.submit_and_wait(&workload.instructions(50)).await;
    p.wait_converged(&["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_during_fifty_thousand_changes_catches_up() {
    let mut p = Pipeline::new("offline").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let mut workload = Workload::new(7, "device-a");
    p.submit_and_wait(&workload.instructions(200)).await;
    p.wait_converged(&["a"]).await;
    p.stop("device-a");
    let processed_before = p.store_counter("a", "processed");
    let records_before = p.delta_records();
    for _ in 0..5 {
        p.submit_and_wait(&workload.instructions(9_200)).await;
    }
    p.wait_deltas_settled().await;
    let missed = p.delta_records() - records_before;
    assert!(missed >= 50_000, "{missed} records while the device was offline");
    p.start_device("a", &[]);
    p.wait_converged(&["a"]).await;
    assert!(p.store_counter("a", "processed") - processed_before >= missed);
}

#[path = "devices/large_rows.rs"]
mod large_rows;
