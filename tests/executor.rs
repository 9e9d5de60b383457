//! The executor on real parts: validation and hostile input, every error class, ordering
//! and scale-out, crashes mid-batch, and `submit --wait all-devices`.

#[path = "executor/admission.rs"]
mod admission;

use std::collections::HashMap;
use std::time::Duration;

use pgfanout::contract::{now_micros, Field, Instruction, Operation, OperationKind, ResultStatus, Value};
use pgfanout::executor::batch::execute_batch;
use pgfanout::executor::catalog::{AllowedTables, Catalog, Statements};
use pgfanout::pg::TableName;
use pgfanout::test_support::{logged_count, wait_for, Deadline, Pipeline, TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

fn field(name: &str, value: Value) -> Field {
    Field { name: name.into(), value }
}

fn op(kind: OperationKind, table: &str, key: Vec<Field>, values: Vec<Field>) -> Operation {
    Operation { op: kind, table: table.into(), key, values, expect: vec![] }
}

fn instruction(issued_by: &str, operations: Vec<Operation>) -> Instruction {
    Instruction {
        instruction_id: uuid::Uuid::new_v4().to_string(),
        issued_by: issued_by.into(),
        issued_at: now_micros(),
        operations,
        target: None,
    }
}

fn insert_item(id: i64, name: Value, qty: Value) -> Instruction {
    instruction(
        "t",
        vec![op(
            OperationKind::Insert,
            "public.items",
            vec![field("id", Value::Long(id))],
            vec![field("name", name), field("qty", qty)],
        )],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_and_values_are_rejected_or_stored_verbatim() {
    let p = Pipeline::new("hostile").await;
    let client = p.client().await;
    let mut catalog = Catalog::new(AllowedTables::Publication(p.postgres.publication.clone()));
    let mut statements = Statements::default();
    let text = |s: &str| Value::String(s.to_string());
    let big = "x".repeat(10 * 1024 * 1024);
    let hostile_values = [
        "'); DROP TABLE public.items; --",
        "\"; DELETE FROM public.items; --",
        "/* comment */ -- another",
        "$1::text; SELECT pg_sleep(10)",
        "Robert'); DROP TABLE students;--",
        big.as_str(),
    ];
    let mut batch: Vec<Instruction> =
        hostile_values.iter().enumerate().map(|(i, v)| insert_item(i as i64, text(v), Value::Long(1))).collect();
    let rejected_cases: Vec<(Instruction, &str)> = vec![
        (
            instruction(
                "t",
                vec![op(
                    OperationKind::Insert,
                    "public.items; DROP TABLE public.items; --",
                    vec![field("id", Value::Long(100))],
                    vec![],
                )],
            ),
            "PGF01",
        ),
        (
            instruction(
                "t",
                vec![op(OperationKind::Insert, "\"public\".\"items\"", vec![field("id", Value::Long(101))], vec![])],
            ),
            "PGF01",
        ),
        (
            instruction("t", vec![op(OperationKind::Insert, "pg_catalog.pg_authid", vec![field("oid", Value::Long(1))], vec![])]),
            "PGF01",
        ),
        (
            instruction(
                "t",
                vec![op(OperationKind::Insert, "pgfanout.instruction_log", vec![field("instruction_id", text("x"))], vec![])],
            ),
            "PGF01",
        ),
        (insert_item_with_column(102, "name\"; DROP TABLE public.items; --"), "PGF02"),
        (insert_item_with_column(103, "qty/* comment */"), "PGF02"),
        // U+0000 is refused before anything reaches PostgreSQL.
        (insert_item_with_column(104, "na\0me"), "PGF10"),
        (insert_item(105, text("nul \0 inside"), Value::Long(1)), "PGF10"),
        (insert_item(106, Value::Bytes(vec![0xff, 0xfe, 0x00]), Value::Long(1)), "PGF04"),
        (insert_item(107, text("ok"), text("1; DROP TABLE public.items")), "22P02"),
        (insert_item(108, text("ok"), Value::Double(1e300)), "22003"),
    ];
    batch.extend(rejected_cases.iter().map(|(i, _)| i.clone()));
    let results = execute_batch(&client, &mut catalog, &mut statements, &batch).await.unwrap();

    for (i, v) in hostile_values.iter().enumerate() {
        assert_eq!(results[i].status, ResultStatus::Committed, "{:?}", results[i]);
        let row = client
            .query_one("SELECT name, length(name), md5(name) = md5($2) FROM public.items WHERE id = $1", &[&(i as i64), v])
            .await
            .unwrap();
        assert!(row.get::<_, bool>(2), "value {i} stored verbatim");
        assert_eq!(row.get::<_, i32>(1) as usize, v.chars().count());
    }
    for (k, (ins, code)) in rejected_cases.iter().enumerate() {
        let r = &results[hostile_values.len() + k];
        assert_eq!(r.instruction_id, ins.instruction_id);
        assert_eq!(r.status, ResultStatus::Rejected, "{r:?}");
        assert_eq!(r.error_code.as_deref(), Some(*code), "{r:?}");
    }
    // Nothing was executed: the tables are all there, with exactly the accepted rows.
    let n: i64 = client.query_one("SELECT count(*) FROM public.items", &[]).await.unwrap().get(0);
    assert_eq!(n, hostile_values.len() as i64);
    // Logged: every instruction that reached PostgreSQL, not the two refused at admission.
    let logged: i64 = logged_count(&client).await;
    assert_eq!(logged, batch.len() as i64 - 2);
    // An explicit allowed list narrows the set even where the role could write.
    let mut narrow = Catalog::new(AllowedTables::List([TableName::new("public", "sites")].into_iter().collect()));
    let r = execute_batch(&client, &mut narrow, &mut statements, &[insert_item(200, text("x"), Value::Long(1))]).await.unwrap();
    assert_eq!(r[0].error_code.as_deref(), Some("PGF01"));
}

fn insert_item_with_column(id: i64, column: &str) -> Instruction {
    instruction(
        "t",
        vec![op(OperationKind::Insert, "public.items", vec![field("id", Value::Long(id))], vec![field(column, Value::Long(1))])],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_class_gets_its_outcome() {
    let mut p = Pipeline::new("errors").await;
    let client = p.client().await;
    install_items_guard(&client).await;
    p.start_executor();
    let batch_len = definite_errors_fail_alone(&mut p, &client).await;
    transient_errors_are_retried(&mut p, &client).await;
    let counts: Vec<i64> = client
        .query("SELECT count(*) FROM public.items WHERE id IN (1, 10, 11, 20, 21) GROUP BY id ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(counts, vec![1, 1, 1, 1, 1], "every committed instruction took effect exactly once");
    let logged: i64 = logged_count(&client).await;
    // Every instruction that reached PostgreSQL is logged; `not_uuid`, refused at admission
    // for its id, never did.
    assert_eq!(logged, 1 + batch_len as i64 - 1 + 4);

    undecodable_records_are_dead_lettered(&mut p).await;
    p.stop("executor");
}

/// A trigger on `public.items` that fails a row named `explode` for good, a row named
/// `flaky` with a serialization failure on its first two attempts, and sleeps 1.5 s on a
/// row named `slow`.
async fn install_items_guard(client: &tokio_postgres::Client) {
    client
        .batch_execute(
            "CREATE SEQUENCE flaky_attempts;
             CREATE FUNCTION items_guard() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.name = 'explode' THEN RAISE EXCEPTION 'boom' USING ERRCODE = 'P0001'; END IF;
                 IF NEW.name = 'flaky' AND nextval('flaky_attempts') <= 2 THEN
                     RAISE EXCEPTION 'could not serialize' USING ERRCODE = '40001';
                 END IF;
                 IF NEW.name = 'slow' THEN PERFORM pg_sleep(1.5); END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER items_guard BEFORE INSERT OR UPDATE ON public.items FOR EACH ROW EXECUTE FUNCTION items_guard();",
        )
        .await
        .unwrap();
}

/// Definite errors: rejected or failed, each alone; the rest of the batch commits. Returns
/// the size of the batch of definite errors.
async fn definite_errors_fail_alone(p: &mut Pipeline, client: &tokio_postgres::Client) -> usize {
    let text = |s: &str| Value::String(s.to_string());
    let ok = insert_item(1, text("fine"), Value::Long(1));
    let dup = insert_item(1, text("again"), Value::Long(1));
    let bad_type = insert_item(2, text("x"), text("abc"));
    let unknown_column = insert_item_with_column(3, "colour");
    let mut cas = instruction(
        "t",
        vec![op(OperationKind::Update, "public.items", vec![field("id", Value::Long(1))], vec![field("qty", Value::Long(9))])],
    );
    cas.operations[0].expect = vec![field("qty", Value::Long(5))];
    let not_uuid = Instruction { instruction_id: "not-a-uuid".into(), ..insert_item(4, text("x"), Value::Long(1)) };
    let explode = insert_item(5, text("explode"), Value::Long(1));
    let atomic = instruction(
        "t",
        vec![
            op(
                OperationKind::Insert,
                "public.items",
                vec![field("id", Value::Long(6))],
                vec![field("name", text("first")), field("qty", Value::Long(1))],
            ),
            op(
                OperationKind::Insert,
                "public.items",
                vec![field("id", Value::Long(1))],
                vec![field("name", text("clash")), field("qty", Value::Long(1))],
            ),
        ],
    );
    let first = p.submit_and_wait(std::slice::from_ref(&ok)).await;
    assert_eq!(first[&ok.instruction_id].status, ResultStatus::Committed);
    let batch =
        [dup.clone(), bad_type.clone(), unknown_column.clone(), cas.clone(), not_uuid.clone(), explode.clone(), atomic.clone()];
    let results = p.submit_and_wait(&batch).await;
    let expect = |i: &Instruction, status: ResultStatus, code: &str| {
        let r = &results[&i.instruction_id];
        assert_eq!((r.status, r.error_code.as_deref()), (status, Some(code)), "{r:?}");
        assert!(r.error_message.as_ref().is_some_and(|m| !m.is_empty()));
    };
    expect(&dup, ResultStatus::Rejected, "23505");
    expect(&bad_type, ResultStatus::Rejected, "22P02");
    expect(&unknown_column, ResultStatus::Rejected, "PGF02");
    expect(&cas, ResultStatus::Rejected, "PGF08");
    expect(&not_uuid, ResultStatus::Rejected, "PGF06");
    expect(&explode, ResultStatus::Failed, "P0001");
    expect(&atomic, ResultStatus::Rejected, "23505");
    let row6: i64 = client.query_one("SELECT count(*) FROM public.items WHERE id = 6", &[]).await.unwrap().get(0);
    assert_eq!(row6, 0, "all operations of an instruction are atomic");
    let qty1: i32 = client.query_one("SELECT qty FROM public.items WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(qty1, 1, "the failed compare-and-set changed nothing");

    batch.len()
}

/// Transient errors are retried until the batch commits, each instruction once.
async fn transient_errors_are_retried(p: &mut Pipeline, client: &tokio_postgres::Client) {
    let text = |s: &str| Value::String(s.to_string());
    // Transient: a serialization failure twice, then success; other instructions of the
    // batch take effect once.
    let flaky = insert_item(10, text("flaky"), Value::Long(1));
    let neighbour = insert_item(11, text("neighbour"), Value::Long(1));
    let results = p.submit_and_wait(&[flaky.clone(), neighbour.clone()]).await;
    assert_eq!(results[&flaky.instruction_id].status, ResultStatus::Committed);
    assert_eq!(results[&neighbour.instruction_id].status, ResultStatus::Committed);
    let attempts: i64 = client.query_one("SELECT last_value FROM flaky_attempts", &[]).await.unwrap().get(0);
    assert!(attempts >= 3, "the batch was retried ({attempts} attempts)");

    // Transient: the executor's connection is killed in the middle of a batch.
    let slow = insert_item(20, text("slow"), Value::Long(1));
    let after_slow = insert_item(21, text("after"), Value::Long(1));
    let watcher = p.watch_results().await;
    p.submit(&[slow.clone(), after_slow.clone()]).await;
    let db = p.name.clone();
    let killed: i64 = wait_for("the slow statement to run", TIMEOUT, || {
        let db = db.clone();
        async move {
            let row = client
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'INSERT INTO%items%' AND state = 'active'",
                    &[&db],
                )
                .await
                .unwrap();
            let n: i64 = row.get(0);
            (n > 0).then_some(n)
        }
    })
    .await;
    assert_eq!(killed, 1);
    let results = p.await_results(watcher, &[slow.clone(), after_slow.clone()]).await;
    assert_eq!(results[&slow.instruction_id].status, ResultStatus::Committed);
    assert_eq!(results[&after_slow.instruction_id].status, ResultStatus::Committed);
}

/// Undecodable records go to the dead-letter topic with their origin; the pipeline goes on.
async fn undecodable_records_are_dead_lettered(p: &mut Pipeline) {
    let text = |s: &str| Value::String(s.to_string());
    let topics = p.kafka.topics();
    let producer = p.producer().await;
    let mut payload = pgfanout::contract::codec::encode_instruction(&insert_item(30, text("x"), Value::Long(1))).unwrap();
    payload[1] = 0xff; // inside the instruction id: not UTF-8 any more
    for bad in [b"not avro at all".to_vec(), payload] {
        producer
            .send(FutureRecord::to(&topics.instructions).key("bad").payload(&bad), Timeout::After(Duration::from_secs(10)))
            .await
            .unwrap();
    }
    let good = insert_item(31, text("after garbage"), Value::Long(1));
    assert_eq!(p.submit_and_wait(std::slice::from_ref(&good)).await[&good.instruction_id].status, ResultStatus::Committed);
    let dlq: BaseConsumer =
        pgfanout::kafka::client_config(&p.kafka, pgfanout::kafka::ClientRole::UncommittedConsumer { group_id: "dlq-reader" })
            .create()
            .unwrap();
    dlq.assign(&(0..p.kafka.partitions).map(|part| ((topics.dlq.clone(), part), rdkafka::Offset::Beginning)).collect()).unwrap();
    let mut letters = Vec::new();
    let deadline = Deadline::after(TIMEOUT, "the dead letters");
    while letters.len() < 2 && !deadline.passed() {
        if let Some(Ok(m)) = dlq.poll(Duration::from_millis(200)) {
            let headers: HashMap<String, String> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            letters.push(headers);
        }
    }
    assert_eq!(letters.len(), 2, "both undecodable records are in the dead-letter topic");
    for h in &letters {
        assert_eq!(h["pgfanout.source.topic"], topics.instructions);
        assert!(h["pgfanout.source.offset"].parse::<i64>().is_ok());
        assert!(h["pgfanout.error"].contains("undecodable"), "{h:?}");
    }
}

/// Instruction `k` of an issuer moves its counter row from `k - 1` to `k` with a
/// compare-and-set: it only commits if every earlier instruction of that issuer did, in order.
fn step(issuer: usize, k: i64) -> Instruction {
    let key = vec![field("code", Value::String(format!("counter-{issuer}")))];
    let mut o = op(OperationKind::Update, "public.sites", key, vec![field("city", Value::String(k.to_string()))]);
    o.expect = vec![field("city", Value::String((k - 1).to_string()))];
    instruction(&format!("issuer-{issuer}"), vec![o])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_executors_split_partitions_and_keep_each_issuers_order() {
    let mut p = Pipeline::new("scale_out").await;
    let client = p.client().await;
    const ISSUERS: usize = 6;
    const STEPS: i64 = 150;
    for i in 0..ISSUERS {
        client.execute("INSERT INTO public.sites (code, city) VALUES ($1, '0')", &[&format!("counter-{i}")]).await.unwrap();
    }
    p.start("executor", &["executor"]);
    let all: Vec<Instruction> = (1..=STEPS).flat_map(|k| (0..ISSUERS).map(move |i| step(i, k))).collect();
    let watcher = p.watch_results().await;
    let (first, second) = all.split_at(all.len() / 2);
    p.submit(first).await;
    // A second executor joins the group while the first is busy: the partitions are split.
    p.start("executor-2", &["executor"]);
    p.submit(second).await;
    let results = p.await_results(watcher, &all).await;
    let rejected: Vec<_> = results.values().filter(|r| r.status != ResultStatus::Committed).collect();
    assert!(rejected.is_empty(), "every step found its predecessor applied: {:?}", rejected.first());
    for i in 0..ISSUERS {
        let city: String =
            client.query_one("SELECT city FROM public.sites WHERE code = $1", &[&format!("counter-{i}")]).await.unwrap().get(0);
        assert_eq!(city, STEPS.to_string());
    }
    let per_executor: i64 =
        client.query_one("SELECT count(DISTINCT issued_by) FROM pgfanout.instruction_log", &[]).await.unwrap().get(0);
    assert_eq!(per_executor, ISSUERS as i64);
    // Both executors did work (each logs the batches it committed).
    wait_for("both executors to have worked", TIMEOUT, || async {
        let logs: Vec<String> = ["executor", "executor-2"]
            .iter()
            .map(|l| std::fs::read_to_string(p.dir.join(format!("{l}.log"))).unwrap_or_default())
            .collect();
        logs.iter().all(|l| l.contains("partitions assigned")).then_some(())
    })
    .await;
    p.stop("executor");
    p.stop("executor-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_batch_leaves_every_instruction_applied_once() {
    let mut p = Pipeline::new("executor_kill").await;
    const N: usize = 20_000;
    let all: Vec<Instruction> =
        (0..N as i64).map(|i| insert_item(i, Value::String(format!("n{i}")), Value::Long(i % 1000))).collect();
    let watcher = p.watch_results().await;
    p.start_executor();
    p.submit(&all).await;
    let client = p.client().await;
    let mut kills = 0;
    let mut last = -1i64;
    while kills < 4 {
        let done: i64 = logged_count(&client).await;
        if done as usize >= N {
            break;
        }
        if done > last + 500 {
            p.kill("executor");
            kills += 1;
            last = done;
            tokio::time::sleep(Duration::from_millis(100)).await;
            p.start_executor();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(kills >= 2, "the executor was killed mid-run ({kills} times)");
    let watcher = p.await_watcher(watcher, &all).await;
    assert!(watcher.differing().is_empty(), "all results for one id are identical: {:?}", watcher.differing().first());
    assert!(watcher.results().values().all(|r| r.status == ResultStatus::Committed));
    let rows: i64 = client.query_one("SELECT count(*) FROM public.items", &[]).await.unwrap().get(0);
    let logged: i64 = logged_count(&client).await;
    assert_eq!((rows, logged), (N as i64, N as i64), "one effect per instruction");
    let wrong: i64 = client
        .query_one("SELECT count(*) FROM public.items WHERE name <> 'n' || id OR qty <> id % 1000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "every row as its instruction wrote it");
    eprintln!("{kills} kills, {} results delivered for {N} instructions", watcher.deliveries());
    tokio::task::spawn_blocking(move || watcher.close()).await.unwrap();
    p.stop("executor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_waits_until_every_device_applied_the_instruction() {
    let mut p = Pipeline::new("all_devices").await;
    p.start_executor();
    p.start_capture().await;
    for d in ["a", "b", "c"] {
        p.start_device(d, &[]);
    }
    let submit = |id: i64, timeout: &str| {
        vec![
            "submit".to_string(),
            "--op".into(),
            "upsert".into(),
            "--table".into(),
            "public.items".into(),
            "--key".into(),
            format!("id={id}"),
            "--value".into(),
            "name=\"everywhere\"".into(),
            "--value".into(),
            format!("qty={id}"),
            "--wait".into(),
            "all-devices".into(),
            "--devices".into(),
            "a,b,c".into(),
            "--timeout-secs".into(),
            timeout.into(),
        ]
    };
    for id in [7001, 7002, 7003] {
        let args = submit(id, "60");
        let out = p.run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("applied on all 3 live devices"), "{stdout}");
        // The confirmation means the row is there on every device, right now.
        for d in ["a", "b", "c"] {
            let conn = pgfanout::verify::open_store_read_only(&p.store(d)).unwrap();
            let qty: i64 = conn
                .query_row("SELECT qty FROM \"public.items\" WHERE id = ?1 AND _pgfanout_deleted = 0", [id], |r| r.get(0))
                .unwrap();
            assert_eq!(qty, id, "device {d}");
        }
    }
    // A device that is down never confirms: the wait times out and says which one.
    p.kill("device-c");
    let args = submit(7004, "4");
    let out = p.run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("device a: applied") && stdout.contains("device c: waiting"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"c\""));
    p.stop("device-a");
    p.stop("device-b");
    p.stop("capture");
    p.stop("executor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_instructions_but_never_loses_or_doubles_them() {
    let mut p = Pipeline::with_own_broker("broker_down").await;
    p.start_executor();
    const N: i64 = 3000;
    let all: Vec<Instruction> = (0..N).map(|i| insert_item(i, Value::String(format!("n{i}")), Value::Long(1))).collect();
    let (before, after) = all.split_at(N as usize / 2);
    let watcher = p.watch_results().await;
    p.submit(before).await;
    let client = p.client().await;
    wait_for("the executor to start committing", TIMEOUT, || async {
        let n: i64 = logged_count(&client).await;
        (n > 0).then_some(())
    })
    .await;
    p.kill_broker();
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.start_broker();
    p.submit(after).await;
    let watcher = p.await_watcher(watcher, &all).await;
    assert!(watcher.differing().is_empty(), "{:?}", watcher.differing().first());
    assert!(watcher.results().values().all(|r| r.status == ResultStatus::Committed));
    let rows: i64 = client.query_one("SELECT count(*) FROM public.items", &[]).await.unwrap().get(0);
    let logged: i64 = logged_count(&client).await;
    assert_eq!((rows, logged), (N, N));
    tokio::task::spawn_blocking(move || watcher.close()).await.unwrap();
    p.stop("executor");
}
