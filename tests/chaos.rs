//! Chaos: the full pipeline — executor, capture, three devices — under steady load of mixed
//! instructions (several tables, multi-row instructions), while at random moments one of
//! executor, capture, a device or the broker is killed with SIGKILL, or PostgreSQL is
//! stopped (a fast shutdown, or a crash with `-m immediate`), and restarted after a random
//! pause. The broker and PostgreSQL are this test's own, the broker on durable (SQLite)
//! storage.
//!
//! Afterwards: every submitted instruction has exactly one effect (one `instruction_log`
//! row per id, every one committed) and the same result on every delivery; every device
//! equals PostgreSQL; nothing was dead-lettered. `PGFANOUT_TEST_SEED` replays a run,
//! `PGFANOUT_CHAOS_ROUNDS` (default 10) sets its length; `bench/run chaos --rounds N` runs a
//! long one. The run ends with `RESULT chaos_rounds N lost L duplicated D diverged V`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgfanout::contract::{Instruction, ResultStatus};
use pgfanout::kafka::{self, ClientRole};
use pgfanout::submit::produce_instructions;
use pgfanout::test_support::{logged_count, logged_ids, wait_for, Pipeline, TIMEOUT};
use pgfanout::workload::{Rng, Workload};
use rdkafka::producer::FutureProducer;

const DEVICES: [&str; 3] = ["a", "b", "c"];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_applied_twice_whatever_is_killed() {
    let seed = env_u64("PGFANOUT_TEST_SEED")
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    let rounds = env_u64("PGFANOUT_CHAOS_ROUNDS").unwrap_or(10);
    println!("chaos: seed {seed}, {rounds} rounds (PGFANOUT_TEST_SEED and PGFANOUT_CHAOS_ROUNDS replay it)");
    let mut rng = Rng::new(seed);
    let mut p = Pipeline::with_own_services("chaos").await;
    p.start_executor();
    p.start_capture().await;
    for d in DEVICES {
        p.start_device(d, &[]);
    }
    let mut watcher = p.watch_results().await;

    let submitted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&p, seed, submitted.clone(), stop.clone());

    for round in 0..rounds {
        break_something(&mut p, &mut rng, round).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let submitted = std::mem::take(&mut *submitted.lock().unwrap());
    let ids: HashSet<String> = submitted.iter().map(|i| i.instruction_id.clone()).collect();
    println!("chaos: {} instructions submitted", ids.len());

    // Exactly one effect, and the same result on every delivery.
    let waited = {
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || {
            let r = watcher.wait_for(&ids, TIMEOUT * 2, |_| {});
            (watcher, r)
        })
    };
    let (watcher, waited) = waited.await.unwrap();
    if let Err(e) = waited {
        println!("chaos: {e}");
    }
    let results = watcher.results();
    println!("chaos: {} result deliveries for {} instructions", watcher.deliveries(), ids.len());
    // Lost: no committed result or no instruction_log row. Duplicated: a second row for an
    // id, or a redelivery with a different result. Diverged: a device unequal to PostgreSQL.
    let client = p.client().await;
    let logged: HashSet<String> = logged_ids(&client).await.into_iter().collect();
    let rows: i64 = logged_count(&client).await;
    let lost = ids
        .iter()
        .filter(|id| !logged.contains(*id) || results.get(*id).is_none_or(|r| r.status != ResultStatus::Committed))
        .count();
    let duplicated = (rows as usize - logged.len()) + watcher.differing().len();
    tokio::task::spawn_blocking(move || watcher.close()).await.unwrap();
    let diverged = p.diverged_after(&DEVICES, TIMEOUT).await.len();
    println!("RESULT chaos_rounds {rounds} lost {lost} duplicated {duplicated} diverged {diverged}");
    assert_eq!((lost, duplicated, diverged), (0, 0, 0), "nothing lost, nothing applied twice, every device equal to PostgreSQL");

    // Nothing was dead-lettered.
    let dead = dead_letters(&p);
    assert_eq!(dead, 0, "no dead letters");
    for d in DEVICES {
        p.stop(&format!("device-{d}"));
    }
    p.stop("capture");
    p.stop("executor");
}

