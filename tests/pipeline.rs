//! The full path on real parts: instructions → executor → PostgreSQL → WAL → capture →
//! Kafka → devices' SQLite stores, including crashes of a device and of capture.

use std::collections::HashMap;

use pgfanout::contract::{Field, Instruction, Operation, OperationKind, ResultStatus, Value};
use pgfanout::test_support::{logged_count, wait_for, Deadline, Pipeline, TIMEOUT};
use pgfanout::workload::{self, Workload};

const DEVICES: [&str; 3] = ["a", "b", "c"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_instructions_reach_three_devices_row_by_row() {
    let mut p = Pipeline::new("full_path").await;
    p.start_executor();
    p.start_capture().await;
    for d in DEVICES {
        p.start_device(d, &[]);
    }
    let instructions = Workload::new(1, "device-a").instructions(1000);
    let (ops, tables) = workload::mix(&instructions);
    assert_eq!(ops.len(), 4, "the workload mixes insert, update, upsert and delete");
    assert_eq!(tables.len(), 2);

    let results = p.submit_and_wait(&instructions).await;
    assert_eq!(results.len(), 1000);
    let committed = results.values().filter(|r| r.status == ResultStatus::Committed).count();
    assert_eq!(
        committed,
        1000,
        "every sample instruction is valid: {:?}",
        results.values().find(|r| r.status != ResultStatus::Committed)
    );
    assert!(results.values().all(|r| r.commit_lsn.is_some()));

    p.wait_converged(&DEVICES).await;
    let expected = p.postgres_rows().await;
    assert!(expected.values().map(|rows| rows.len()).sum::<usize>() > 300, "the workload leaves rows behind");
    for d in DEVICES {
        assert_eq!(p.device_rows(d).await, expected, "device {d} equals PostgreSQL row by row");
    }
    let client = p.client().await;
    let logged: i64 = logged_count(&client).await;
    assert_eq!(logged, 1000);
    for d in DEVICES {
        p.stop(&format!("device-{d}"));
    }
    p.stop("capture");
    p.stop("executor");
}

fn insert_item(id: i64, qty: i64) -> Instruction {
    Instruction {
        instruction_id: uuid::Uuid::new_v4().to_string(),
        issued_by: "device-a".into(),
        issued_at: pgfanout::contract::now_micros(),
        operations: vec![Operation {
            op: OperationKind::Insert,
            table: "public.items".into(),
            key: vec![Field { name: "id".into(), value: Value::Long(id) }],
            values: vec![
                Field { name: "name".into(), value: Value::String("once".into()) },
                Field { name: "qty".into(), value: Value::Long(qty) },
            ],
            expect: vec![],
        }],
        target: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_instruction_twice_changes_postgres_once_with_identical_results() {
    let mut p = Pipeline::new("twice").await;
    p.start_executor();
    let instruction = insert_item(42, 7);
    let first = p.submit_and_wait(std::slice::from_ref(&instruction)).await;
    let first = &first[&instruction.instruction_id];
    assert_eq!(first.status, ResultStatus::Committed, "{first:?}");
    assert_eq!(first.rows_affected, 1);

    // Delivered again (a producer retry, a replay): an insert executed twice would fail
    // with a duplicate key and produce a different result.
    let second = p.submit_and_wait(std::slice::from_ref(&instruction)).await;
    assert_eq!(&second[&instruction.instruction_id], first, "the stored result is re-published unchanged");

    // Twice in one batch as well.
    let other = insert_item(43, 1);
    let batch = p.submit_and_wait(&[other.clone(), other.clone()]).await;
    assert_eq!(batch[&other.instruction_id].status, ResultStatus::Committed);

    let client = p.client().await;
    let rows: i64 = client.query_one("SELECT count(*) FROM public.items WHERE id IN (42, 43)", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2);
    let logged: i64 = logged_count(&client).await;
    assert_eq!(logged, 2);
    p.stop("executor");
}

/// The executor runs consecutive single-row upserts of one shape as one statement; each
/// delta must still name the instruction that wrote its row, also when a key repeats
/// within the batch or other instructions sit in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delta_names_the_instruction_that_wrote_it() {
    let mut p = Pipeline::new("correlation").await;
    p.start_capture().await;
    let upsert = |id: i64, qty: i64| {
        let mut i = insert_item(id, qty);
        i.operations[0].op = OperationKind::Upsert;
        i
    };
    let mut instructions: Vec<Instruction> = (0..40).map(|n| upsert(n, n)).collect();
    instructions.push(upsert(3, 100)); // the same key again in the same batch
    instructions.push(insert_item(1000, 1));
    let mut two = upsert(1001, 1);
    two.operations.push(upsert(1002, 2).operations.remove(0));
    instructions.push(two);
    instructions.extend((40..60).map(|n| upsert(n, n)));
    // Everything is in the topic before the executor starts, so that it arrives in few batches.
    let watcher = p.watch_results().await;
    p.submit(&instructions).await;
    p.start_executor();
    let results = p.await_results(watcher, &instructions).await;
    assert!(results.values().all(|r| r.status == ResultStatus::Committed), "{results:?}");

    let wrote: HashMap<&str, Vec<i64>> = instructions
        .iter()
        .map(|i| {
            let keys = i.operations.iter().filter_map(|o| match o.key[0].value {
                Value::Long(id) => Some(id),
                _ => None,
            });
            (i.instruction_id.as_str(), keys.collect())
        })
        .collect();
    let deadline = Deadline::after(TIMEOUT, "a delta per row written").polling_every(std::time::Duration::from_millis(200));
    let deltas = loop {
        use pgfanout::contract::DeltaOp::{Delete, Insert, Update};
        let deltas: Vec<_> = deltas_in_kafka(&p)
            .into_iter()
            .filter(|d| d.table == "public.items" && matches!(d.op, Insert | Update | Delete))
            .collect();
        if deltas.len() >= 64 || deadline.passed() {
            break deltas;
        }
        deadline.sleep().await;
    };
    assert_eq!(deltas.len(), 64, "one delta per row written");
    let mut seen = std::collections::HashSet::new();
    for d in &deltas {
        let id = d.instruction_id.as_deref().unwrap_or_else(|| panic!("a delta without its instruction: {d:?}"));
        let Value::Long(key) = d.key[0].value else { panic!("key {:?}", d.key) };
        assert!(wrote.get(id).is_some_and(|keys| keys.contains(&key)), "row {key} tagged with {id}, which did not write it");
        seen.insert(id);
    }
    assert_eq!(seen.len(), instructions.len(), "every instruction's deltas are tagged with it");
    p.stop("capture");
    p.stop("executor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_killed_mid_stream_converges_applying_each_delta_once() {
    let mut p = Pipeline::new("device_kill").await;
    p.start_executor();
    p.start_capture().await;
    // One delta per SQLite transaction: the kill lands between and inside many of them.
    let device_args = ["--batch-size", "1"];
    let mut workload = Workload::new(2, "device-a");
    let mut kills_behind_the_stream = 0;
    let seed = pgfanout::contract::now_micros() as u64;
    let mut rng = pgfanout::workload::Rng::new(seed);
    eprintln!("device kill points seeded with {seed}");
    for _ in 0..5 {
        // A backlog builds up while the device is down...
        p.submit_and_wait(&workload.instructions(200)).await;
        p.wait_deltas_settled().await;
        // ...and the device is killed as soon as it has started on it.
        let before = p.store_counter("a", "processed");
        p.start_device("a", &device_args);
        let deadline = Deadline::after(TIMEOUT, "the device to make progress").polling_every(std::time::Duration::from_millis(1));
        while p.store_counter("a", "processed") == before {
            deadline.pause().await;
        }
        // ...at a random point of its backlog.
        tokio::time::sleep(std::time::Duration::from_millis(rng.below(40))).await;
        p.kill("device-a");
        if p.store_counter("a", "processed") < p.delta_records() {
            kills_behind_the_stream += 1;
        }
    }
    assert!(kills_behind_the_stream > 0, "at least one kill hit the device in the middle of its backlog");
    p.start_device("a", &device_args);
    p.wait_converged(&["a"]).await;

    // Every record of the topic was applied exactly once: none twice after a restart, none
    // skipped. (Capture ran throughout, so the topic holds no duplicate; it stops now so
    // that no new watermark arrives while counting.)
    p.stop("capture");
    let records = p.delta_records();
    wait_for("the device to process every record", TIMEOUT, || async {
        (p.store_counter("a", "processed") == records).then_some(())
    })
    .await;
    let (applied, watermarks, tombstones) =
        (p.store_counter("a", "applied"), p.store_counter("a", "watermarks"), p.store_counter("a", "tombstones"));
    assert!(tombstones > 0, "deletes are followed by Kafka tombstones");
    // The initial snapshot truncates each of the two tables on every partition: the copies
    // after the first change nothing. Nothing else may be seen twice.
    let repeated_truncates = 2 * (i64::from(p.kafka.partitions) - 1);
    assert_eq!(p.store_counter("a", "skipped"), repeated_truncates, "no delta was seen twice");
    assert_eq!(applied + watermarks + tombstones + repeated_truncates, records, "each delta applied once");
    assert_eq!(p.store_counter("a", "rejected"), 0);
    p.stop("device-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_killed_and_restarted_loses_no_change() {
    let mut p = Pipeline::new("capture_kill").await;
    p.start_executor();
    p.start_capture().await;
    for d in DEVICES {
        p.start_device(d, &[]);
    }
    let mut workload = Workload::new(3, "device-a");
    let client = p.client().await;
    for round in 0..2 {
        // Killed while the executor is committing and capture is publishing.
        let watcher = p.watch_results().await;
        let chunk = workload.instructions(500);
        let seen = p.delta_records();
        p.submit(&chunk).await;
        wait_for("capture to publish deltas", TIMEOUT, || async { (p.delta_records() > seen).then_some(()) }).await;
        p.kill("capture");
        p.await_results(watcher, &chunk).await;
        // Changes committed while capture is down, also straight through SQL.
        client
            .batch_execute(&format!(
                "INSERT INTO public.sites (code, city) SELECT 'direct-{round}-' || g, 'Lyon' FROM generate_series(1, 50) g"
            ))
            .await
            .unwrap();
        p.start_capture().await;
    }
    p.submit_and_wait(&workload.instructions(200)).await;
    p.wait_converged(&DEVICES).await;

    let expected = p.postgres_rows().await;
    let direct = expected["public.sites"].keys().filter(|k| k.contains("direct-")).count();
    assert_eq!(direct, 100);
    for d in DEVICES {
        assert_eq!(p.device_rows(d).await, expected, "device {d}");
    }
    for d in DEVICES {
        p.stop(&format!("device-{d}"));
    }
    p.stop("capture");
    p.stop("executor");
}

/// Random small transactions straight through SQL (updates, deletes, inserts on `items`)
/// until `stop` is set; returns how many ran.
fn write_meanwhile(p: &Pipeline, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let conninfo = p.postgres.conninfo.clone();
    tokio::spawn(async move {
        let client = pgfanout::pg::connect(&conninfo).await.unwrap();
        let mut rng = workload::Rng::new(11);
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 1 + rng.below(ROWS_BEFORE_CAPTURE) as i64;
            let sql = match rng.below(3) {
                0 => format!("UPDATE public.items SET qty = qty + 1, name = 'changed' WHERE id = {id}"),
                1 => format!("DELETE FROM public.items WHERE id = {id}"),
                _ => format!(
                    "INSERT INTO public.items (id, name, qty) VALUES ({}, 'new', 1) ON CONFLICT (id) DO UPDATE SET qty = 0",
                    id + 1_000_000
                ),
            };
            client.batch_execute(&sql).await.unwrap();
            n += 1;
        }
        n
    })
}

const ROWS_BEFORE_CAPTURE: u64 = 100_000;

async fn fill_items(p: &Pipeline, rows: u64) {
    p.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO public.items (id, name, qty, price, tags)
             SELECT g, 'item ' || g, g % 100, g / 100.0, jsonb_build_object('g', g) FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
}

async fn snapshot_state(p: &Pipeline) -> Option<(bool, i64)> {
    let row = p
        .client()
        .await
        .query_opt("SELECT finished_at IS NOT NULL, rows FROM pgfanout.capture_snapshots WHERE slot = $1", &[&p.name])
        .await
        .unwrap();
    row.map(|r| (r.get(0), r.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_existed_before_capture_and_changes_during_the_snapshot_reach_devices() {
    let mut p = Pipeline::new("snapshot").await;
    fill_items(&p, ROWS_BEFORE_CAPTURE).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = write_meanwhile(&p, stop.clone());
    p.start_device("a", &[]);
    // Returns once capture streams, i.e. after the snapshot; the writer runs throughout.
    p.start_capture().await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 50, "changes were committed during the snapshot: {writes}");
    p.wait_converged(&["a"]).await;
    let (finished, rows) = snapshot_state(&p).await.expect("the snapshot is recorded");
    assert!(finished);
    assert!(rows > (ROWS_BEFORE_CAPTURE as i64) * 9 / 10, "the snapshot copied the table: {rows} rows");
    p.stop("device-a");
    p.stop("capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_interrupted_by_a_crash_is_taken_again_without_losing_deletes() {
    let mut p = Pipeline::new("snapshot_kill").await;
    fill_items(&p, 3 * ROWS_BEFORE_CAPTURE).await;
    p.start("capture", &["capture"]);
    wait_for("the snapshot to publish rows", TIMEOUT, || async { (p.delta_records() > 1000).then_some(()) }).await;
    p.kill("capture");
    assert_eq!(snapshot_state(&p).await.map(|s| s.0), Some(false), "capture was killed during the snapshot");
    // Rows the first attempt already published are deleted and changed while capture is
    // down: the second snapshot no longer holds them, the slot's stream does.
    p.client()
        .await
        .batch_execute(
            "DELETE FROM public.items WHERE id <= 500;
             UPDATE public.items SET name = 'after the crash' WHERE id BETWEEN 501 AND 1000;",
        )
        .await
        .unwrap();
    p.start_capture().await;
    p.start_device("a", &[]);
    p.wait_converged(&["a"]).await;
    assert_eq!(snapshot_state(&p).await.map(|s| s.0), Some(true));
    p.stop("device-a");
    p.stop("capture");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_misconfigurations_say_what_to_change() {
    let mut p = Pipeline::new("misconfig").await;
    let log = |p: &Pipeline, label: &str| std::fs::read_to_string(p.dir.join(format!("{label}.log"))).unwrap_or_default();

    let out = p.run_cli(&["capture", "--publication", "no_such_publication"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CREATE PUBLICATION"), "{stderr}");

    let client = p.client().await;
    let role = format!("{}_norepl", p.name);
    client.batch_execute(&format!("CREATE ROLE {role} LOGIN")).await.unwrap();
    let conninfo = p.postgres.conninfo.replace("user=postgres", &format!("user={role}"));
    let out = p.run_cli(&["capture", "--postgres", &conninfo]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("WITH REPLICATION"), "{stderr}");

    // A second capture on the same slot says why it waits, and takes over when the first
    // one is gone.
    p.start_capture().await;
    p.start("capture-b", &["capture"]);
    wait_for("the second capture to explain itself", TIMEOUT, || async {
        log(&p, "capture-b").contains("in use by another process").then_some(())
    })
    .await;
    p.assert_running("capture-b");
    p.kill("capture");
    wait_for("the second capture to take over", TIMEOUT, || async {
        log(&p, "capture-b").contains("streaming changes").then_some(())
    })
    .await;
    p.stop("capture-b");
}

/// The deltas in the deltas topic, from the beginning (tombstones left out).
fn deltas_in_kafka(p: &Pipeline) -> Vec<pgfanout::contract::Delta> {
    p.delta_topic_records()
        .iter()
        .filter_map(|r| r.payload.as_deref())
        .map(|payload| pgfanout::contract::codec::decode_delta(payload).unwrap())
        .collect()
}

/// Ids of the rows of `items` with an insert delta in the deltas topic.
fn inserted_ids_in_kafka(p: &Pipeline) -> std::collections::HashSet<i64> {
    deltas_in_kafka(p)
        .into_iter()
        .filter(|d| d.table == "public.items" && d.op == pgfanout::contract::DeltaOp::Insert)
        .filter_map(|d| match d.key.first().map(|c| &c.value) {
            Some(Value::Long(id)) => Some(*id),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_killed_five_times_during_200k_changes_loses_none() {
    let seed = std::env::var("PGFANOUT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("seed {seed} (PGFANOUT_TEST_SEED replays it)");
    let mut rng = workload::Rng::new(seed);
    let mut p = Pipeline::new("capture_kill_200k").await;
    p.start_capture().await;
    p.start_device("a", &[]);
    // 200,000 changes: 100,000 inserts in 50 transactions, then 100,000 updates in 50.
    let conninfo = p.postgres.conninfo.clone();
    let writer = tokio::spawn(async move {
        let client = pgfanout::pg::connect(&conninfo).await.unwrap();
        for k in 0..50 {
            client
                .batch_execute(&format!(
                    "INSERT INTO public.items (id, name, qty) SELECT g, 'item ' || g, 0 FROM generate_series({}, {}) g",
                    k * 2000 + 1,
                    k * 2000 + 2000
                ))
                .await
                .unwrap();
        }
        for k in 0..50 {
            client
                .batch_execute(&format!(
                    "UPDATE public.items SET qty = qty + 1 WHERE id BETWEEN {} AND {}",
                    k * 2000 + 1,
                    k * 2000 + 2000
                ))
                .await
                .unwrap();
        }
    });
    writer.await.unwrap();
    // Capture streams the backlog for a few seconds: each kill lands at a random point of
    // it, and the next capture resumes from what Kafka acknowledged.
    let end = p.wal_position().await;
    let mut during_stream = 0;
    for _ in 0..5 {
        tokio::time::sleep(std::time::Duration::from_millis(50 + rng.below(350))).await;
        during_stream += u32::from(p.slot_flushed().await < end);
        p.kill("capture");
        tokio::time::sleep(std::time::Duration::from_millis(rng.below(300))).await;
        p.start_capture().await;
    }
    println!("{during_stream} of 5 kills while capture was behind the stream");
    assert!(during_stream >= 3, "most kills landed inside the stream: {during_stream}");
    p.wait_converged(&["a"]).await;
    let ids = inserted_ids_in_kafka(&p);
    let missing: Vec<i64> = (1..=100_000).filter(|id| !ids.contains(id)).take(10).collect();
    assert!(missing.is_empty(), "inserts missing from Kafka, e.g. {missing:?}");
    p.stop("device-a");
    p.stop("capture");
}

/// The SQL blocks of the operations guide's "Least-privilege roles" section.
fn least_privilege_sql() -> Vec<String> {
    let guide = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md")).unwrap();
    let section = guide.split("### Least-privilege roles").nth(1).unwrap().split("\n### ").next().unwrap();
    section.split("```sql").skip(1).map(|block| block.split("```").next().unwrap().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_least_privilege_roles_run_the_pipeline_and_no_secret_is_shown() {
    let mut p = Pipeline::new("least_privilege").await;
    let blocks = least_privilege_sql();
    assert_eq!(blocks.len(), 2, "the guide has the superuser's and the setup role's grants");
    let admin = p.client().await;
    // The schema is set up by the setup role here, not by the test's superuser.
    admin.batch_execute("DROP SCHEMA pgfanout CASCADE").await.unwrap();
    // A password no log line or metric may show.
    const SECRET: &str = "pw-7c1d9e4b";
    admin
        .batch_execute(&blocks[0].replace("'…'", &format!("'{SECRET}'")).replace(" app ", &format!(" {} ", p.name)))
        .await
        .unwrap();
    // A table the executor's role may write but that is outside the allowed set.
    admin
        .batch_execute(
            "CREATE TABLE public.outside (id bigint PRIMARY KEY, note text); GRANT ALL ON public.outside TO pgfanout_executor",
        )
        .await
        .unwrap();
    let conninfo = p.postgres.conninfo.clone();
    let as_role = |role: &str| conninfo.replace("user=postgres", &format!("user={role} password={SECRET}"));
    let out = p.run_cli(&["setup", "--postgres", &as_role("pgfanout_setup")]).await;
    assert!(out.status.success(), "setup as pgfanout_setup: {}", String::from_utf8_lossy(&out.stderr));
    let setup = pgfanout::pg::connect(&as_role("pgfanout_setup")).await.unwrap();
    setup.batch_execute(&blocks[1]).await.unwrap();

    let metrics: Vec<String> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()).collect();
    p.start("executor", &["executor", "--postgres", &as_role("pgfanout_executor"), "--metrics-addr", &metrics[0]]);
    p.start_capture_with(&["--postgres", &as_role("pgfanout_capture"), "--metrics-addr", &metrics[1]]).await;
    p.start_device("a", &[]);
    let results = p.submit_and_wait(&Workload::new(5, "device-a").instructions(300)).await;
    let refused: Vec<_> = results.values().filter(|r| r.status != ResultStatus::Committed).take(3).collect();
    assert!(refused.is_empty(), "every instruction committed under the executor's role: {refused:?}");
    let mut outside = insert_item(1, 1);
    outside.operations[0].table = "public.outside".into();
    let results = p.submit_and_wait(std::slice::from_ref(&outside)).await;
    let r = &results[&outside.instruction_id];
    assert_eq!((r.status, r.error_code.as_deref()), (ResultStatus::Rejected, Some("PGF01")), "outside the allowed set");
    p.wait_converged(&["a"]).await;
    let out = p.run_cli(&["verify", "--postgres", &as_role("pgfanout_capture"), "--store", p.store("a").to_str().unwrap()]).await;
    assert!(out.status.success(), "verify as capture's role: {}", String::from_utf8_lossy(&out.stdout));
    // A failing connection's error names the server, not the password.
    let unreachable = format!("host=127.0.0.1 port=1 user=pgfanout_capture password={SECRET} dbname=app");
    let out = p.run_cli(&["setup", "--postgres", &unreachable]).await;
    assert!(!out.status.success());
    let mut shown = String::from_utf8_lossy(&out.stderr).into_owned();
    for addr in &metrics {
        shown.push_str(&metrics_text(addr));
    }
    p.stop("device-a");
    p.stop("capture");
    p.stop("executor");
    for entry in std::fs::read_dir(&p.dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            shown.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    assert!(shown.len() > 1000, "the logs and metrics were read");
    assert!(!shown.contains(SECRET), "a password appears in a log or a metric");
}

/// The text of a Prometheus endpoint.
fn metrics_text(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}