/// Steady load: 40 instructions every 100 ms until `stop`, each chunk produced until Kafka
/// has it (again after a failure: the same ids, so a chunk sent twice is still one effect)
/// and then added to `submitted`.
fn steady_load(
    p: &Pipeline,
    seed: u64,
    submitted: Arc<Mutex<Vec<Instruction>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let settings = p.kafka.clone();
    let mut workload = Workload::new(seed, "chaos");
    tokio::spawn(async move {
        let producer: FutureProducer = kafka::client_config(&settings, ClientRole::Producer).create().unwrap();
        let topic = settings.topics().instructions;
        while !stop.load(Ordering::Relaxed) {
            let chunk = workload.instructions(40);
            while let Err(e) = produce_instructions(&producer, &topic, &chunk).await {
                println!("chaos: submit failed ({e}); again");
            }
            submitted.lock().unwrap().extend(chunk);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// One round: after a random while, kills or stops a random component or service and
/// starts it again after a random pause.
async fn break_something(p: &mut Pipeline, rng: &mut Rng, round: u64) {
    tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
    let pause = Duration::from_millis(200 + rng.below(1800));
    let victim = rng.below(6);
    let device = DEVICES[rng.below(3) as usize];
    let what = match victim {
        0 => "executor".to_string(),
        1 => "capture".to_string(),
        2 => format!("device-{device}"),
        3 => "broker".to_string(),
        4 => "postgres (fast shutdown)".to_string(),
        _ => "postgres (crash)".to_string(),
    };
    println!("chaos: round {round}: {what}, down for {pause:?}");
    match victim {
        0..=2 => p.kill(&what),
        3 => p.kill_broker(),
        4 => p.stop_postgres("fast"),
        _ => p.stop_postgres("immediate"),
    }
    tokio::time::sleep(pause).await;
    match victim {
        0 => p.start_executor(),
        1 => p.start_capture().await,
        2 => p.start_device(device, &[]),
        3 => p.start_broker(),
        _ => p.start_postgres(),
    }
}

/// Records in the dead-letter topic.
fn dead_letters(p: &Pipeline) -> i64 {
    let dlq = p.kafka.topics().dlq;
    let consumer: rdkafka::consumer::BaseConsumer =
        kafka::client_config(&p.kafka, ClientRole::UncommittedConsumer { group_id: "chaos-dlq" }).create().unwrap();
    let mut dead = 0;
    for part in 0..p.kafka.partitions {
        let (low, high) = rdkafka::consumer::Consumer::fetch_watermarks(&consumer, &dlq, part, Duration::from_secs(10)).unwrap();
        dead += high - low;
    }
    dead
}

/// librdkafka's mock cluster between every component and Kafka: produce and fetch
/// requests fail for a while on a slow broker, then the broker goes down. While it is down capture confirms
/// nothing it has not had acknowledged; afterwards every instruction took effect once and
/// the device equals PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_faults_acknowledge_nothing_early_and_lose_nothing() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let mock = MockCluster::new(1).unwrap();
    let mut p = Pipeline::without_topics("mock_faults", &mock.bootstrap_servers()).await;
    for topic in p.kafka.topics().all() {
        mock.create_topic(topic, p.kafka.partitions, 1).unwrap();
    }
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &[]);
    let mut workload = Workload::new(17, "mock");
    let first = workload.instructions(300);
    let mut results = p.submit_and_wait(&first).await;

    // Retriable errors on produce and fetch requests.
    let produce_errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 20];
    mock.request_errors(RDKafkaApiKey::Produce, &produce_errors);
    let fetch_errors = vec![RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 20];
    mock.request_errors(RDKafkaApiKey::Fetch, &fetch_errors);
    // And a slow broker.
    mock.broker_round_trip_time(1, Duration::from_millis(300)).unwrap();
    let second = workload.instructions(300);
    results.extend(p.submit_and_wait(&second).await);
    mock.broker_round_trip_time(1, Duration::ZERO).unwrap();

    // The broker goes away while PostgreSQL keeps changing.
    let client = p.client().await;
    mock.broker_down(1).unwrap();
    client
        .batch_execute(
            "BEGIN; INSERT INTO public.sites (code, city) SELECT 'outage-' || g, 'Oslo' FROM generate_series(1, 200) g",
        )
        .await
        .unwrap();
    // A position inside the transaction, after its changes: its commit record lies past it.
    // (WAL written before it, such as the server's periodic running-transactions record, may
    // be confirmed: it carries no change.)
    let inside: i64 = client.query_one("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint", &[]).await.unwrap().get(0);
    client.batch_execute("COMMIT").await.unwrap();
    // Several status intervals: capture reads the changes but Kafka cannot acknowledge them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(p.slot_flushed().await < inside, "capture confirmed WAL that Kafka had not acknowledged");
    mock.broker_up(1).unwrap();

    // The broker refuses a producer's sequence: librdkafka's idempotent producer then fails
    // for good, and whichever component it was must go on with a new one. Capture is
    // streaming again (the outage's changes have arrived) so that it is the first to send.
    p.wait_converged(&["a"]).await;
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 2]);
    client
        .batch_execute("INSERT INTO public.sites (code, city) SELECT 'refused-' || g, 'Lima' FROM generate_series(1, 50) g")
        .await
        .unwrap();
    let logs: Vec<_> = ["capture", "device-a", "executor"].iter().map(|l| p.dir.join(format!("{l}.log"))).collect();
    wait_for("a component to replace its failed producer", TIMEOUT, || {
        let replaced = logs.iter().any(|l| std::fs::read_to_string(l).unwrap_or_default().contains("failed for good"));
        async move { replaced.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    for component in ["capture", "device-a", "executor"] {
        p.assert_running(component);
    }

    let third = workload.instructions(300);
    results.extend(p.submit_and_wait(&third).await);
    assert!(results.values().all(|r| r.status == ResultStatus::Committed));
    let logged: i64 = logged_count(&client).await;
    assert_eq!(logged, 900, "each instruction took effect once");
    p.wait_converged(&["a"]).await;
    let outage: i64 = p.device_rows("a").await["public.sites"].keys().filter(|k| k.contains("outage-")).count() as i64;
    assert_eq!(outage, 200, "the changes made while the broker was down reached the device");
    let refused = p.device_rows("a").await["public.sites"].keys().filter(|k| k.contains("refused-")).count();
    assert_eq!(refused, 50, "the changes whose first produce was refused reached the device");
    p.stop("device-a");
    p.stop("capture");
    p.stop("executor");
}
